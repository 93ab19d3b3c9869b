//! Tunnels keygate passes through without inspection (`egress_allow`, `egress = "tunnel"`), and
//! the idle watch every tunnel has.
//!
//! A tunnel never reaches keygate itself: an address DNS gives is refused when it is loopback
//! or unspecified, and an `egress_connect` address when it is one of keygate's listeners.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::connect::Target;
use crate::error::{Code, Rejection};

/// Connects to an allowed target: its `egress_connect` address, else what DNS says.
pub(super) async fn open(
    target: &Target,
    mapped: &[(String, SocketAddr)],
    own: &[SocketAddr],
    connect_timeout: Duration,
) -> Result<TcpStream, Rejection> {
    let to_keygate = || {
        Err(Rejection::new(
            Code::ConnectToKeygate,
            format!(
                "{} leads to this machine (keygate itself); refused",
                target.host
            ),
        ))
    };
    let addrs: Vec<SocketAddr> = match mapped.iter().find(|(h, _)| *h == target.host) {
        Some((_, a)) => {
            if own
                .iter()
                .any(|o| o.port() == a.port() && (o.ip() == a.ip() || o.ip().is_unspecified()))
            {
                return to_keygate();
            }
            vec![*a]
        }
        None => {
            let found = tokio::time::timeout(
                connect_timeout,
                tokio::net::lookup_host((target.host.as_str(), target.port)),
            )
            .await;
            let addrs: Vec<SocketAddr> = match found {
                Ok(Ok(a)) => a.collect(),
                _ => Vec::new(),
            };
            if addrs
                .iter()
                .any(|a| a.ip().is_loopback() || a.ip().is_unspecified())
            {
                return to_keygate();
            }
            // Link-local holds cloud metadata services (169.254.169.254): never by DNS.
            if addrs.iter().any(|a| link_local(a.ip())) {
                return Err(Rejection::new(
                    Code::EgressDenied,
                    format!("{} resolves to a link-local address; refused", target.host),
                ));
            }
            addrs
        }
    };
    for a in &addrs {
        if let Ok(Ok(s)) = tokio::time::timeout(connect_timeout, TcpStream::connect(a)).await {
            let _ = s.set_nodelay(true);
            return Ok(s);
        }
    }
    Err(Rejection::new(
        Code::TunnelUnreachable,
        format!("{}:{} could not be reached", target.host, target.port),
    ))
}

fn link_local(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_link_local(),
        std::net::IpAddr::V6(v6) => {
            (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6
                    .to_ipv4_mapped()
                    .is_some_and(|v4| v4.is_link_local() || v4.is_loopback())
        }
    }
}

/// Copies both ways until either side closes or the tunnel is idle for `idle`.
pub(super) async fn pass<C>(client: C, upstream: TcpStream, idle: Duration)
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client, watch) = Activity::new(client);
    let mut upstream = Activity {
        inner: upstream,
        last: watch.last.clone(),
        epoch: watch.epoch,
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
        _ = watch.idle(idle) => {}
    }
}

/// A stream that notes when a byte last moved either way.
pub(super) struct Activity<S> {
    inner: S,
    last: Arc<AtomicU64>,
    epoch: Instant,
}

/// Waits for a stream's idleness.
pub(super) struct Watch {
    last: Arc<AtomicU64>,
    epoch: Instant,
}

impl<S> Activity<S> {
    pub(super) fn new(inner: S) -> (Activity<S>, Watch) {
        let last = Arc::new(AtomicU64::new(0));
        let epoch = Instant::now();
        (
            Activity {
                inner,
                last: last.clone(),
                epoch,
            },
            Watch { last, epoch },
        )
    }

    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }
}

impl Watch {
    /// Returns once nothing moved for `idle`.
    pub(super) async fn idle(&self, idle: Duration) {
        loop {
            let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
            let quiet = self.epoch.elapsed().saturating_sub(last);
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle - quiet + Duration::from_millis(10)).await;
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Activity<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Activity<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.touch();
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_local_and_mapped_loopback_answers_are_caught_and_public_ones_pass() {
        for bad in [
            "169.254.169.254",
            "fe80::1",
            "::ffff:169.254.169.254",
            "::ffff:127.0.0.1",
        ] {
            assert!(link_local(bad.parse().unwrap()), "{bad}");
        }
        for ok in ["140.82.112.6", "2606:4700::1111", "10.0.0.5"] {
            assert!(!link_local(ok.parse().unwrap()), "{ok}");
        }
    }
}
