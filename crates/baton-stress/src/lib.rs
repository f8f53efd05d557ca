//! baton's stress harness: scenarios that run real OS processes against any store, a
//! history of what they did, checkers that judge it, and a report.
//!
//! - [`history`]: the JSON Lines history (one [`history::Event`] per line, times on the
//!   host's monotonic clock), written by every process of a run with `O_APPEND`;
//! - [`intervals`]: who held which slot when, as the history proves it;
//! - [`check`]: one checker per property (limit, tokens, results, stale writes, recovery,
//!   barrier, unknown outcomes); the conformance suite uses the same ones;
//! - [`resource`]: the fenced results database the workers write;
//! - [`scenario`]: the orchestrator (storm, crash, pause, partition, workflow, single);
//! - [`worker`]: what each worker process does;
//! - [`recording`]: the store as a holder's keeper sees it, recording every renewal
//!   before the keeper acts on it (write-ahead lease ends);
//! - [`proxy`]: the fault proxy that cuts a holder off its server (`partition`, and the
//!   conformance suite's network properties);
//! - [`report`]: the self-contained HTML report;
//! - [`rng`]: the seeded generator behind every random choice.
//!
//! The harness does not open stores itself: the binary that embeds it passes its `open`
//! function (the `baton` CLI passes `baton::open_url`), so this crate depends only on
//! `baton-core`.

use std::sync::Arc;

use baton_core::{Result, Store, StoreUrl};

pub mod check;
pub mod clock;
pub mod command;
pub mod history;
pub mod intervals;
pub mod proxy;
pub mod recording;
pub mod report;
pub mod resource;
pub mod rng;
pub mod scenario;
pub mod stats;
pub mod worker;

/// Opens a store from its URL.
pub type OpenFn = fn(&StoreUrl) -> Result<Arc<dyn Store>>;
