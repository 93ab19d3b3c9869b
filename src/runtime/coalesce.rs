//! A connection task that wakes itself while it runs is polled again at once, not rescheduled.
//!
//! A downstream connection's task also drives its upstream connection (`forward::affinity`), so
//! within one poll it wakes itself twice per request: queueing the request wakes the upstream
//! connection's I/O half, and the answer it reads wakes the request waiting for it. tokio's
//! multi-thread scheduler reschedules a task woken while running as a yield, and a yield
//! notifies a parked worker: at one connection every request woke the other worker twice, which
//! took the I/O driver and went back to sleep (two futex calls and two or three context
//! switches each, measured with `perf` sched events). [`Coalesced`] polls its future with a
//! waker of its own: a wake that arrives during the poll, from this thread or another, is noted
//! and the future polled again before the poll returns; one that arrives between polls wakes the
//! task as before. After [`REPOLLS`] rounds in one poll the task yields as it would have, so a
//! connection that keeps waking itself still lets the others run.

use crate::lock;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

/// Polls repeated within one poll of the task before it yields to the scheduler.
const REPOLLS: usize = 4;

/// Nobody polls the future: a wake goes to the task.
const IDLE: u8 = 0;
/// The future is being polled: a wake is noted.
const POLLING: u8 = 1;
/// A wake was noted during the poll: the future is polled again.
const WOKEN: u8 = 2;

/// `F`, polled again within the same task poll when it wakes itself during one.
pub(crate) struct Coalesced<F> {
    inner: Pin<Box<F>>,
    signal: Arc<Signal>,
    /// `signal` as a waker, made once: the futures inside keep clones of it and compare with
    /// `will_wake`, which then holds across polls.
    waker: Waker,
}

struct Signal {
    state: AtomicU8,
    /// The task's own waker, for wakes that arrive between polls.
    task: Mutex<Option<Waker>>,
}

impl<F: Future> Coalesced<F> {
    pub(crate) fn new(inner: F) -> Self {
        let signal = Arc::new(Signal {
            state: AtomicU8::new(IDLE),
            task: Mutex::new(None),
        });
        Coalesced {
            inner: Box::pin(inner),
            waker: Waker::from(signal.clone()),
            signal,
        }
    }
}

impl<F: Future> Future for Coalesced<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        {
            let mut task = lock(&this.signal.task);
            if !task.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *task = Some(cx.waker().clone());
            }
        }
        let mut inner_cx = Context::from_waker(&this.waker);
        for _ in 0..REPOLLS {
            this.signal.state.store(POLLING, Ordering::SeqCst);
            if let Poll::Ready(out) = this.inner.as_mut().poll(&mut inner_cx) {
                this.signal.state.store(IDLE, Ordering::SeqCst);
                return Poll::Ready(out);
            }
            // A wake that lost this race found IDLE and woke the task itself.
            if this
                .signal
                .state
                .compare_exchange(POLLING, IDLE, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                return Poll::Pending;
            }
        }
        // Still waking itself: yield, as the task would have without this.
        this.signal.state.store(IDLE, Ordering::SeqCst);
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let mut state = self.state.load(Ordering::SeqCst);
        loop {
            match state {
                POLLING => match self.state.compare_exchange(
                    POLLING,
                    WOKEN,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                ) {
                    Ok(_) => return,
                    Err(now) => state = now,
                },
                WOKEN => return,
                _ => {
                    // Cloned out so the task is not woken under the lock.
                    let task = lock(&self.task).clone();
                    if let Some(task) = task {
                        task.wake();
                    }
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts the wakes the task gets.
    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Ready on its `ready`-th poll; wakes itself on the polls listed in `wake_on`.
    struct Script {
        polls: usize,
        ready: usize,
        wake_on: Vec<usize>,
        waker: Arc<Mutex<Option<Waker>>>,
    }

    impl Future for Script {
        type Output = usize;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<usize> {
            self.polls += 1;
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            if self.polls == self.ready {
                return Poll::Ready(self.polls);
            }
            if self.wake_on.contains(&self.polls) {
                cx.waker().wake_by_ref();
            }
            Poll::Pending
        }
    }

    fn script(ready: usize, wake_on: &[usize]) -> (Coalesced<Script>, Arc<Mutex<Option<Waker>>>) {
        let waker = Arc::new(Mutex::new(None));
        let s = Script {
            polls: 0,
            ready,
            wake_on: wake_on.to_vec(),
            waker: waker.clone(),
        };
        (Coalesced::new(s), waker)
    }

    #[test]
    fn a_future_that_wakes_itself_is_polled_again_without_waking_the_task() {
        let (mut f, _) = script(3, &[1, 2]);
        let count = Arc::new(Count::default());
        let task = Waker::from(count.clone());
        let out = Pin::new(&mut f).poll(&mut Context::from_waker(&task));
        assert_eq!(out, Poll::Ready(3));
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_future_that_does_not_wake_itself_is_polled_once() {
        let (mut f, _) = script(2, &[]);
        let count = Arc::new(Count::default());
        let task = Waker::from(count.clone());
        assert!(Pin::new(&mut f)
            .poll(&mut Context::from_waker(&task))
            .is_pending());
        assert_eq!(f.inner.polls, 1);
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_future_that_keeps_waking_itself_yields_to_the_task_after_a_few_polls() {
        let (mut f, _) = script(usize::MAX, &(1..100).collect::<Vec<_>>());
        let count = Arc::new(Count::default());
        let task = Waker::from(count.clone());
        assert!(Pin::new(&mut f)
            .poll(&mut Context::from_waker(&task))
            .is_pending());
        assert_eq!(f.inner.polls, REPOLLS);
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            1,
            "the task was woken to yield"
        );
    }

    #[test]
    fn a_wake_between_polls_reaches_the_task() {
        let (mut f, inner_waker) = script(usize::MAX, &[]);
        let count = Arc::new(Count::default());
        let task = Waker::from(count.clone());
        assert!(Pin::new(&mut f)
            .poll(&mut Context::from_waker(&task))
            .is_pending());
        let w = inner_waker.lock().unwrap().clone().unwrap();
        w.wake_by_ref();
        w.wake();
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_wake_from_another_thread_is_never_lost() {
        // The wake lands before, during or after the poll; each time either the future saw a
        // poll after it or the task was woken.
        for _ in 0..2_000 {
            let (mut f, inner_waker) = script(usize::MAX, &[]);
            let count = Arc::new(Count::default());
            let task = Waker::from(count.clone());
            assert!(Pin::new(&mut f)
                .poll(&mut Context::from_waker(&task))
                .is_pending());
            let w = inner_waker.lock().unwrap().clone().unwrap();
            let waking = std::thread::spawn(move || w.wake());
            let polls_before = f.inner.polls;
            let _ = Pin::new(&mut f).poll(&mut Context::from_waker(&task));
            waking.join().unwrap();
            let polled_after = f.inner.polls > polls_before + 1;
            let woken = count.0.load(Ordering::SeqCst) > 0;
            // A wake while the future was polled makes it poll again; any other wakes the task.
            assert!(polled_after || woken, "a wake was lost");
        }
    }
}
