//! HTTP/2 with prior knowledge (h2c) told from HTTP/1.1 by the client's first bytes, in one read.
//!
//! hyper-util's `auto` connection reads exactly the 24 bytes of the HTTP/2 preface first, then
//! HTTP/1.1 reads the rest of the first request in a read of its own: one more `recvfrom` (and
//! readiness poll) per fresh connection. Here the first read takes whatever the client sent, up
//! to [`FIRST_READ`] bytes; the protocol it shows then reads those bytes first ([`Rewind`]).
//! The decision is `auto`'s: HTTP/2 exactly when the first 24 bytes are the preface, HTTP/1.1
//! as soon as a byte differs from it or the client closed before sending all of them.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use hyper::body::Incoming;
use hyper::service::HttpService;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What an HTTP/2 client with prior knowledge sends first (RFC 9113, section 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The first read's size: a whole ordinary request head (and a small body) in one read;
/// whatever does not fit is read by the protocol as usual.
const FIRST_READ: usize = 4096;

/// What the bytes read so far show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seen {
    Http1,
    Http2,
    /// A prefix of the preface so far: only more bytes tell.
    More,
}

fn seen(first: &[u8]) -> Seen {
    let n = first.len().min(PREFACE.len());
    if first.get(..n) != PREFACE.get(..n) {
        Seen::Http1
    } else if n == PREFACE.len() {
        Seen::Http2
    } else {
        Seen::More
    }
}

/// A stream whose first reads return bytes already read from it.
pub(super) struct Rewind<S> {
    pre: Vec<u8>,
    at: usize,
    io: S,
}

impl<S> Rewind<S> {
    /// `io`, whose first reads return `pre`.
    pub(super) fn new(pre: Vec<u8>, io: S) -> Self {
        Rewind { pre, at: 0, io }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(left) = this.pre.get(this.at..).filter(|l| !l.is_empty()) {
            let n = left.len().min(buf.remaining());
            buf.put_slice(left.get(..n).unwrap_or_default());
            this.at += n;
            if this.at == this.pre.len() {
                // Read through: the connection may live for hours.
                this.pre = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

type Io<S> = TokioIo<Rewind<S>>;

/// One connection served as HTTP/1.1 or HTTP/2, whichever its first bytes show: the
/// counterpart of hyper-util's `auto::Connection`, with the same builders as before.
// HTTP/1.1 unboxed: the usual case, a box would cost every connection an allocation; the
// enum sits once in its connection's task and the small variant only comes first.
#[allow(clippy::large_enum_variant)]
pub(super) enum Served<S, Svc>
where
    Svc: HttpService<Incoming>,
{
    Sniffing(Option<Sniffing<S, Svc>>),
    Http1(hyper::server::conn::http1::Connection<Io<S>, Svc>),
    /// Boxed: twice HTTP/1.1's size, and rare (h2c clients are few).
    Http2(Box<hyper::server::conn::http2::Connection<Io<S>, Svc, TokioExecutor>>),
    Done,
}

pub(super) struct Sniffing<S, Svc> {
    io: S,
    /// The bytes read so far.
    got: Vec<u8>,
    /// Where they are read into: capacity only, so no read pays for zeroing it.
    scratch: Vec<u8>,
    svc: Svc,
    http1: hyper::server::conn::http1::Builder,
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
}

impl<S, Svc> Served<S, Svc>
where
    Svc: HttpService<Incoming>,
{
    /// Serves `io` with `svc`, in HTTP/1.1 by `http1` or HTTP/2 by `http2`.
    pub(super) fn new(
        io: S,
        svc: Svc,
        http1: hyper::server::conn::http1::Builder,
        http2: hyper::server::conn::http2::Builder<TokioExecutor>,
    ) -> Self {
        Self::with_first(io, Vec::new(), svc, http1, http2)
    }

    /// As [`Served::new`], `first` being bytes already read from `io` (`h1` read them).
    pub(super) fn with_first(
        io: S,
        first: Vec<u8>,
        svc: Svc,
        http1: hyper::server::conn::http1::Builder,
        http2: hyper::server::conn::http2::Builder<TokioExecutor>,
    ) -> Self {
        Served::Sniffing(Some(Sniffing {
            io,
            got: first,
            scratch: Vec::new(),
            svc,
            http1,
            http2,
        }))
    }
}

/// The builders `listen` serves HTTP/2 with (HTTP/1.1's is `listen::http1_builder`).
pub(super) fn http2_builder(
    max_header_list_size: u32,
    ping_every: std::time::Duration,
) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.max_header_list_size(max_header_list_size)
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(ping_every))
        .keep_alive_timeout(ping_every);
    b
}

impl<S, Svc, B> Served<S, Svc>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Svc: HttpService<Incoming, ResBody = B> + Unpin,
    Svc::Future: Send + 'static,
    Svc::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// As `auto::Connection::graceful_shutdown`: a connection whose protocol is not known yet
    /// has sent no request, and ends.
    pub(super) fn graceful_shutdown(self: Pin<&mut Self>) {
        let this = self.get_mut();
        match this {
            Served::Sniffing(_) => *this = Served::Done,
            Served::Http1(c) => Pin::new(c).graceful_shutdown(),
            Served::Http2(c) => Pin::new(&mut **c).graceful_shutdown(),
            Served::Done => {}
        }
    }
}

impl<S, Svc, B> std::future::Future for Served<S, Svc>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Svc: HttpService<Incoming, ResBody = B> + Unpin,
    Svc::Future: Send + 'static,
    Svc::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            match this {
                Served::Sniffing(s) => {
                    let Some(sn) = s.as_mut() else {
                        *this = Served::Done;
                        continue;
                    };
                    let mut seen_now = seen(&sn.got);
                    if seen_now == Seen::More {
                        if sn.scratch.capacity() == 0 {
                            sn.scratch = Vec::with_capacity(FIRST_READ);
                        }
                        let mut rb = ReadBuf::uninit(sn.scratch.spare_capacity_mut());
                        match ready!(Pin::new(&mut sn.io).poll_read(cx, &mut rb)) {
                            Err(_) => {
                                // A connection error is the client's; nothing to report.
                                *this = Served::Done;
                                continue;
                            }
                            Ok(()) if rb.filled().is_empty() => seen_now = Seen::Http1,
                            Ok(()) => {
                                sn.got.extend_from_slice(rb.filled());
                                continue;
                            }
                        }
                    }
                    let Some(sn) = s.take() else {
                        *this = Served::Done;
                        continue;
                    };
                    let Sniffing {
                        io,
                        got,
                        svc,
                        http1,
                        http2,
                        ..
                    } = sn;
                    let io = TokioIo::new(Rewind {
                        pre: got,
                        at: 0,
                        io,
                    });
                    *this = if seen_now == Seen::Http2 {
                        Served::Http2(Box::new(http2.serve_connection(io, svc)))
                    } else {
                        Served::Http1(http1.serve_connection(io, svc))
                    };
                }
                Served::Http1(c) => {
                    let _ = ready!(Pin::new(c).poll(cx));
                    *this = Served::Done;
                }
                Served::Http2(c) => {
                    let _ = ready!(Pin::new(c).poll(cx));
                    *this = Served::Done;
                }
                Served::Done => return Poll::Ready(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// hyper-util's `ReadVersion`, read for read: HTTP/2 once 24 bytes equal the preface,
    /// HTTP/1.1 as soon as a read brings a byte that differs or brings nothing.
    fn auto_decides(reads: &[Vec<u8>]) -> (Seen, usize) {
        let mut got: Vec<u8> = Vec::new();
        for r in reads {
            let room = PREFACE.len() - got.len();
            let take = &r[..r.len().min(room)];
            if take.is_empty() {
                return (Seen::Http1, got.len());
            }
            let len = got.len();
            got.extend_from_slice(take);
            if got[len..] != PREFACE[len..got.len()] {
                return (Seen::Http1, got.len());
            }
            if got.len() == PREFACE.len() {
                return (Seen::Http2, got.len());
            }
        }
        (Seen::Http1, got.len())
    }

    /// This module's decision over the same reads (each read at most what was sent in it).
    fn one_read_decides(reads: &[Vec<u8>]) -> Seen {
        let mut got: Vec<u8> = Vec::new();
        for r in reads {
            if r.is_empty() {
                return Seen::Http1;
            }
            got.extend_from_slice(r);
            match seen(&got) {
                Seen::More => {}
                s => return s,
            }
        }
        Seen::Http1
    }

    fn reads() -> impl Strategy<Value = Vec<Vec<u8>>> {
        // Mostly the preface, cut anywhere and sometimes changed in one byte, then anything.
        (
            0usize..=PREFACE.len(),
            proptest::option::of((0usize..PREFACE.len(), any::<u8>())),
            proptest::collection::vec(any::<u8>(), 0..40),
            proptest::collection::vec(1usize..30, 1..6),
            any::<bool>(),
        )
            .prop_map(|(keep, change, tail, cuts, close)| {
                let mut bytes = PREFACE[..keep].to_vec();
                if let Some((i, b)) = change {
                    if let Some(x) = bytes.get_mut(i) {
                        *x = b;
                    }
                }
                bytes.extend(tail);
                let mut out = Vec::new();
                let mut rest = &bytes[..];
                for c in cuts {
                    let (a, b) = rest.split_at(c.min(rest.len()));
                    if !a.is_empty() {
                        out.push(a.to_vec());
                    }
                    rest = b;
                }
                if !rest.is_empty() {
                    out.push(rest.to_vec());
                }
                if close {
                    out.push(Vec::new());
                }
                out
            })
    }

    proptest! {
        #[test]
        fn one_read_sniff_decides_as_hyper_utils_auto(reads in reads()) {
            prop_assert_eq!(one_read_decides(&reads), auto_decides(&reads).0);
        }
    }

    #[test]
    fn the_preface_in_one_read_with_a_frame_after_it_is_http2() {
        let mut first = PREFACE.to_vec();
        first.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        assert_eq!(seen(&first), Seen::Http2);
        assert_eq!(seen(&PREFACE[..10]), Seen::More);
        assert_eq!(seen(b"POST /openai/v1/chat HTTP/1.1\r\n"), Seen::Http1);
        assert_eq!(seen(b"PRI * HTTP/1.1\r\n"), Seen::Http1);
        assert_eq!(seen(b""), Seen::More);
    }

    #[tokio::test]
    async fn rewind_reads_the_first_bytes_then_the_stream() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut a, b) = tokio::io::duplex(64);
        let mut r = Rewind {
            pre: b"GET / HT".to_vec(),
            at: 0,
            io: b,
        };
        a.write_all(b"TP/1.1\r\n\r\n").await.unwrap();
        drop(a);
        let mut out = Vec::new();
        r.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, b"GET / HTTP/1.1\r\n\r\n");
    }
}
