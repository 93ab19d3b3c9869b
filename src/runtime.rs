//! Which runtime thread serves a connection (`connections.runtime`).
//!
//! With `"per-core"` keygate runs one single-threaded runtime per CPU ([`start`]) and hands each
//! accepted connection to the one with the fewest connections ([`spawn_conn`]); a connection and
//! everything it does (its requests, its upstream connection) then stay on that thread, with no
//! work stealing and no wake-ups across threads. Accepting, signals, reloads and the admin socket
//! stay on the main runtime. With `"shared"` one work-stealing runtime serves everything, and
//! with one CPU both are a single current-thread runtime.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

mod coalesce;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The per-core runtimes, once started.
static WORKERS: OnceLock<Workers> = OnceLock::new();

struct Workers {
    handles: Vec<Handle>,
    /// Connections each runtime serves now.
    load: Arc<[AtomicUsize]>,
    /// Each runtime's thread and what tells it to stop.
    threads: Mutex<Vec<(std::thread::JoinHandle<()>, oneshot::Sender<()>)>>,
}

/// The number of the per-core runtime this thread runs, from 1 (0 on any other thread).
pub(crate) fn worker() -> usize {
    WORKER.with(Cell::get)
}

/// Starts `n` single-threaded runtimes, each on a thread of its own.
pub fn start(n: usize) -> Result<(), String> {
    let mut handles = Vec::with_capacity(n);
    let mut threads = Vec::with_capacity(n);
    for i in 0..n {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            // Audit records queued here wake the writer once this thread idles (`audit::wake`).
            .on_thread_park(crate::audit::on_park)
            .build()
            .map_err(|e| format!("cannot start the runtime: {e}"))?;
        handles.push(rt.handle().clone());
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("keygate-core-{i}"))
            .spawn(move || {
                WORKER.with(|w| w.set(i + 1));
                let _ = rt.block_on(stop_rx);
                // Connections still open are dropped; each request's `audit::Pending` then
                // writes its record (`aborted`).
                rt.shutdown_timeout(Duration::from_secs(2));
            })
            .map_err(|e| format!("cannot start a runtime thread: {e}"))?;
        threads.push((thread, stop_tx));
    }
    let load: Arc<[AtomicUsize]> = (0..n).map(|_| AtomicUsize::new(0)).collect();
    let workers = Workers {
        handles,
        load,
        threads: Mutex::new(threads),
    };
    WORKERS
        .set(workers)
        .map_err(|_| "the runtimes were already started".to_string())
}

/// Stops the per-core runtimes (if any), dropping the connections they still serve.
pub fn stop() {
    let Some(w) = WORKERS.get() else { return };
    let threads = match w.threads.lock() {
        Ok(mut g) => std::mem::take(&mut *g),
        Err(p) => std::mem::take(&mut *p.into_inner()),
    };
    let mut joins = Vec::with_capacity(threads.len());
    for (thread, stop) in threads {
        let _ = stop.send(());
        joins.push(thread);
    }
    for t in joins {
        let _ = t.join();
    }
}

/// Counts a connection against its runtime while it is served.
struct Load(Arc<[AtomicUsize]>, usize);

impl Drop for Load {
    fn drop(&mut self) {
        self.0[self.1].fetch_sub(1, Ordering::Relaxed);
    }
}

/// Runs a connection's task: on the per-core runtime serving the fewest connections (this
/// thread's own when it is one), else on the current runtime.
pub(crate) fn spawn_conn<F>(fut: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    // The connection's task wakes itself twice per request (`coalesce`).
    let fut = coalesce::Coalesced::new(fut);
    let Some(w) = WORKERS.get() else {
        tokio::spawn(fut);
        return;
    };
    let i = match worker() {
        0 => {
            let mut best = 0;
            let mut least = usize::MAX;
            for (i, l) in w.load.iter().enumerate() {
                let n = l.load(Ordering::Relaxed);
                if n < least {
                    best = i;
                    least = n;
                }
            }
            best
        }
        own => own - 1,
    };
    w.load[i].fetch_add(1, Ordering::Relaxed);
    let load = Load(w.load.clone(), i);
    let task = async move {
        let _load = load;
        fut.await
    };
    if worker() == i + 1 {
        tokio::spawn(task);
    } else {
        w.handles[i].spawn(task);
    }
}
