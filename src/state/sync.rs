//! Keeps a keygate's view of a shared store current: tokens, freezes and decided approvals are
//! re-read when another keygate announces a change (pub/sub) and, as a backstop for a lost
//! message or a reconnection, every [`RESYNC_EVERY`].

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;

use super::{Event, StateStore};
use crate::reload::Live;

/// The periodic re-sync: how stale a view can get if every event were lost.
pub const RESYNC_EVERY: Duration = Duration::from_secs(1);

/// Starts the task that applies the store's events to the running state.
pub fn spawn(live: Arc<Live>, store: Arc<dyn StateStore>) {
    let Some(mut events) = store.events() else {
        return;
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(RESYNC_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let event = tokio::select! {
                e = events.recv() => match e {
                    Ok(e) => e,
                    Err(RecvError::Lagged(_)) => Event::Resync,
                    Err(RecvError::Closed) => return,
                },
                _ = tick.tick() => Event::Resync,
            };
            let state = live.state.load_full();
            // The store's calls block (within their deadline); keep them off the workers.
            let _ = tokio::task::spawn_blocking(move || apply(&event, &state)).await;
        }
    });
}

fn apply(event: &Event, state: &crate::pipeline::State) {
    let control = &state.control;
    let freezes = || {
        if let Err(e) = control.sync_freezes() {
            tracing::warn!(error = %e, "cannot re-read freezes; keeping the last view");
        }
    };
    match event {
        Event::Tokens => state.tokens.refresh(),
        Event::Freezes => freezes(),
        Event::Approval(id) => control.approvals.sync_one(id),
        Event::Resync => {
            state.tokens.refresh();
            freezes();
            control.approvals.sync_waiting();
        }
    }
}
