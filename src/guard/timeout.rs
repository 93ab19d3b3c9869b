//! Deadlines on the two directions of a request, so a peer that stops sending or stops reading
//! cannot hold a connection, an upstream request and an unwritten audit record forever.
//!
//! - [`ReadTimeout`]: the request body must deliver a frame within the idle time once it is
//!   polled; otherwise it fails with [`BodyTimedOut`] (408 `request_body_timeout`).
//! - [`ResponseWatch`]: wraps the response body ([`Watched`]) to see when it hands hyper a frame
//!   and when hyper asks for the next; a watchdog task notices when hyper does not come back (the
//!   client stopped reading, so the socket or the HTTP/2 window is full) and closes the
//!   connection through its [`Closer`]. It also enforces a route's `max_response_time`. The
//!   [`Verdict`] tells the audit record why the body ended.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

use crate::audit::Reason;
use crate::error::{Code, Rejection};
use crate::forward::BoxError;
use crate::lock;

/// The request body sent nothing within the body timeout.
#[derive(Debug, thiserror::Error)]
#[error("the request body sent nothing for {0:?}")]
pub struct BodyTimedOut(pub Duration);

/// 408 `request_body_timeout`.
pub fn body_timeout_rejection(idle: Duration) -> Rejection {
    Rejection::new(
        Code::RequestBodyTimeout,
        format!("the request body sent nothing for {idle:?}; send the body without pauses"),
    )
}

/// A request body that fails when a frame takes longer than `idle` to arrive. The clock runs
/// only while the body is being read, so time spent before forwarding (a secret command, a
/// slow upstream not reading) is not counted against the client.
pub struct ReadTimeout<B> {
    inner: B,
    idle: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    waiting: bool,
    fired: Arc<AtomicBool>,
}

impl<B> ReadTimeout<B> {
    /// Wraps `inner`; each frame must arrive within `idle` of asking for it.
    pub fn new(inner: B, idle: Duration) -> Self {
        ReadTimeout {
            inner,
            idle,
            timer: None,
            waiting: false,
            fired: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Tells, after the body has been handed away, whether it failed by timing out.
    pub fn probe(&self) -> TimeoutProbe {
        TimeoutProbe {
            fired: self.fired.clone(),
            idle: self.idle,
        }
    }
}

/// Whether a [`ReadTimeout`] fired; turns the upstream error it caused into a 408.
#[derive(Clone)]
pub struct TimeoutProbe {
    fired: Arc<AtomicBool>,
    idle: Duration,
}

impl TimeoutProbe {
    /// Turns `other` into the 408 if the body timed out, else returns it unchanged.
    pub fn explain(&self, other: Rejection) -> Rejection {
        if self.fired.load(Ordering::Relaxed) {
            body_timeout_rejection(self.idle)
        } else {
            other
        }
    }
}

impl<B> HttpBody for ReadTimeout<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(f) => {
                this.waiting = false;
                Poll::Ready(f.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => {
                if !this.waiting {
                    // A new wait: the idle time counts from now, not from the last frame.
                    let deadline = Instant::now() + this.idle;
                    match &mut this.timer {
                        Some(timer) => timer.as_mut().reset(deadline),
                        None => this.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                    this.waiting = true;
                }
                let Some(timer) = this.timer.as_mut() else {
                    return Poll::Pending;
                };
                if timer.as_mut().poll(cx).is_ready() {
                    this.fired.store(true, Ordering::Relaxed);
                    return Poll::Ready(Some(Err(Box::new(BodyTimedOut(this.idle)))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Closes the connection a request came on; handed to the pipeline by `listen` (`pipeline::Conn`).
#[derive(Clone, Default)]
pub struct Closer {
    conn: Arc<Conn>,
    /// The connection's own task polls this request's response body (HTTP/1), so it can also
    /// watch it ([`WatchHost`]): no task of its own per response.
    hosted: bool,
}

#[derive(Default)]
struct Conn {
    notify: Notify,
    /// The response watch the connection's task hosts, if any.
    watch: Mutex<Option<Arc<Shared>>>,
}

impl Closer {
    /// Tells `listen` to drop the connection now, without waiting for a graceful close.
    pub fn close(&self) {
        self.conn.notify.notify_one();
    }

    /// Resolves once [`close`](Closer::close) is called; the connection's task waits on it.
    pub async fn closed(&self) {
        self.conn.notify.notified().await
    }

    /// The same connection's closer, for a request whose response body the connection's task
    /// polls itself (HTTP/1): that task then watches the response ([`WatchHost`]) instead of
    /// a task per response.
    pub fn hosting(&self) -> Closer {
        Closer {
            conn: self.conn.clone(),
            hosted: true,
        }
    }
}

/// The connection task's side of [`Closer::hosting`]: checks the current response's watch each
/// time the connection was polled, with one timer per connection armed only while a deadline
/// is pending (a frame handed to hyper and not yet taken, or `max_response_time`).
pub struct WatchHost {
    timer: Option<Pin<Box<Sleep>>>,
    armed: Option<Instant>,
}

impl Default for WatchHost {
    fn default() -> Self {
        WatchHost::new()
    }
}

impl WatchHost {
    /// A host with no timer yet.
    pub fn new() -> Self {
        WatchHost {
            timer: None,
            armed: None,
        }
    }

    /// Call after polling the connection: ready when the connection must be dropped now (the
    /// client stopped reading); the verdict is then set for the audit record.
    pub fn poll(&mut self, closer: &Closer, cx: &mut Context<'_>) -> Poll<()> {
        let mut slot = lock(&closer.conn.watch);
        let Some(shared) = slot.as_ref() else {
            self.armed = None;
            return Poll::Pending;
        };
        let mut s = lock(&shared.state);
        let next = match (s.done, s.handed_at) {
            (true, _) => None,
            (false, Some(t)) => Some(
                shared
                    .deadline
                    .map_or(t + shared.idle, |d| d.min(t + shared.idle)),
            ),
            (false, None) => shared.deadline,
        };
        let Some(next) = next else {
            if s.done {
                drop(s);
                *slot = None;
            }
            self.armed = None;
            return Poll::Pending;
        };
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(next)));
        if self.armed != Some(next) {
            timer.as_mut().reset(next);
            self.armed = Some(next);
        }
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.armed = None;
        let close = match check(&mut s, shared.idle, shared.deadline, Instant::now()) {
            Some(close) => close,
            None => {
                // Not due after all (the clock's rounding): look again on the next poll.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        };
        drop(s);
        *slot = None;
        if close {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

#[derive(Default)]
struct WatchState {
    /// Set when a frame was handed to hyper and it has not asked for the next one yet.
    handed_at: Option<Instant>,
    waker: Option<Waker>,
    verdict: Option<Reason>,
    done: bool,
}

struct Shared {
    state: Mutex<WatchState>,
    wake_task: Notify,
    idle: Duration,
    /// When `max_response_time` runs out.
    deadline: Option<Instant>,
    /// Watched by the connection's task ([`WatchHost`]), not a watchdog task.
    hosted: bool,
}

/// The write side of one response: see the module docs.
pub struct ResponseWatch {
    shared: Arc<Shared>,
}

impl ResponseWatch {
    /// Starts watching; `idle` is the route's idle time, `max_total` its `max_response_time`.
    pub fn start(idle: Duration, max_total: Option<Duration>, closer: Option<Closer>) -> Self {
        let now = Instant::now();
        let mut slot = closer
            .as_ref()
            .filter(|c| c.hosted)
            .map(|c| lock(&c.conn.watch));
        // HTTP/1 answers one request at a time, so the slot is free; should it not be, the
        // response gets a watchdog task like an HTTP/2 one.
        let hosted = slot
            .as_ref()
            .is_some_and(|w| w.as_ref().is_none_or(|w| lock(&w.state).done));
        let shared = Arc::new(Shared {
            state: Mutex::new(WatchState {
                // hyper has the head and will ask for the body when it can write.
                handed_at: Some(now),
                ..WatchState::default()
            }),
            wake_task: Notify::new(),
            idle,
            deadline: max_total.map(|m| now + m),
            hosted,
        });
        if hosted {
            if let Some(slot) = slot.as_mut() {
                **slot = Some(shared.clone());
            }
            return ResponseWatch { shared };
        }
        drop(slot);
        let task = shared.clone();
        tokio::spawn(async move { watchdog(task, closer).await });
        ResponseWatch { shared }
    }

    /// hyper asks for the next frame; `Some(reason)` when the response must end now.
    pub fn polled(&self, cx: &Context<'_>) -> Option<Reason> {
        let mut s = lock(&self.shared.state);
        s.handed_at = None;
        match &s.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => s.waker = Some(cx.waker().clone()),
        }
        s.verdict.clone()
    }

    /// A frame was handed to hyper.
    pub fn handed(&self) {
        lock(&self.shared.state).handed_at = Some(Instant::now());
    }

    /// Why the watchdog ended the response, if it did.
    pub fn verdict(&self) -> Option<Reason> {
        lock(&self.shared.state).verdict.clone()
    }

    /// A handle the audit record reads the verdict from when the body ends.
    pub fn verdict_handle(&self) -> Verdict {
        Verdict(self.shared.clone())
    }

    /// `body`, watched: see the module docs.
    pub fn wrap<B>(self, body: B) -> Watched<B> {
        Watched {
            inner: body,
            watch: self,
        }
    }

    /// The response ended; the watchdog stops.
    pub fn done(&self) {
        lock(&self.shared.state).done = true;
        if !self.shared.hosted {
            self.shared.wake_task.notify_one();
        }
    }
}

impl Drop for ResponseWatch {
    fn drop(&mut self) {
        self.done();
    }
}

/// Why a [`ResponseWatch`] ended its response, read when the body ends.
pub struct Verdict(Arc<Shared>);

impl Verdict {
    /// Why the response was ended, if the watch ended it.
    pub fn get(&self) -> Option<Reason> {
        lock(&self.0.state).verdict.clone()
    }
}

/// A response body under a [`ResponseWatch`].
pub struct Watched<B> {
    inner: B,
    watch: ResponseWatch,
}

/// The response ended early by the watch.
#[derive(Debug, thiserror::Error)]
#[error("response ended: {0:?}")]
pub struct Ended(pub Reason);

impl<B> HttpBody for Watched<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(reason) = this.watch.polled(cx) {
            return Poll::Ready(Some(Err(Box::new(Ended(reason)))));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => {
                this.watch.handed();
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => {
                this.watch.done();
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether the watch ends the response at `now`: `Some(true)` when the connection must be
/// closed (hyper is blocked writing), `Some(false)` when the body ends itself on its next poll,
/// `None` when nothing is due. Sets the verdict.
fn check(
    s: &mut WatchState,
    idle: Duration,
    deadline: Option<Instant>,
    now: Instant,
) -> Option<bool> {
    let stalled = s.handed_at.is_some_and(|t| now >= t + idle);
    let expired = deadline.is_some_and(|d| now >= d);
    if !(stalled || expired) {
        return None;
    }
    s.verdict = Some(if stalled {
        Reason::ClientStalled
    } else {
        Reason::MaxResponseTimeExceeded
    });
    if s.handed_at.is_some() {
        // hyper is blocked writing and will not poll the body again: only closing the
        // connection frees it (and drops the body, which writes the record).
        return Some(true);
    }
    if let Some(w) = s.waker.take() {
        // Waiting on the upstream: the body ends itself on its next poll.
        w.wake();
    }
    Some(false)
}

async fn watchdog(shared: Arc<Shared>, closer: Option<Closer>) {
    let (idle, deadline) = (shared.idle, shared.deadline);
    loop {
        let next = {
            let mut s = lock(&shared.state);
            if s.done {
                return;
            }
            let now = Instant::now();
            match check(&mut s, idle, deadline, now) {
                Some(true) => {
                    if let Some(c) = &closer {
                        c.close();
                    }
                    return;
                }
                Some(false) => return,
                None => {}
            }
            let mut next = s.handed_at.map_or(now + idle, |t| t + idle);
            if let Some(d) = deadline {
                next = next.min(d);
            }
            next
        };
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = shared.wake_task.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    struct Never;
    impl HttpBody for Never {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Pending
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_sends_nothing_fails_with_body_timed_out() {
        let body = ReadTimeout::new(Never, Duration::from_secs(5));
        let probe = body.probe();
        let e = body.collect().await.err().unwrap();
        assert!(e.is::<BodyTimedOut>(), "{e}");
        let r = probe.explain(Rejection::new(Code::BadRequest, "y"));
        assert_eq!(
            (r.status().as_u16(), r.code),
            (408, Code::RequestBodyTimeout)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_keeps_sending_is_not_cut() {
        let body = http_body_util::Full::new(Bytes::from_static(b"hello"));
        let body = ReadTimeout::new(body, Duration::from_secs(5));
        let probe = body.probe();
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
        let r = probe.explain(Rejection::new(Code::BadRequest, "y"));
        assert_eq!(r.code, Code::BadRequest);
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_hyper_stops_polling_closes_the_connection() {
        let closer = Closer::default();
        let watch = ResponseWatch::start(Duration::from_secs(5), None, Some(closer.clone()));
        watch.handed();
        tokio::time::timeout(Duration::from_secs(6), closer.closed())
            .await
            .unwrap();
        assert_eq!(watch.verdict(), Some(Reason::ClientStalled));
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_that_is_read_is_left_alone() {
        let closer = Closer::default();
        let watch = ResponseWatch::start(Duration::from_secs(5), None, Some(closer.clone()));
        let cx = Context::from_waker(Waker::noop());
        for _ in 0..10 {
            assert_eq!(watch.polled(&cx), None);
            tokio::time::sleep(Duration::from_secs(3)).await;
            watch.handed();
            assert_eq!(watch.polled(&cx), None);
        }
        assert_eq!(watch.verdict(), None);
        watch.done();
    }

    fn alive_tasks() -> usize {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    }

    #[tokio::test(start_paused = true)]
    async fn a_hosted_watch_needs_no_task_and_closes_a_connection_whose_client_stopped_reading() {
        let closer = Closer::default().hosting();
        let watch = ResponseWatch::start(Duration::from_secs(5), None, Some(closer.clone()));
        assert_eq!(alive_tasks(), 0);
        watch.handed();
        let mut host = WatchHost::new();
        let started = Instant::now();
        tokio::time::timeout(
            Duration::from_secs(6),
            std::future::poll_fn(|cx| host.poll(&closer, cx)),
        )
        .await
        .unwrap();
        assert!(started.elapsed() >= Duration::from_secs(5));
        assert_eq!(watch.verdict(), Some(Reason::ClientStalled));
    }

    #[tokio::test(start_paused = true)]
    async fn a_hosted_watch_of_a_response_that_is_read_is_left_alone() {
        let closer = Closer::default().hosting();
        let watch = ResponseWatch::start(Duration::from_secs(5), None, Some(closer.clone()));
        let mut host = WatchHost::new();
        let cx = &mut Context::from_waker(Waker::noop());
        for _ in 0..10 {
            assert_eq!(watch.polled(cx), None);
            assert!(host.poll(&closer, cx).is_pending());
            tokio::time::sleep(Duration::from_secs(3)).await;
            watch.handed();
            assert!(host.poll(&closer, cx).is_pending());
        }
        assert_eq!(watch.verdict(), None);
        watch.done();
        assert!(host.poll(&closer, cx).is_pending());
        // The slot is free again for the connection's next answer.
        let next = ResponseWatch::start(Duration::from_secs(5), None, Some(closer.clone()));
        assert_eq!(alive_tasks(), 0);
        drop(next);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hosted_watch_ends_a_response_past_max_response_time_through_its_body() {
        let closer = Closer::default().hosting();
        let watch = ResponseWatch::start(
            Duration::from_secs(60),
            Some(Duration::from_secs(2)),
            Some(closer.clone()),
        );
        let woken = Arc::new(Woken::default());
        let body_waker = Waker::from(woken.clone());
        // hyper waits on the body, which waits on the upstream.
        assert_eq!(watch.polled(&Context::from_waker(&body_waker)), None);
        let mut host = WatchHost::new();
        let outcome = tokio::time::timeout(
            Duration::from_secs(3),
            std::future::poll_fn(|cx| match host.poll(&closer, cx) {
                Poll::Ready(()) => Poll::Ready(true),
                Poll::Pending if woken.0.load(Ordering::Relaxed) => Poll::Ready(false),
                Poll::Pending => Poll::Pending,
            }),
        )
        .await
        .unwrap();
        assert!(
            !outcome,
            "the connection is not closed: the body ends itself"
        );
        assert_eq!(watch.verdict(), Some(Reason::MaxResponseTimeExceeded));
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_answer_on_a_hosting_connection_gets_a_watchdog_task() {
        let closer = Closer::default().hosting();
        let first = ResponseWatch::start(Duration::from_secs(5), None, Some(closer.clone()));
        let second = ResponseWatch::start(Duration::from_secs(5), None, Some(closer.clone()));
        assert_eq!(alive_tasks(), 1);
        second.handed();
        tokio::time::timeout(Duration::from_secs(6), closer.closed())
            .await
            .unwrap();
        assert_eq!(second.verdict(), Some(Reason::ClientStalled));
        drop(first);
    }

    #[derive(Default)]
    struct Woken(AtomicBool);

    impl std::task::Wake for Woken {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
}
