//! Barriers: a group of parties meets at a key, and all go on once `parties` have arrived.
//!
//! Semantics every store keeps:
//! - **Generations.** Arrivals are grouped in order: the first `parties` arrivals at a
//!   key form generation 0, the next `parties` generation 1, and so on, so one barrier
//!   serves every stage of a workflow. A party that arrives is counted in the current
//!   generation; when the count reaches `parties`, the generation passes and every party of
//!   it returns [`BarrierPassed`] with its number.
//! - **Give up cleanly.** A party that stops waiting (timeout, cancel, error) withdraws its
//!   arrival before it returns, unless its generation passed meanwhile (then it returns
//!   the pass): nothing of it stays behind (contract point 6).
//! - **Dead parties.** A party that dies while waiting leaves no permanent phantom
//!   arrival. Each store states its bound (the directory store: at once with kernel locks,
//!   within the lease TTL in lease mode; SQLite: within the arrival TTL; PostgreSQL: at
//!   the next arrival once the party's session is gone, within the ticket TTL while a
//!   stopped party's session lingers; etcd: when etcd expires the arrival's lease, within
//!   the arrival TTL).
//! - **No tight polling.** Waiters sleep until something changes (a file closed, the
//!   database written), with a slow backstop.
//! - **Same count.** A generation's parties must agree on `parties`; a different count
//!   fails with `LimitMismatch` while others of the generation wait.
//!
//! ```no_run
//! # async fn demo(store: std::sync::Arc<dyn baton_core::Store>) -> baton_core::Result<()> {
//! use std::time::Duration;
//! let key = baton_core::Key::new("nightly/stage-done")?;
//! let passed = baton_core::barrier::wait(&*store, &key, 4, Some(Duration::from_secs(60))).await?;
//! println!("generation {} passed", passed.generation);
//! # Ok(()) }
//! ```

use std::time::Duration;

use crate::{
    BarrierPassed, BarrierRequest, Error, ErrorKind, Holder, Key, Op, Result, Store, Wait,
};

/// Arrives at barrier `key` as this process and waits until `parties` parties have arrived
/// (forever with `timeout` `None`).
pub async fn wait(
    store: &dyn Store,
    key: &Key,
    parties: u32,
    timeout: Option<Duration>,
) -> Result<BarrierPassed> {
    let req = BarrierRequest {
        key: key.clone(),
        parties,
        wait: timeout.map_or(Wait::Forever, Wait::Timeout),
        holder: Holder::current(std::env::args().collect()),
    };
    validate(&req)?;
    store.barrier(&req).await
}

/// Checks what every store checks the same way: at least one party.
pub fn validate(req: &BarrierRequest) -> Result<()> {
    if req.parties == 0 {
        return Err(
            Error::new(ErrorKind::InvalidInput, "a barrier needs at least 1 party")
                .with_op(Op::Barrier)
                .with_key(&req.key),
        );
    }
    Ok(())
}
