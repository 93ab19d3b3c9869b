//! When the writer thread hears of a new batch: once the runtime thread that queued its first
//! record has nothing left to run, not in the middle of that request's answer.
//!
//! Waking the writer is a futex call, and where keygate runs on one CPU the woken writer
//! preempts the request thread at once; done from the record's `append` (which runs as the
//! answer's body ends, before hyper writes it), both sat between the upstream's answer and the
//! agent's copy of it. A runtime thread (`serve` registers [`on_park`] as tokio's
//! `on_thread_park`) instead owes the wake-up and pays it just before it parks, after the answer
//! went out. Bounds: a thread that has never parked (a blocking-pool thread, or before the first
//! park) wakes at once, as does a record that someone waits on; and while a busy thread does not
//! park, the next record appended by any thread wakes the writer once the batch is
//! [`super::BATCH_WINDOW`] old.

use std::cell::{Cell, RefCell};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use super::Shared;

thread_local! {
    /// This thread runs [`on_park`] before it goes idle.
    static PARKS: Cell<bool> = const { Cell::new(false) };
    /// The log whose writer this thread owes a wake-up.
    static OWED: RefCell<Option<Weak<Shared>>> = const { RefCell::new(None) };
}

/// tokio's `on_thread_park` hook: pays the wake-up this thread owes, if any.
pub fn on_park() {
    PARKS.set(true);
    if let Some(shared) = OWED.take().and_then(|w| w.upgrade()) {
        fire(&shared);
    }
}

/// Whether this thread runs [`on_park`] before it goes idle, so it can owe a wake-up.
pub(super) fn parks() -> bool {
    PARKS.get()
}

/// Makes this thread owe the wake-up for `shared`'s batch, whose first record it just appended
/// (and marked owed, under the batch lock); it is paid at this thread's next park.
pub(super) fn owe(shared: &Arc<Shared>) {
    let before = OWED.replace(Some(Arc::downgrade(shared)));
    // Another log (a reload opened a new one) is owed too: pay that one now.
    if let Some(other) = before.and_then(|w| w.upgrade()) {
        if !Arc::ptr_eq(&other, shared) {
            fire(&other);
        }
    }
}

/// Wakes the writer if a wake-up is still owed (another thread may have paid it).
pub(super) fn fire(shared: &Shared) {
    if shared.owed.swap(false, Ordering::AcqRel) {
        shared.wake.notify_one();
    }
}
