//! keygate: a local credential broker for AI agents.
//!
//! The agent holds a narrow, revocable keygate token; keygate holds the provider's key. A request
//! follows the modules in this order, called by [`pipeline`]:
//!
//! `listen` → `guard` → `authenticate` → `route` → `authorize` → `credential` → `forward` →
//! `redact` → `audit`
//!
//! See ARCHITECTURE.md for the map and the invariants.

pub mod admin;
pub mod audit;
pub mod authenticate;
pub mod authorize;
pub mod cli;
pub mod config;
pub mod credential;
pub mod doctor;
pub mod error;
pub mod findkeys;
pub mod forward;
pub mod guard;
pub(crate) mod h1;
pub mod headerset;
pub mod hook;
pub mod init;
pub mod launcher;
pub mod listen;
pub mod local;
pub mod pipeline;
pub mod placeholder;
pub mod proxy;
pub mod redact;
pub mod reload;
pub mod route;
pub mod runtime;
pub mod scan;
pub mod secret;
pub mod serve;
pub mod service;
pub mod state;

/// Takes `m`'s lock. A lock poisoned by a panicking holder is taken as it is: what keygate keeps
/// under a `Mutex` stays usable after a panic, and refusing every later request over one panic
/// would turn a bug into an outage.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
