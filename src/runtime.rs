//! Which runtime thread serves a connection.
//!
//! With `[server] runtime = "per-core"` keygate runs one single-threaded runtime per CPU and hands
//! each accepted connection to the least busy one; a connection and everything it does (its
//! requests, its upstream connection) then stay on that thread, with no work stealing and no
//! wake-ups across threads. With `"shared"` one work-stealing runtime serves everything.

use std::cell::Cell;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The index of the per-core runtime this thread runs (0 on any other thread).
pub(crate) fn worker() -> usize {
    WORKER.with(Cell::get)
}
