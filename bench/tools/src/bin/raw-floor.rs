//! The floor without hyper: what HTTP/1.1 forwarding costs when the proxy parses the request
//! head in place (httparse), writes the rewritten head and body upstream in one write on the
//! downstream connection's own upstream connection, and relays the answer as it arrives (nginx's
//! design). Same job as `floor-proxy` (check one bearer token, swap in the provider key, route
//! `/openai/*`), no policy, audit or redaction. It measures how much of the hyper floor's cost an
//! HTTP/1 path outside hyper's server and client dispatchers could remove (issue 13).
//!
//! A probe, not a proxy to deploy: it speaks only what the bench sends and the fake upstream
//! answers (requests with `Content-Length`, answers with `Content-Length` or `chunked`), and it
//! closes the connection on anything else.
//!
//! Usage: raw-floor --upstream 127.0.0.1:PORT --token T --key K [--threads N] [--current-thread]
//! Prints `{"ok":true,"listen":"http://127.0.0.1:PORT"}` like `keygate serve`.
#![allow(clippy::unwrap_used)]
use std::io;
use std::sync::Arc;

use keygate_bench_tools::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct State {
    upstream: String,
    want: Vec<u8>,
    /// `authorization: Bearer KEY\r\nhost: UPSTREAM\r\n`
    attach: Vec<u8>,
}

fn main() {
    let args = Args::from_env();
    let threads = args.num("threads", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let rt = if args.has("current-thread") {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build().unwrap()
    };
    let upstream = args.get("upstream").expect("--upstream").trim_start_matches("http://").trim_end_matches('/').to_string();
    let want = format!("Bearer {}", args.get("token").expect("--token")).into_bytes();
    let attach = format!("authorization: Bearer {}\r\nhost: {upstream}\r\n", args.get("key").expect("--key")).into_bytes();
    let st = Arc::new(State { upstream, want, attach });
    rt.block_on(async move {
        let listener = TcpListener::bind(("127.0.0.1", args.num::<u16>("port", 0))).await.unwrap();
        println!("{{\"ok\":true,\"listen\":\"http://{}\"}}", listener.local_addr().unwrap());
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let _ = stream.set_nodelay(true);
            let st = st.clone();
            tokio::spawn(async move {
                let _ = serve(stream, &st).await;
            });
        }
    });
}

fn bad() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "not what the probe speaks")
}

/// Reads until `buf[..*filled]` holds at least `want` bytes; false at EOF.
async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>, filled: &mut usize, want: usize) -> io::Result<bool> {
    while *filled < want {
        if buf.len() < want.max(*filled + 4096) {
            buf.resize(want.max(*filled + 4096), 0);
        }
        let n = s.read(&mut buf[*filled..]).await?;
        if n == 0 {
            return Ok(false);
        }
        *filled += n;
    }
    Ok(true)
}

async fn serve(mut down: TcpStream, st: &State) -> io::Result<()> {
    let mut up: Option<TcpStream> = None;
    let mut buf = vec![0u8; 8192];
    let mut filled = 0usize;
    let mut out: Vec<u8> = Vec::with_capacity(8192);
    let mut ubuf = vec![0u8; 16384];
    loop {
        // The request head, parsed where it was read.
        let (head_len, body_len) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf[..filled]).map_err(|_| bad())? {
                httparse::Status::Complete(n) => {
                    let mut len = 0usize;
                    let mut authorized = false;
                    out.clear();
                    let path = req.path.ok_or_else(bad)?;
                    let Some(rest) = path.strip_prefix("/openai") else {
                        down.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n").await?;
                        return Ok(());
                    };
                    out.extend_from_slice(req.method.ok_or_else(bad)?.as_bytes());
                    out.push(b' ');
                    out.extend_from_slice(rest.as_bytes());
                    out.extend_from_slice(b" HTTP/1.1\r\n");
                    for h in req.headers.iter() {
                        if h.name.eq_ignore_ascii_case("authorization") {
                            authorized = h.value == st.want.as_slice();
                            continue;
                        }
                        if h.name.eq_ignore_ascii_case("host") || h.name.eq_ignore_ascii_case("connection") {
                            continue;
                        }
                        if h.name.eq_ignore_ascii_case("content-length") {
                            len = std::str::from_utf8(h.value).ok().and_then(|v| v.trim().parse().ok()).ok_or_else(bad)?;
                        }
                        if h.name.eq_ignore_ascii_case("transfer-encoding") {
                            return Err(bad());
                        }
                        out.extend_from_slice(h.name.as_bytes());
                        out.extend_from_slice(b": ");
                        out.extend_from_slice(h.value);
                        out.extend_from_slice(b"\r\n");
                    }
                    if !authorized {
                        down.write_all(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n").await?;
                        return Ok(());
                    }
                    out.extend_from_slice(&st.attach);
                    out.extend_from_slice(b"\r\n");
                    break (n, len);
                }
                httparse::Status::Partial => {
                    if filled == buf.len() && buf.len() >= 64 * 1024 {
                        return Err(bad());
                    }
                    let want = filled + 1;
                    if !fill(&mut down, &mut buf, &mut filled, want).await? {
                        return Ok(());
                    }
                }
            }
        };
        if !fill(&mut down, &mut buf, &mut filled, head_len + body_len).await? {
            return Ok(());
        }
        out.extend_from_slice(&buf[head_len..head_len + body_len]);
        buf.copy_within(head_len + body_len..filled, 0);
        filled -= head_len + body_len;
        if up.is_none() {
            let s = TcpStream::connect(st.upstream.as_str()).await?;
            s.set_nodelay(true)?;
            up = Some(s);
        }
        let u = up.as_mut().ok_or_else(bad)?;
        u.write_all(&out).await?;
        relay(u, &mut down, &mut ubuf).await?;
    }
}

/// Relays one answer from `u` to `down` as it arrives: the head, then a `Content-Length` body or
/// a `chunked` one (passed through as it is, its framing followed to find its end).
async fn relay(u: &mut TcpStream, down: &mut TcpStream, ubuf: &mut Vec<u8>) -> io::Result<()> {
    let mut filled = 0usize;
    let (head_len, framing) = loop {
        let n = u.read(&mut ubuf[filled..]).await?;
        if n == 0 {
            return Err(bad());
        }
        filled += n;
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(h) = resp.parse(&ubuf[..filled]).map_err(|_| bad())? {
            let mut framing = None;
            for hd in resp.headers.iter() {
                if hd.name.eq_ignore_ascii_case("content-length") {
                    let len: usize = std::str::from_utf8(hd.value).ok().and_then(|v| v.trim().parse().ok()).ok_or_else(bad)?;
                    framing = Some(Some(len));
                } else if hd.name.eq_ignore_ascii_case("transfer-encoding") && hd.value.eq_ignore_ascii_case(b"chunked") {
                    framing = Some(None);
                }
            }
            break (h, framing.ok_or_else(bad)?);
        }
        if filled == ubuf.len() {
            return Err(bad());
        }
    };
    match framing {
        Some(len) => {
            let mut left = (head_len + len).saturating_sub(filled);
            down.write_all(&ubuf[..filled.min(head_len + len)]).await?;
            while left > 0 {
                let n = u.read(ubuf).await?;
                if n == 0 {
                    return Err(bad());
                }
                let n = n.min(left);
                down.write_all(&ubuf[..n]).await?;
                left -= n;
            }
        }
        None => {
            // Follow the chunk sizes over what passes through; done at the zero-size chunk's CRLF.
            let mut chunks = Chunks::default();
            let mut done = chunks.feed(&ubuf[head_len..filled])?;
            down.write_all(&ubuf[..filled]).await?;
            while !done {
                let n = u.read(ubuf).await?;
                if n == 0 {
                    return Err(bad());
                }
                done = chunks.feed(&ubuf[..n])?;
                down.write_all(&ubuf[..n]).await?;
            }
        }
    }
    Ok(())
}

/// Where a chunked body is: in a size line, in data, or in the CRLF after data; the last chunk's
/// trailer section is taken to be empty (the fake upstream sends none).
#[derive(Default)]
struct Chunks {
    size: usize,
    in_size: bool,
    data_left: usize,
    crlf_left: usize,
    last: bool,
    started: bool,
}

impl Chunks {
    fn feed(&mut self, mut b: &[u8]) -> io::Result<bool> {
        if !self.started {
            self.started = true;
            self.in_size = true;
        }
        while !b.is_empty() {
            if self.data_left > 0 {
                let n = self.data_left.min(b.len());
                self.data_left -= n;
                b = &b[n..];
                if self.data_left == 0 {
                    self.crlf_left = 2;
                }
            } else if self.crlf_left > 0 {
                self.crlf_left -= 1;
                b = &b[1..];
                if self.crlf_left == 0 {
                    if self.last {
                        return Ok(true);
                    }
                    self.in_size = true;
                    self.size = 0;
                }
            } else if self.in_size {
                let c = b[0];
                b = &b[1..];
                match c {
                    b'0'..=b'9' => self.size = self.size * 16 + usize::from(c - b'0'),
                    b'a'..=b'f' => self.size = self.size * 16 + usize::from(c - b'a' + 10),
                    b'A'..=b'F' => self.size = self.size * 16 + usize::from(c - b'A' + 10),
                    b'\r' => {}
                    b'\n' => {
                        self.in_size = false;
                        if self.size == 0 {
                            self.last = true;
                            self.crlf_left = 2;
                        } else {
                            self.data_left = self.size;
                        }
                    }
                    _ => return Err(bad()),
                }
            } else {
                return Err(bad());
            }
        }
        Ok(false)
    }
}
