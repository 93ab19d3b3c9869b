//! keygate's own HTTP/1.1 server connection, for the common case; hyper for everything else.
//!
//! hyper's server dispatcher cost keygate ~8 us of user CPU per request (issue 13): a state
//! machine, a service future moved into its state, a body channel. Here one task reads a request
//! head into the connection's one buffer, parses it in place (`httparse`, as hyper does), hands
//! the pipeline a body that reads from that buffer and the socket as it is polled, and writes the
//! answer's head and first frame in one `writev`, each later frame as it arrives.
//!
//! Only what is plainly ordinary is served here: an HTTP/1.1 origin-form request whose body is
//! framed by one `Content-Length` or by `Transfer-Encoding: chunked` alone, or has none, without
//! `Expect` or `Upgrade`. Anything else (HTTP/1.0, CONNECT, odd framing, TE with CL, a head that
//! does not parse or is large, the HTTP/2 preface) is handed to hyper at that request boundary,
//! the bytes already read replayed ([`super::sniff::Rewind`]), and hyper serves the rest of the
//! connection exactly as it did before: never a guess on framing. Bodies are decoded by the
//! codec both ends share ([`crate::h1`]).

use std::future::{poll_fn, Future};
use std::io::{self, IoSlice, Write as _};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::AsyncWrite;

use super::sniff::Rewind;
use super::Stream;
use crate::forward::BoxError;
use crate::h1::{self as codec, BodyError, Decoded, Decoder, Framing, MAX_HEADERS};
use crate::lock;

/// A head (or a partial one) this large goes to hyper, whose buffer limit decides on it.
const OWN_HEAD_MAX: usize = 32 * 1024;
/// hyper's request-target limit.
const MAX_URI_LEN: usize = (u16::MAX - 1) as usize;
/// Room made in the buffer before a read.
const READ_CHUNK: usize = 8 * 1024;

/// A request body: hyper's, or one read by this module's connection.
pub enum Incoming {
    /// Read by hyper (HTTP/2, the forward proxy, a connection handed to hyper).
    Hyper(hyper::body::Incoming),
    /// Read from keygate's own HTTP/1.1 connection.
    Own(Body),
}

impl From<hyper::body::Incoming> for Incoming {
    fn from(b: hyper::body::Incoming) -> Self {
        Incoming::Hyper(b)
    }
}

impl HttpBody for Incoming {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Incoming::Hyper(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(Into::into))),
            Incoming::Own(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Incoming::Hyper(b) => b.is_end_stream(),
            Incoming::Own(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Incoming::Hyper(b) => b.size_hint(),
            Incoming::Own(b) => b.size_hint(),
        }
    }
}

/// What the connection and its current request's body share: the socket and its read buffer.
struct Shared {
    io: Option<Stream>,
    rd: BytesMut,
    /// The current request body's framing state.
    body: Decoder,
    /// Which request's body `body` is: a body handle of an earlier request reads nothing.
    gen: u64,
    eof: bool,
    spans: Vec<Span>,
}

impl Shared {
    /// Reads what the socket has into `rd`; `Ok(0)` at its end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Some(io) = self.io.as_mut() else {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        };
        if self.rd.capacity() - self.rd.len() < READ_CHUNK / 4 {
            self.rd.reserve(READ_CHUNK);
        }
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(io),
            cx,
            &mut self.rd
        ))?;
        if n == 0 {
            self.eof = true;
        }
        Poll::Ready(Ok(n))
    }
}

/// A request body read from keygate's own connection as it is polled.
pub struct Body {
    shared: Arc<Mutex<Shared>>,
    gen: u64,
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("h1::Body")
    }
}

/// The body's connection moved on (the answer ended before the body was read).
#[derive(Debug, thiserror::Error)]
#[error("the request's connection is no longer reading its body")]
struct Gone;

impl HttpBody for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut g = lock(&self.shared);
        if g.gen != self.gen {
            return Poll::Ready(Some(Err(Box::new(Gone))));
        }
        loop {
            let s = &mut *g;
            match read_body(&mut s.body, &mut s.rd, s.eof) {
                Ok(Step::Frame(f)) => return Poll::Ready(Some(Ok(f))),
                Ok(Step::End) => return Poll::Ready(None),
                Ok(Step::More) => match ready!(s.poll_fill(cx)) {
                    Ok(_) => {}
                    Err(e) => {
                        s.body.fail();
                        return Poll::Ready(Some(Err(Box::new(e))));
                    }
                },
                // The decoder stays failed: the connection is not reused.
                Err(e) => return Poll::Ready(Some(Err(Box::new(e)))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let g = lock(&self.shared);
        g.gen == self.gen && g.body.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        let g = lock(&self.shared);
        match g.body.remaining() {
            _ if g.gen != self.gen => SizeHint::default(),
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// What one decode step gives.
#[derive(Debug)]
enum Step {
    Frame(Frame<Bytes>),
    /// The buffer holds no more of the body.
    More,
    End,
}

/// One step of the current request body, from the connection's buffer; `eof`: the client
/// closed its side, so a body that needs more is cut short.
fn read_body(body: &mut Decoder, rd: &mut BytesMut, eof: bool) -> io::Result<Step> {
    let decoded = match body.decode(rd) {
        Ok(Decoded::More) if eof => body.eof().map(|()| Decoded::Done),
        d => d,
    };
    match decoded {
        Ok(Decoded::Data(d)) => Ok(Step::Frame(Frame::data(d))),
        Ok(Decoded::Trailers(t)) => Ok(Step::Frame(Frame::trailers(t))),
        Ok(Decoded::Done) => Ok(Step::End),
        Ok(Decoded::More) => Ok(Step::More),
        Err(BodyError::Invalid(what)) => {
            Err(io::Error::new(io::ErrorKind::InvalidInput, what.as_str()))
        }
        Err(e @ BodyError::Incomplete) => Err(io::Error::new(io::ErrorKind::UnexpectedEof, e)),
    }
}

/// A request head served here.
#[derive(Debug)]
struct Head {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Framing,
    keep_alive: bool,
}

/// What the buffer holds.
// Not boxed: the head is moved once into the request, and a box would cost every request an
// allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Parsed {
    /// Not a whole head yet.
    Partial,
    /// Not this module's to serve: hyper's, from this request on.
    HandOff,
    Request(Head),
}

/// Where a header's name and value are in the buffer.
type Span = (usize, usize, usize, usize);

/// Parses the request head at the start of `rd`, taking it out of the buffer when it is served
/// here (the buffer is left as it was otherwise).
/// `at` is the connection's scratch list of the header spans (name start, name end, value start,
/// value end: offsets into `rd`), reused so no request pays to allocate or clear one.
fn parse_head(rd: &mut BytesMut, at: &mut Vec<Span>) -> Parsed {
    at.clear();
    let (len, method, path) = {
        // Uninitialised, as hyper's: zeroing 100 headers cost a request ~3k instructions.
        let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let base = rd.as_ptr() as usize;
        let parsed = httparse::ParserConfig::default().parse_request_with_uninit_headers(
            &mut req,
            rd,
            &mut headers,
        );
        let len = match parsed {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if rd.len() < OWN_HEAD_MAX => return Parsed::Partial,
            _ => return Parsed::HandOff,
        };
        if len > OWN_HEAD_MAX || req.version != Some(1) {
            return Parsed::HandOff;
        }
        let (Some(method), Some(path)) = (req.method, req.path) else {
            return Parsed::HandOff;
        };
        if path.len() > MAX_URI_LEN || !path.starts_with('/') {
            return Parsed::HandOff;
        }
        let Ok(method) = Method::from_bytes(method.as_bytes()) else {
            return Parsed::HandOff;
        };
        if method == Method::CONNECT {
            return Parsed::HandOff;
        }
        for h in req.headers.iter() {
            let n = h.name.as_ptr() as usize - base;
            let v = h.value.as_ptr() as usize - base;
            at.push((n, n + h.name.len(), v, v + h.value.len()));
        }
        let p = path.as_ptr() as usize - base;
        (len, method, (p, p + path.len()))
    };
    let count = at.len();
    let headers_at = &at[..];
    // Checked on the bytes before anything is taken out of the buffer.
    let mut keep_alive = true;
    let mut length: Option<u64> = None;
    let mut chunked = false;
    for &(ns, ne, vs, ve) in headers_at {
        let name = rd.get(ns..ne).unwrap_or_default();
        let value = rd.get(vs..ve).unwrap_or_default();
        let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
        if is("transfer-encoding") {
            if chunked || !value.eq_ignore_ascii_case(b"chunked") {
                return Parsed::HandOff;
            }
            chunked = true;
        } else if is("content-length") {
            if length.is_some()
                || value.is_empty()
                || value.len() > 18
                || !value.iter().all(u8::is_ascii_digit)
            {
                return Parsed::HandOff;
            }
            length = codec::from_digits(value);
            if length.is_none() {
                return Parsed::HandOff;
            }
        } else if is("connection") {
            if codec::has_token(value, b"close") {
                keep_alive = false;
            }
        } else if is("expect") || is("upgrade") {
            return Parsed::HandOff;
        }
    }
    if chunked && length.is_some() {
        return Parsed::HandOff;
    }
    let head = rd.split_to(len).freeze();
    // Nothing was served from these bytes yet: on a surprise they go back for hyper.
    let put_back = |rd: &mut BytesMut| {
        let rest = rd.split();
        rd.extend_from_slice(&head);
        rd.extend_from_slice(&rest);
        Parsed::HandOff
    };
    let Ok(uri) = Uri::from_maybe_shared(head.slice(path.0..path.1)) else {
        return put_back(rd);
    };
    let mut map = HeaderMap::with_capacity(count);
    for &(ns, ne, vs, ve) in headers_at {
        let name = HeaderName::from_bytes(head.get(ns..ne).unwrap_or_default());
        let value = HeaderValue::from_maybe_shared(head.slice(vs..ve));
        match (name, value) {
            (Ok(n), Ok(v)) => {
                map.append(n, v);
            }
            _ => return put_back(rd),
        }
    }
    let body = match (chunked, length) {
        (true, _) => Framing::Chunked,
        (false, Some(n)) => Framing::Length(n),
        (false, None) => Framing::Length(0),
    };
    Parsed::Request(Head {
        method,
        uri,
        headers: map,
        body,
        keep_alive,
    })
}

/// What serves a request: the pipeline in keygate, an echo in the tests.
pub(crate) trait Service: Send + Unpin + 'static {
    /// The answer's body.
    type Body: HttpBody<Data = Bytes, Error = BoxError> + Send + Unpin + 'static;
    /// The answer.
    type Future: Future<Output = Response<Self::Body>> + Send + Unpin + 'static;
    /// Answers `req`.
    fn call(&self, req: Request<Incoming>) -> Self::Future;
}

/// A [`Service`] as hyper calls one, for a connection handed to hyper.
pub(crate) struct ViaHyper<S>(pub(crate) S);

/// An answer that cannot fail, as hyper wants it.
pub(crate) struct Infallibly<F>(F);

impl<F: Future + Unpin> Future for Infallibly<F> {
    type Output = Result<F::Output, std::convert::Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(Ok)
    }
}

impl<S: Service> hyper::service::Service<Request<hyper::body::Incoming>> for ViaHyper<S> {
    type Response = Response<S::Body>;
    type Error = std::convert::Infallible;
    type Future = Infallibly<S::Future>;

    fn call(&self, req: Request<hyper::body::Incoming>) -> Self::Future {
        Infallibly(self.0.call(req.map(Incoming::Hyper)))
    }
}

/// One connection served by this module (and by hyper once it hands over): a future for
/// `listen::drive`, with hyper's `graceful_shutdown`.
pub(super) struct Connection {
    run: Pin<Box<dyn Future<Output = ()> + Send>>,
    draining: Arc<AtomicBool>,
}

impl Connection {
    /// Serves `io` with `svc`; `h2`: the first request may be HTTP/2's preface (h2c).
    pub(super) fn new<S: Service>(io: Stream, svc: S, h2: bool) -> Self {
        let draining = Arc::new(AtomicBool::new(false));
        Connection {
            run: Box::pin(serve(io, svc, draining.clone(), h2)),
            draining,
        }
    }

    /// Finishes the request in flight, then closes; an idle connection closes at once.
    pub(super) fn graceful_shutdown(self: Pin<&mut Self>) {
        self.draining.store(true, Ordering::Release);
    }
}

impl Future for Connection {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.run.as_mut().poll(cx)
    }
}

/// How waiting for a head ended.
#[allow(clippy::large_enum_variant)]
enum Next {
    Request(Head),
    HandOff,
    Close,
}

fn poll_head(shared: &Mutex<Shared>, draining: &AtomicBool, cx: &mut Context<'_>) -> Poll<Next> {
    let mut g = lock(shared);
    loop {
        if draining.load(Ordering::Acquire) {
            return Poll::Ready(Next::Close);
        }
        if !g.rd.is_empty() {
            let s = &mut *g;
            match parse_head(&mut s.rd, &mut s.spans) {
                Parsed::Partial => {}
                Parsed::HandOff => return Poll::Ready(Next::HandOff),
                Parsed::Request(h) => return Poll::Ready(Next::Request(h)),
            }
        }
        if g.eof {
            // hyper has its own word on a head cut short.
            return Poll::Ready(if g.rd.is_empty() {
                Next::Close
            } else {
                Next::HandOff
            });
        }
        match ready!(g.poll_fill(cx)) {
            Ok(_) => {}
            Err(_) => return Poll::Ready(Next::Close),
        }
    }
}

/// While the pipeline works on a request whose body is read: ready when the client hung up
/// (hyper's `mid_message_detect_eof`; the answer is then dropped, as hyper drops it).
fn poll_hangup(shared: &Mutex<Shared>, cx: &mut Context<'_>) -> Poll<()> {
    let mut g = lock(shared);
    if !g.body.is_done() || !g.rd.is_empty() || g.eof {
        return Poll::Pending;
    }
    match ready!(g.poll_fill(cx)) {
        Ok(0) | Err(_) => Poll::Ready(()),
        Ok(_) => Poll::Pending,
    }
}

async fn write_all(shared: &Mutex<Shared>, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while bufs.iter().any(|b| !b.is_empty()) {
        let n = poll_fn(|cx| {
            let mut g = lock(shared);
            match g.io.as_mut() {
                Some(io) => Pin::new(io).poll_write_vectored(cx, bufs),
                None => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
            }
        })
        .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    // A TLS stream takes the bytes and may hold records the socket would not take yet: they
    // leave only when flushed (hyper flushes after each write too; free on TCP and Unix).
    poll_fn(|cx| {
        let mut g = lock(shared);
        match g.io.as_mut() {
            Some(io) => Pin::new(io).poll_flush(cx),
            None => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    })
    .await
}

async fn serve<S: Service>(io: Stream, svc: S, draining: Arc<AtomicBool>, h2: bool) {
    let shared = Arc::new(Mutex::new(Shared {
        io: Some(io),
        rd: BytesMut::new(),
        body: Decoder::new(Framing::Length(0)),
        gen: 0,
        eof: false,
        spans: Vec::new(),
    }));
    let mut out = Vec::new();
    let mut first = true;
    loop {
        let head = match poll_fn(|cx| poll_head(&shared, &draining, cx)).await {
            Next::Request(h) => h,
            Next::Close => break,
            Next::HandOff => {
                let (io, pre) = {
                    let mut g = lock(&shared);
                    (g.io.take(), g.rd.split().to_vec())
                };
                let Some(io) = io else { return };
                return hand_off(io, pre, svc, &draining, h2 && first).await;
            }
        };
        first = false;
        let Head {
            method,
            uri,
            headers,
            body,
            mut keep_alive,
        } = head;
        let gen = {
            let mut g = lock(&shared);
            g.gen += 1;
            g.body = Decoder::new(body);
            g.gen
        };
        let mut req = Request::new(Incoming::Own(Body {
            shared: shared.clone(),
            gen,
        }));
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        let is_head = req.method() == Method::HEAD;
        let mut answer = svc.call(req);
        let resp = poll_fn(|cx| {
            if let Poll::Ready(r) = Pin::new(&mut answer).poll(cx) {
                return Poll::Ready(Some(r));
            }
            ready!(poll_hangup(&shared, cx));
            Poll::Ready(None)
        })
        .await;
        drop(answer);
        let Some(resp) = resp else { break };
        if draining.load(Ordering::Acquire) {
            keep_alive = false;
        }
        let (mut parts, mut body) = resp.into_parts();
        let len = if body.is_end_stream() {
            BodyLen::None
        } else {
            match body.size_hint().exact() {
                Some(n) => BodyLen::Known(n),
                None => BodyLen::Unknown,
            }
        };
        out.clear();
        let Ok((mut enc, is_last)) = encode_head(&mut parts, is_head, keep_alive, len, &mut out)
        else {
            break;
        };
        let ended = write_body(&shared, &mut out, &mut enc, &mut body).await;
        // The body (and with it the request's `InFlight`) goes before its last bytes are
        // written: a client that stops reading then holds an idle connection, which the idle
        // check closes, not a request in flight, which nothing would.
        drop(body);
        let written = ended != Ended::Failed && flush(&shared, &mut out, &[]).await;
        if ended != Ended::Whole || !written {
            break;
        }
        if is_last {
            break;
        }
        // A body not read to its end is drained as hyper drains it: hyper has read one frame
        // ahead into the body's channel and reads one more when the body is dropped
        // (`poll_drain_or_close_read`), and keeps the connection only if the body ended by
        // then. A length-delimited body ends with its data; a chunked one only at a read of
        // its own (hyper's decoder takes the framing after a chunk on the next read). Anything
        // more closes the connection, never parsed as the next head.
        let clean = {
            let mut g = lock(&shared);
            g.gen += 1;
            let s = &mut *g;
            let by_length = s.body.remaining().is_some();
            let mut reads = 2;
            loop {
                if reads == 0 {
                    break false;
                }
                reads -= 1;
                match read_body(&mut s.body, &mut s.rd, false) {
                    Ok(Step::End) => break true,
                    Ok(Step::Frame(f)) if f.is_trailers() => break true,
                    Ok(Step::Frame(_)) if by_length && s.body.is_done() => break true,
                    Ok(Step::Frame(_)) => {}
                    Ok(Step::More) | Err(_) => break false,
                }
            }
        };
        if !clean {
            break;
        }
    }
    let io = lock(&shared).io.take();
    if let Some(mut io) = io {
        let _ = poll_fn(|cx| Pin::new(&mut io).poll_shutdown(cx)).await;
    }
}

/// hyper serves the rest of the connection, from the bytes in `pre` on.
async fn hand_off<S: Service>(io: Stream, pre: Vec<u8>, svc: S, draining: &AtomicBool, h2: bool) {
    let svc = ViaHyper(svc);
    let mut drained = false;
    if h2 {
        // The first request: HTTP/2's preface or HTTP/1.1, told as before (`sniff`).
        let conn = super::sniff::Served::with_first(
            io,
            pre,
            svc,
            super::http1_builder(),
            super::http2_builder(),
        );
        let mut conn = std::pin::pin!(conn);
        poll_fn(|cx| {
            if !drained && draining.load(Ordering::Acquire) {
                drained = true;
                conn.as_mut().graceful_shutdown();
            }
            conn.as_mut().poll(cx)
        })
        .await;
    } else {
        let io = hyper_util::rt::TokioIo::new(Rewind::new(pre, io));
        let conn = super::http1_builder().serve_connection(io, svc);
        let mut conn = std::pin::pin!(conn);
        poll_fn(|cx| {
            if !drained && draining.load(Ordering::Acquire) {
                drained = true;
                conn.as_mut().graceful_shutdown();
            }
            conn.as_mut().poll(cx).map(|_| ())
        })
        .await;
    }
}

#[derive(Clone, Copy, Debug)]
enum BodyLen {
    None,
    Known(u64),
    Unknown,
}

/// How the answer's body goes out.
#[derive(Debug)]
enum Encoder {
    Length(u64),
    /// Until the connection closes (an HTTP/1.0 answer of unknown length, as hyper sends it).
    Close,
    Chunked(Option<Vec<HeaderName>>),
}

/// The answer's head could not be written (hyper refuses it as a user error and closes).
#[derive(Debug)]
struct BadHead;

fn can_chunked(is_head: bool, status: StatusCode) -> bool {
    !is_head
        && !status.is_informational()
        && !matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED)
}

fn can_have_content_length(status: StatusCode) -> bool {
    !status.is_informational()
        && !matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED)
}

/// The answer's head as hyper's server writes it (`role.rs`, `Server::encode`, lower-case
/// names): status line, headers in the map's order, the length or `chunked`, `date`.
fn encode_head(
    head: &mut http::response::Parts,
    is_head: bool,
    keep_alive: bool,
    len: BodyLen,
    dst: &mut Vec<u8>,
) -> Result<(Encoder, bool), BadHead> {
    if head.status.is_informational() {
        return Err(BadHead);
    }
    let mut is_last = !keep_alive;
    if !keep_alive {
        match head.headers.entry(header::CONNECTION) {
            header::Entry::Occupied(mut e) => {
                if !e.iter().any(|v| codec::has_token(v.as_bytes(), b"close")) {
                    e.append(HeaderValue::from_static("close"));
                }
            }
            header::Entry::Vacant(e) => {
                e.insert(HeaderValue::from_static("close"));
            }
        }
    }
    let status = head.status;
    let reason = head.extensions.get::<hyper::ext::ReasonPhrase>();
    if head.version == Version::HTTP_10 {
        dst.extend_from_slice(b"HTTP/1.0 ");
    } else if status == StatusCode::OK && reason.is_none() {
        dst.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        dst.extend_from_slice(b"HTTP/1.1 ");
    }
    if head.version == Version::HTTP_10 || status != StatusCode::OK || reason.is_some() {
        dst.extend_from_slice(status.as_str().as_bytes());
        dst.push(b' ');
        match reason {
            Some(r) => dst.extend_from_slice(r.as_bytes()),
            None => dst.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes()),
        }
        dst.extend_from_slice(b"\r\n");
    }
    let chunkable = can_chunked(is_head, status) && head.version != Version::HTTP_10;
    let mut enc = Encoder::Length(0);
    let mut wrote_len = false;
    let mut wrote_date = false;
    let mut prev_len: Option<u64> = None;
    let mut must_write_chunked = false;
    let mut allowed_trailers: Option<Vec<HeaderName>> = None;
    // The name of a line still open for more values (written joined with ", ").
    let mut open: Option<&HeaderName> = None;
    let mut prev: Option<&HeaderName> = None;
    for (name, value) in head.headers.iter() {
        let same = prev == Some(name);
        prev = Some(name);
        if !same && open.take().is_some() {
            dst.extend_from_slice(if must_write_chunked {
                b", chunked\r\n"
            } else {
                b"\r\n"
            });
            must_write_chunked = false;
        }
        let joined = open.is_some();
        match *name {
            header::CONTENT_LENGTH => {
                if wrote_len && !joined {
                    return Err(BadHead);
                }
                match len {
                    BodyLen::Known(n) => {
                        if !joined {
                            enc = Encoder::Length(n);
                            dst.extend_from_slice(b"content-length: ");
                            dst.extend_from_slice(value.as_bytes());
                            wrote_len = true;
                            open = Some(name);
                        }
                        continue;
                    }
                    BodyLen::Unknown => {
                        // Digits, or a list of equal ones.
                        let n = codec::content_length([value]).ok_or(BadHead)?;
                        if let Some(p) = prev_len {
                            if p != n {
                                return Err(BadHead);
                            }
                            continue;
                        }
                        enc = Encoder::Length(n);
                        dst.extend_from_slice(b"content-length: ");
                        dst.extend_from_slice(value.as_bytes());
                        wrote_len = true;
                        open = Some(name);
                        prev_len = Some(n);
                        continue;
                    }
                    BodyLen::None => {
                        if !is_head {
                            continue;
                        }
                        wrote_len = true;
                    }
                }
            }
            header::TRANSFER_ENCODING => {
                if wrote_len && !joined {
                    return Err(BadHead);
                }
                if !chunkable {
                    continue;
                }
                wrote_len = true;
                must_write_chunked = !codec::ends_in_chunked(value.as_bytes());
                if joined {
                    dst.extend_from_slice(b", ");
                } else {
                    enc = Encoder::Chunked(None);
                    dst.extend_from_slice(b"transfer-encoding: ");
                    open = Some(name);
                }
                dst.extend_from_slice(value.as_bytes());
                continue;
            }
            header::CONNECTION => {
                if !is_last && codec::has_token(value.as_bytes(), b"close") {
                    is_last = true;
                }
                if joined {
                    dst.extend_from_slice(b", ");
                } else {
                    dst.extend_from_slice(b"connection: ");
                    open = Some(name);
                }
                dst.extend_from_slice(value.as_bytes());
                continue;
            }
            header::DATE => wrote_date = true,
            header::TRAILER => {
                if !chunkable {
                    continue;
                }
                if joined {
                    dst.extend_from_slice(b", ");
                } else {
                    dst.extend_from_slice(b"trailer: ");
                    open = Some(name);
                }
                dst.extend_from_slice(value.as_bytes());
                if let Ok(v) = value.to_str() {
                    allowed_trailers.get_or_insert_with(Vec::new).extend(
                        v.split(',')
                            .filter_map(|s| HeaderName::from_bytes(s.trim().as_bytes()).ok()),
                    );
                }
                continue;
            }
            _ => {}
        }
        codec::put_field(dst, name.as_str().as_bytes(), value.as_bytes());
    }
    if open.is_some() {
        dst.extend_from_slice(if must_write_chunked {
            b", chunked\r\n"
        } else {
            b"\r\n"
        });
    }
    if !wrote_len {
        enc = match len {
            BodyLen::Unknown if chunkable => {
                dst.extend_from_slice(b"transfer-encoding: chunked\r\n");
                Encoder::Chunked(None)
            }
            // HTTP/1.0 or no body allowed: nothing is sent (below).
            BodyLen::Unknown => {
                // hyper's close-delimited body, for an HTTP/1.0 answer that may have one.
                if can_chunked(is_head, status) {
                    is_last = true;
                }
                Encoder::Close
            }
            BodyLen::None | BodyLen::Known(0) => {
                if can_have_content_length(status) && !is_head {
                    dst.extend_from_slice(b"content-length: 0\r\n");
                }
                Encoder::Length(0)
            }
            BodyLen::Known(n) => {
                if can_have_content_length(status) {
                    dst.extend_from_slice(b"content-length: ");
                    let _ = write!(dst, "{n}\r\n");
                    Encoder::Length(n)
                } else {
                    Encoder::Length(0)
                }
            }
        };
    }
    if !can_chunked(is_head, status) {
        enc = Encoder::Length(0);
    }
    if !wrote_date {
        dst.extend_from_slice(b"date: ");
        date::extend(dst);
        dst.extend_from_slice(b"\r\n\r\n");
    } else {
        dst.extend_from_slice(b"\r\n");
    }
    if let (Encoder::Chunked(t), Some(allowed)) = (&mut enc, allowed_trailers) {
        *t = Some(allowed);
    }
    Ok((enc, is_last))
}

/// How an answer's body ended.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// All of it: the connection may serve the next request.
    Whole,
    /// Short of its length, or failed: what was gathered goes out, then the connection closes.
    Cut,
    /// Writing failed, or the client hung up: nothing more can be written.
    Failed,
}

/// Gathered answer bytes past this go out at once (and a frame this large is not copied).
const GATHER_MAX: usize = 16 * 1024;

/// Writes `out` (and `more` after it), then empties `out`.
async fn flush(shared: &Mutex<Shared>, out: &mut Vec<u8>, more: &[u8]) -> bool {
    let ok = write_all(shared, &mut [IoSlice::new(out), IoSlice::new(more)])
        .await
        .is_ok();
    out.clear();
    ok
}

/// Writes the answer's body after its head (in `out`). What the body has ready at once is
/// gathered with the head into one write (hyper's buffer does the same); the moment it has
/// nothing ready, what was gathered goes out, so a stream's events are never held back.
/// What is left of the answer stays in `out` for the caller to write once the body is dropped.
async fn write_body<B>(
    shared: &Mutex<Shared>,
    out: &mut Vec<u8>,
    enc: &mut Encoder,
    body: &mut B,
) -> Ended
where
    B: HttpBody<Data = Bytes, Error = BoxError> + Unpin,
{
    let mut size_line = [0u8; 18];
    loop {
        if matches!(enc, Encoder::Length(0)) {
            // All of it (or a bodiless answer): the body is not polled again, as with hyper.
            return Ended::Whole;
        }
        if out.len() >= GATHER_MAX && !flush(shared, out, &[]).await {
            return Ended::Failed;
        }
        let frame = if out.is_empty() {
            // Waiting on the answer: a client that hangs up meanwhile ends it (hyper's
            // `mid_message_detect_eof`), which the audit record tells as `client_disconnected`.
            let got = poll_fn(|cx| {
                if let Poll::Ready(f) = Pin::new(&mut *body).poll_frame(cx) {
                    return Poll::Ready(Some(f));
                }
                ready!(poll_hangup(shared, cx));
                Poll::Ready(None)
            })
            .await;
            match got {
                Some(f) => f,
                None => return Ended::Failed,
            }
        } else {
            match poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx))).await {
                Poll::Ready(f) => f,
                Poll::Pending => {
                    if !flush(shared, out, &[]).await {
                        return Ended::Failed;
                    }
                    continue;
                }
            }
        };
        let frame = match frame {
            None => {
                match enc {
                    Encoder::Chunked(_) => out.extend_from_slice(codec::LAST_CHUNK),
                    // Shorter than its length: hyper closes the connection.
                    Encoder::Length(_) => return Ended::Cut,
                    Encoder::Close => {}
                }
                return Ended::Whole;
            }
            Some(Err(_)) => return Ended::Cut,
            Some(Ok(frame)) => frame,
        };
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                // Trailers end the body: sent when the head announced them.
                match (&*enc, frame.into_trailers()) {
                    (Encoder::Chunked(allowed), Ok(trailers)) => {
                        out.extend_from_slice(b"0\r\n");
                        for (name, value) in trailers.iter() {
                            if allowed.as_ref().is_some_and(|a| a.contains(name)) {
                                codec::put_field(out, name.as_str().as_bytes(), value.as_bytes());
                            }
                        }
                        out.extend_from_slice(b"\r\n");
                    }
                    (Encoder::Chunked(_), Err(_)) => out.extend_from_slice(codec::LAST_CHUNK),
                    (Encoder::Length(n), _) if *n > 0 => return Ended::Cut,
                    _ => {}
                }
                return Ended::Whole;
            }
        };
        if data.is_empty() {
            continue;
        }
        let data = match enc {
            Encoder::Length(n) => {
                // Past its length: cut, as hyper does.
                let take = usize::try_from(*n).unwrap_or(usize::MAX).min(data.len());
                *n -= take as u64;
                data.slice(..take)
            }
            Encoder::Chunked(_) => {
                out.extend_from_slice(codec::chunk_size_line(data.len(), &mut size_line));
                data
            }
            Encoder::Close => data,
        };
        let crlf: &[u8] = if matches!(enc, Encoder::Chunked(_)) {
            codec::CHUNK_END
        } else {
            b""
        };
        if data.len() <= GATHER_MAX {
            out.extend_from_slice(&data);
            out.extend_from_slice(crlf);
        } else {
            let ok = write_all(
                shared,
                &mut [IoSlice::new(out), IoSlice::new(&data), IoSlice::new(crlf)],
            )
            .await
            .is_ok();
            out.clear();
            if !ok {
                return Ended::Failed;
            }
        }
    }
}

/// The `date` header's value, formatted once a second per thread (hyper caches it too).
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }

    pub(super) fn extend(dst: &mut Vec<u8>) {
        let now = SystemTime::now();
        let secs = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        CACHED.with(|c| {
            let mut c = c.borrow_mut();
            if c.0 != secs || c.1.is_empty() {
                *c = (secs, httpdate::fmt_http_date(now));
            }
            dst.extend_from_slice(c.1.as_bytes());
        });
    }
}

/// For the fuzz target (`fuzz/fuzz_targets/h1_server.rs`): whatever the bytes, the head parser and
/// the chunked decoder never panic, and give the same result however the bytes arrive (whole, or
/// cut at `data[0]`). Panics when they do not.
#[doc(hidden)]
pub fn fuzz_one(data: &[u8]) {
    let Some((&cut, data)) = data.split_first() else {
        return;
    };
    let cut = usize::from(cut).min(data.len());
    let whole = describe_parse(data);
    // Fed in two reads: the first read's parse is partial or the same as the whole's.
    let mut rd = BytesMut::from(data.get(..cut).unwrap_or_default());
    if let Parsed::Partial = parse_head(&mut rd, &mut Vec::new()) {
        rd.extend_from_slice(data.get(cut..).unwrap_or_default());
        assert_eq!(describe(parse_head(&mut rd, &mut Vec::new()), &rd), whole);
    }
    assert_eq!(decode_chunked(data, &[cut]), decode_chunked(data, &[]));
}

/// A parse result and what it left in the buffer, comparable.
fn describe(p: Parsed, rest: &BytesMut) -> String {
    match p {
        Parsed::Request(h) => format!(
            "{} {} {:?} {:?} {} | {:?}",
            h.method, h.uri, h.headers, h.body, h.keep_alive, rest
        ),
        Parsed::Partial => "partial".into(),
        Parsed::HandOff => format!("hyper {rest:?}"),
    }
}

fn describe_parse(data: &[u8]) -> String {
    let mut rd = BytesMut::from(data);
    let p = parse_head(&mut rd, &mut Vec::new());
    describe(p, &rd)
}

/// Decodes `data` as a chunked body arriving in reads cut at `cuts`: the data, the trailers and
/// how it ended.
fn decode_chunked(data: &[u8], cuts: &[usize]) -> (Vec<u8>, Option<HeaderMap>, String) {
    let mut d = Decoder::new(Framing::Chunked);
    let mut rd = BytesMut::new();
    let mut out = Vec::new();
    let mut trailers = None;
    let mut from = 0;
    let mut cuts = cuts
        .iter()
        .copied()
        .filter(|&c| c <= data.len())
        .collect::<Vec<_>>();
    cuts.sort_unstable();
    cuts.push(data.len());
    let mut next = cuts.into_iter();
    let mut eof = false;
    loop {
        match read_body(&mut d, &mut rd, eof) {
            Ok(Step::Frame(f)) => match f.into_data() {
                Ok(b) => out.extend_from_slice(&b),
                Err(f) => trailers = f.into_trailers().ok(),
            },
            Ok(Step::End) => {
                rd.extend_from_slice(data.get(from..).unwrap_or_default());
                return (out, trailers, format!("end, left {rd:?}"));
            }
            Ok(Step::More) => match next.next() {
                Some(to) => {
                    rd.extend_from_slice(data.get(from..to).unwrap_or_default());
                    from = to;
                }
                None => eof = true,
            },
            Err(e) => return (out, trailers, format!("error {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use proptest::prelude::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn parse(bytes: &[u8]) -> (Parsed, BytesMut) {
        let mut rd = BytesMut::from(bytes);
        let p = parse_head(&mut rd, &mut Vec::new());
        (p, rd)
    }

    fn request(bytes: &[u8]) -> Head {
        match parse(bytes).0 {
            Parsed::Request(h) => h,
            other => panic!("not served here: {other:?}"),
        }
    }

    fn handed_off(bytes: &[u8]) -> bool {
        let (p, rest) = parse(bytes);
        // Handed over untouched: hyper reads the same bytes.
        matches!(p, Parsed::HandOff) && rest == bytes
    }

    #[test]
    fn an_ordinary_post_is_parsed_with_its_length_and_the_next_head_left_in_the_buffer() {
        let (p, rest) = parse(
            b"POST /openai/v1/chat?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nX-A: 1\r\nx-a: 2\r\n\r\nhelloGET / HTTP/1.1\r\n\r\n",
        );
        let Parsed::Request(h) = p else {
            panic!("{p:?}")
        };
        assert_eq!(h.method, Method::POST);
        assert_eq!(h.uri, "/openai/v1/chat?x=1");
        assert_eq!(h.headers.get_all("x-a").iter().count(), 2);
        assert!(matches!(h.body, Framing::Length(5)) && h.keep_alive);
        assert_eq!(&rest[..], b"helloGET / HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn chunked_alone_and_connection_close_are_read_as_hyper_reads_them() {
        let h = request(b"POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\nConnection: keep-alive, Close\r\n\r\n");
        assert!(matches!(h.body, Framing::Chunked) && !h.keep_alive);
        let h = request(b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert!(matches!(h.body, Framing::Length(0)) && h.keep_alive);
    }

    #[test]
    fn smuggling_shapes_and_unusual_requests_go_to_hyper_untouched() {
        for bytes in [
            &b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 0x5\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length:\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n",
            b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"GET / HTTP/1.0\r\n\r\n",
            b"CONNECT api.openai.com:443 HTTP/1.1\r\n\r\n",
            b"GET http://api.openai.com/ HTTP/1.1\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nX-A: 1\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Name: 1\r\n\r\n",
            b"GET /a b HTTP/1.1\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"\x16\x03\x01\x00\xa5\x01\x00\x00",
        ] {
            assert!(handed_off(bytes), "{:?}", String::from_utf8_lossy(bytes));
        }
    }

    #[test]
    fn a_head_split_at_every_byte_is_partial_until_its_last_byte() {
        let bytes = b"POST /v1/x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\r\n";
        for cut in 0..bytes.len() {
            assert!(matches!(parse(&bytes[..cut]).0, Parsed::Partial), "{cut}");
        }
        assert!(matches!(parse(bytes).0, Parsed::Request(_)));
    }

    #[test]
    fn an_oversize_head_or_too_many_headers_go_to_hyper() {
        let mut big = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', OWN_HEAD_MAX));
        assert!(handed_off(&big), "a partial head past the bound");
        big.extend_from_slice(b"\r\n\r\n");
        assert!(handed_off(&big), "a whole head past the bound");
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(handed_off(&many));
    }

    #[test]
    fn a_chunked_body_split_at_every_byte_decodes_the_same_with_extensions_and_trailers() {
        let body = b"5;name=\"v\"\r\nhello\r\n1A ; x\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Sum: 1\r\nX-Two: 2\r\n\r\nNEXT";
        let whole = decode_chunked(body, &[]);
        assert_eq!(whole.0, b"helloabcdefghijklmnopqrstuvwxyz");
        let t = whole.1.clone().unwrap();
        assert_eq!(t.get("x-sum").unwrap(), "1");
        assert_eq!(whole.2, "end, left b\"NEXT\"");
        for cut in 0..body.len() {
            assert_eq!(decode_chunked(body, &[cut]), whole, "{cut}");
        }
        let plain = decode_chunked(b"3\r\nabc\r\n0\r\n\r\n", &[1, 4, 9]);
        assert_eq!((plain.0.as_slice(), plain.1.is_none()), (&b"abc"[..], true));
    }

    #[test]
    fn broken_or_oversize_chunk_framing_is_an_error() {
        let long_ext = format!(
            "1;{}\r\na\r\n0\r\n\r\n",
            "e".repeat(codec::EXTENSIONS_LIMIT as usize)
        );
        let long_trailer = format!("0\r\nX: {}\r\n\r\n", "t".repeat(codec::TRAILER_LIMIT));
        for bad in [
            "x\r\n".to_string(),
            "\r\n".into(),
            "1\nab".into(),
            "1\r\nab\r\n".into(),
            "1;a\nb\r\n".into(),
            "1 2\r\n".into(),
            "10000000000000000\r\n".into(),
            "3\r\nab".into(),
            long_ext,
            long_trailer,
        ] {
            let (_, _, end) = decode_chunked(bad.as_bytes(), &[]);
            assert!(end.starts_with("error"), "{bad:?}: {end}");
        }
        let (data, _, end) = decode_chunked(b"2\r\nab\r\n0\r\n\r\n", &[]);
        assert_eq!(
            (data.as_slice(), end.as_str()),
            (&b"ab"[..], "end, left b\"\"")
        );
    }

    #[test]
    fn the_answer_head_is_hyper_s_shape() {
        let mut resp = Response::new(());
        resp.headers_mut()
            .insert("x-request-id", HeaderValue::from_static("req_1"));
        resp.headers_mut().insert(
            "content-type",
            HeaderValue::from_static("text/event-stream"),
        );
        let (mut parts, ()) = resp.into_parts();
        let mut out = Vec::new();
        let (enc, last) = encode_head(&mut parts, false, true, BodyLen::Unknown, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\nx-request-id: req_1\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\ndate: "), "{text}");
        assert!(text.ends_with(" GMT\r\n\r\n") && matches!(enc, Encoder::Chunked(None)) && !last);

        let mut resp = Response::new(());
        *resp.status_mut() = StatusCode::NOT_FOUND;
        let (mut parts, ()) = resp.into_parts();
        let mut out = Vec::new();
        let (enc, last) =
            encode_head(&mut parts, false, false, BodyLen::Known(7), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with(
                "HTTP/1.1 404 Not Found\r\nconnection: close\r\ncontent-length: 7\r\ndate: "
            ),
            "{text}"
        );
        assert!(matches!(enc, Encoder::Length(7)) && last);

        let mut resp = Response::new(());
        *resp.status_mut() = StatusCode::NO_CONTENT;
        resp.headers_mut()
            .insert("content-length", HeaderValue::from_static("0"));
        let (mut parts, ()) = resp.into_parts();
        let mut out = Vec::new();
        let (enc, _) = encode_head(&mut parts, false, true, BodyLen::Unknown, &mut out).unwrap();
        assert!(matches!(enc, Encoder::Length(0)), "a 204 has no body");
    }

    // ---- the differential against hyper's HTTP/1.1 server ----

    type Fields = Vec<(String, Vec<u8>)>;

    /// What the service saw of one request.
    #[derive(Debug, Clone, PartialEq)]
    struct Seen {
        method: String,
        target: String,
        version: String,
        headers: Vec<(String, Vec<u8>)>,
        /// The body and trailers, or that reading it failed; `None` while it is being read.
        body: Option<Result<(Vec<u8>, Fields), ()>>,
    }

    type BoxBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

    /// What it saw, and whether each request came through this module (not hyper).
    #[derive(Clone, Default)]
    struct Echo(Arc<Mutex<Vec<Seen>>>, Arc<Mutex<Vec<bool>>>);

    impl Service for Echo {
        type Body = BoxBody;
        type Future = Pin<Box<dyn Future<Output = Response<BoxBody>> + Send>>;

        fn call(&self, req: Request<Incoming>) -> Self::Future {
            let seen = self.0.clone();
            lock(&self.1).push(matches!(req.body(), Incoming::Own(_)));
            Box::pin(async move {
                let (head, body) = req.into_parts();
                let i = {
                    let mut s = lock(&seen);
                    s.push(Seen {
                        method: head.method.to_string(),
                        target: head.uri.to_string(),
                        version: format!("{:?}", head.version),
                        headers: head
                            .headers
                            .iter()
                            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                            .collect(),
                        body: None,
                    });
                    s.len() - 1
                };
                // `/skip` answers without reading the body (an early refusal).
                if head.uri.path() == "/skip" {
                    let mut resp = Response::new(
                        http_body_util::Full::new(Bytes::from_static(b"skipped"))
                            .map_err(|n| match n {})
                            .boxed(),
                    );
                    *resp.status_mut() = StatusCode::FORBIDDEN;
                    return resp;
                }
                let got = body.collect().await;
                let (status, answer) = match got {
                    Ok(c) => {
                        let trailers = c
                            .trailers()
                            .map(|t| {
                                t.iter()
                                    .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                                    .collect()
                            })
                            .unwrap_or_default();
                        let bytes = c.to_bytes();
                        lock(&seen)[i].body = Some(Ok((bytes.to_vec(), trailers)));
                        (StatusCode::OK, bytes)
                    }
                    Err(_) => {
                        lock(&seen)[i].body = Some(Err(()));
                        (StatusCode::BAD_REQUEST, Bytes::from_static(b"bad body"))
                    }
                };
                // A body of unknown length when the path asks for it: the chunked writer.
                let body: BoxBody = if head.uri.query() == Some("stream") {
                    let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
                        Ok(Frame::data(answer.clone())),
                        Ok(Frame::data(Bytes::from_static(b"!"))),
                    ];
                    http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed()
                } else {
                    http_body_util::Full::new(answer)
                        .map_err(|n| match n {})
                        .boxed()
                };
                let mut resp = Response::new(body);
                *resp.status_mut() = status;
                resp
            })
        }
    }

    /// Serves `input` (the client then waits, never closing) with hyper alone or with this
    /// module; what the service saw and what the client got, `date` values blanked.
    fn run(input: &[u8], own: bool) -> (Vec<Seen>, String) {
        let (seen, out, _) = run_via(input, own);
        (seen, out)
    }

    fn run_via(input: &[u8], own: bool) -> (Vec<Seen>, String, Vec<bool>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let (mut client, server) = tokio::io::duplex(1 << 20);
            let echo = Echo::default();
            client.write_all(input).await.unwrap();
            let serving: Pin<Box<dyn Future<Output = ()>>> = if own {
                Box::pin(Connection::new(Box::new(server), echo.clone(), false))
            } else {
                let io = hyper_util::rt::TokioIo::new(server);
                let conn =
                    super::super::http1_builder().serve_connection(io, ViaHyper(echo.clone()));
                Box::pin(async move {
                    let _ = conn.await;
                })
            };
            // Paused time: once everything waits, the clock jumps to the bound.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(60), serving).await;
            let mut got = Vec::new();
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(1),
                client.read_to_end(&mut got),
            )
            .await;
            let text = String::from_utf8_lossy(&got).into_owned();
            let blanked = regex::Regex::new("date: [^\r]*")
                .unwrap()
                .replace_all(&text, "date: -")
                .into_owned();
            let seen = lock(&echo.0).clone();
            let via = lock(&echo.1).clone();
            (seen, blanked, via)
        })
    }

    fn head_line() -> impl Strategy<Value = String> {
        let method = prop_oneof![
            4 => Just("GET"), 4 => Just("POST"), 1 => Just("HEAD"), 1 => Just("PUT"),
            1 => Just("CONNECT"), 1 => Just("G@T"),
        ];
        let target = prop_oneof![
            6 => Just("/v1/chat/completions"), 2 => Just("/skip"), 2 => Just("/a?stream"),
            1 => Just("/q?x=%41&y"), 1 => Just("*"), 1 => Just("http://h/p"), 1 => Just("/%zz"),
            1 => Just("/a\u{7f}"),
        ];
        let version =
            prop_oneof![8 => Just("HTTP/1.1"), 1 => Just("HTTP/1.0"), 1 => Just("HTTP/2.0")];
        (method, target, version).prop_map(|(m, t, v)| format!("{m} {t} {v}\r\n"))
    }

    fn header() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("Host: 127.0.0.1\r\n".to_string()),
            Just("Connection: close\r\n".to_string()),
            Just("Connection: keep-alive\r\n".to_string()),
            Just("Transfer-Encoding: chunked\r\n".to_string()),
            Just("Transfer-Encoding: gzip, chunked\r\n".to_string()),
            Just("Transfer-Encoding: chunked, gzip\r\n".to_string()),
            Just("Expect: 100-continue\r\n".to_string()),
            Just("Upgrade: h2c\r\n".to_string()),
            Just("X-Folded: a\r\n b\r\n".to_string()),
            Just("Bad Header: x\r\n".to_string()),
            Just("X-Obs: \u{e9}t\u{e9}\r\n".to_string()),
            (0u64..12).prop_map(|n| format!("Content-Length: {n}\r\n")),
            Just("Content-Length: 3, 3\r\n".to_string()),
            Just("Content-Length: -1\r\n".to_string()),
            "[a-zA-Z-]{1,8}".prop_map(|n| format!("X-{n}: v\r\n")),
        ]
    }

    fn body() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            2 => Just(Vec::new()),
            3 => proptest::collection::vec(b'a'..=b'z', 0..12),
            3 => (proptest::collection::vec(proptest::collection::vec(b'a'..=b'z', 1..6), 0..3),
                  any::<bool>(), any::<bool>())
                .prop_map(|(chunks, ext, trailer)| {
                    let mut out = Vec::new();
                    for c in chunks {
                        out.extend_from_slice(format!("{:x}", c.len()).as_bytes());
                        if ext {
                            out.extend_from_slice(b";e=1");
                        }
                        out.extend_from_slice(b"\r\n");
                        out.extend_from_slice(&c);
                        out.extend_from_slice(b"\r\n");
                    }
                    out.extend_from_slice(b"0\r\n");
                    if trailer {
                        out.extend_from_slice(b"X-T: 1\r\n");
                    }
                    out.extend_from_slice(b"\r\n");
                    out
                }),
        ]
    }

    fn requests() -> impl Strategy<Value = Vec<u8>> {
        let one = (
            head_line(),
            proptest::collection::vec(header(), 0..5),
            body(),
        )
            .prop_map(|(line, headers, body)| {
                let mut out = line.into_bytes();
                for h in headers {
                    out.extend_from_slice(h.as_bytes());
                }
                out.extend_from_slice(b"\r\n");
                out.extend(body);
                out
            });
        (
            proptest::collection::vec(one, 1..4),
            proptest::option::of((any::<prop::sample::Index>(), any::<u8>(), 0u8..3)),
        )
            .prop_map(|(reqs, change)| {
                let mut bytes = reqs.concat();
                if let Some((at, b, how)) = change {
                    if !bytes.is_empty() {
                        let i = at.index(bytes.len());
                        match how {
                            0 => bytes[i] = b,
                            1 => {
                                bytes.remove(i);
                            }
                            _ => bytes.insert(i, b),
                        }
                    }
                }
                bytes
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]
        #[test]
        fn serves_every_byte_sequence_as_hyper_s_http1_server_does(input in requests()) {
            let (hyper_seen, hyper_out) = run(&input, false);
            let (own_seen, own_out) = run(&input, true);
            prop_assert_eq!(&own_seen, &hyper_seen, "input {:?}", String::from_utf8_lossy(&input));
            prop_assert_eq!(own_out, hyper_out, "input {:?}", String::from_utf8_lossy(&input));
        }
    }

    #[test]
    fn pipelined_requests_are_answered_in_order_like_hyper() {
        let input = b"POST /v1/a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /v1/b HTTP/1.1\r\n\r\nPOST /a?stream HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nxy\r\n0\r\n\r\n";
        let (own_seen, own_out, via) = run_via(input, true);
        let (hyper_seen, hyper_out) = run(input, false);
        assert_eq!(
            via,
            [true, true, true],
            "served by keygate's own connection"
        );
        assert_eq!(own_seen, hyper_seen);
        assert_eq!(own_out, hyper_out);
        assert!(own_out.contains("\r\n\r\nabcHTTP/1.1 200 OK\r\ncontent-length: 0\r\ndate: -\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ndate: -\r\n\r\n2\r\nxy\r\n1\r\n!\r\n0\r\n\r\n"), "{own_out}");
    }

    #[test]
    fn a_head_answer_of_unknown_length_keeps_the_connection_for_the_next_request() {
        // Found by the differential: the bodiless answer must not close the connection.
        let input = b"HEAD /a?stream HTTP/1.1\r\n\r\n0\r\n\r\n";
        let (seen, out, via) = run_via(input, true);
        assert_eq!(via, [true]);
        assert!(out.ends_with("HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: -\r\n\r\n"), "{out}");
        assert_eq!((seen, out), run(input, false));
    }

    #[test]
    fn a_body_with_broken_framing_is_answered_and_the_connection_closed_like_hyper() {
        for input in [
            &b"POST /v1/a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nGET /v1/b HTTP/1.1\r\n\r\n"[..],
            b"POST /v1/a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabX\r\n0\r\n\r\nGET /v1/b HTTP/1.1\r\n\r\n",
        ] {
            let (seen, out, via) = run_via(input, true);
            assert_eq!(via, [true], "{out}");
            assert_eq!(seen[0].body, Some(Err(())));
            assert_eq!((seen, out), run(input, false));
        }
    }

    #[test]
    fn an_unread_body_is_drained_as_far_as_hyper_drains_it() {
        // Found by the differential: hyper reads an unread body two reads deep (one frame ahead,
        // one when the body is dropped) and closes the connection if that did not end it.
        for input in [
            &b"GET /skip HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n1\r\na\r\n0\r\n\r\nGET /v1/chat/completions HTTP/1.1\r\n\r\n"[..],
            b"GET /skip HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n2\r\nbc\r\n0\r\nX: 1\r\n\r\nGET /v1/chat/completions HTTP/1.1\r\n\r\n",
        ] {
            let (seen, out, via) = run_via(input, true);
            assert_eq!(via, [true], "{out}");
            assert_eq!((seen, out), run(input, false));
        }
        // Benign neighbours: a chunked body of one chunk (trailers or not) or none, or a whole
        // length-delimited one, is drained and the next request served.
        for input in [
            &b"GET /skip HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /v1/chat/completions HTTP/1.1\r\n\r\n"[..],
            b"GET /skip HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\nGET /v1/chat/completions HTTP/1.1\r\n\r\n",
            b"GET /skip HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2;e\r\nab\r\n0\r\nX: 1\r\n\r\nGET /v1/chat/completions HTTP/1.1\r\n\r\n",
            b"POST /skip HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /v1/chat/completions HTTP/1.1\r\n\r\n",
        ] {
            let (seen, out, via) = run_via(input, true);
            assert_eq!(via, [true, true], "{out}");
            assert_eq!((seen, out), run(input, false));
        }
    }

    #[test]
    fn a_request_after_an_unusual_one_is_served_by_hyper_as_before() {
        // HTTP/1.0 with keep-alive, then an ordinary request: hyper has the connection by then.
        let input = b"GET /v1/a HTTP/1.1\r\n\r\nGET /v1/b HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /v1/c HTTP/1.1\r\n\r\n";
        let (seen, out, via) = run_via(input, true);
        assert_eq!(via, [true, false, false]);
        assert_eq!((seen, out), run(input, false));
    }

    #[test]
    fn an_answer_before_the_body_is_read_closes_and_the_body_is_never_parsed_as_a_head() {
        // The body, not yet arrived in full, holds what looks like a request.
        let input =
            b"POST /skip HTTP/1.1\r\nContent-Length: 100\r\n\r\nGET /v1/smuggled HTTP/1.1\r\n\r\n";
        let (seen, out, via) = run_via(input, true);
        assert_eq!(via, [true]);
        assert!(out.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{out}");
        assert_eq!(out.matches("HTTP/1.1").count(), 1, "{out}");
        assert_eq!(run(input, false).0, seen);
    }
}
