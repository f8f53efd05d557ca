//! The standard errors every store gives, in one wording.
//!
//! Guarantees: the same state reads the same on every store. A user who learned what
//! `all 2 slot(s) are held` or `the key has a limit of 4 slot(s), not 2` means on one
//! store reads it again, word for word, on the next. Each function returns a bare error
//! (kind and message, plus the data a caller acts on such as the current limit); the
//! store or the context layer adds the operation, key and store.

use std::time::Duration;

use crate::{format_duration, Error, ErrorKind};

/// `Busy` for a no-wait acquire: every slot is held. `ahead` is how many earlier requests
/// wait for the slots that are left (a queueing store that can count them), `held_back`
/// how long a lost lease's slot is still held back by the key's lock-delay of `delay`.
pub fn busy(
    held: u32,
    limit: u32,
    ahead: Option<u32>,
    held_back: Option<(Duration, Duration)>,
) -> Error {
    let msg = if let Some((delay, left)) = held_back {
        format!(
            "{held} of {limit} slot(s) are held, and a lost lease's slot is held back by the \
             key's lock-delay of {} for about another {}",
            format_duration(delay),
            format_duration(left)
        )
    } else if held >= limit {
        format!("all {limit} slot(s) are held")
    } else {
        match ahead {
            Some(n) => format!(
                "{held} of {limit} slot(s) are held and {n} earlier request(s) wait for the rest"
            ),
            None => {
                format!("{held} of {limit} slot(s) are held and earlier requests wait for the rest")
            }
        }
    };
    Error::new(ErrorKind::Busy, msg)
}

/// `LimitMismatch`: the key exists with limit `have`; the request asked for `asked`.
pub fn limit_mismatch(have: u32, asked: u32) -> Error {
    Error::new(
        ErrorKind::LimitMismatch,
        format!(
            "the key has a limit of {have} slot(s), not {asked} (use -n {have}, or another key)"
        ),
    )
    .with_current_limit(have)
}

/// `NotFound` for status or break: the key does not exist.
pub fn no_such_key() -> Error {
    Error::new(
        ErrorKind::NotFound,
        "no such key (a key is created by its first acquire)",
    )
}

/// `NotFound` for resize: the key does not exist, and resize does not create keys.
pub fn no_such_key_to_resize() -> Error {
    Error::new(
        ErrorKind::NotFound,
        "no such key (a key is created by its first acquire, with its limit)",
    )
}

/// `InvalidInput`: a limit of zero (acquire or resize).
pub fn limit_zero() -> Error {
    Error::new(ErrorKind::InvalidInput, "the limit must be at least 1 slot")
}

/// Checks a new limit for resize: at least 1, at most `max`.
pub fn check_limit(limit: u32, max: u32) -> Result<(), Error> {
    if limit == 0 {
        return Err(limit_zero());
    }
    if limit > max {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("the limit must be at most {max} slots, not {limit}"),
        ));
    }
    Ok(())
}

/// `Busy` for delete: the key is in use. `held` slots are held, `waiting` requests wait
/// (`None`: the store cannot count them), and `held_back` slots of lost leases are still
/// held back by the key's lock-delay.
pub fn in_use(held: usize, waiting: Option<u32>, held_back: usize) -> Error {
    let mut parts = Vec::new();
    if held > 0 {
        parts.push(format!("{held} slot(s) held"));
    }
    if held_back > 0 {
        parts.push(format!(
            "{held_back} lost lease slot(s) still held back by the lock-delay"
        ));
    }
    match waiting {
        Some(n) if n > 0 => parts.push(format!("{n} request(s) waiting")),
        _ => {}
    }
    in_use_because(&parts.join(", "))
}

/// `Busy` for delete on a store that knows requests wait for the key but cannot count
/// them.
pub fn in_use_by_waiters() -> Error {
    in_use_because("requests are waiting")
}

fn in_use_because(why: &str) -> Error {
    Error::new(
        ErrorKind::Busy,
        format!(
            "the key is in use ({why}); delete removes only a key nobody holds or waits for \
             (wait for them, or `baton break` the holders first)"
        ),
    )
}

/// How many times a store retries a resize's or a delete's compare-and-set when another
/// request changed the key between its read and its write.
pub const RESIZE_TRIES: usize = 100;

/// `Unavailable`: [`RESIZE_TRIES`] compare-and-sets in a row found the key changed under
/// them; `what` is what they tried (`resize it`).
pub fn kept_changing(what: &str) -> Error {
    Error::new(
        ErrorKind::Unavailable,
        format!("the key kept changing under {RESIZE_TRIES} attempts to {what}"),
    )
}

/// The barrier's give-up: `Busy` for a no-wait arrival (`timeout` is `None`), `Timeout`
/// when the wait ran out; the arrival was withdrawn either way.
pub fn barrier_gave_up(timeout: Option<Duration>) -> Error {
    match timeout {
        None => Error::new(ErrorKind::Busy, "not every party has arrived"),
        Some(_) => Error::new(
            ErrorKind::Timeout,
            "not every party arrived in time; this arrival was withdrawn",
        ),
    }
}

/// `Corrupt`: something baton reads back from the store is not what baton writes.
/// `what` names it (`the holder record of slot 2`), `why` says what is wrong.
pub fn corrupt(what: impl std::fmt::Display, why: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Corrupt, format!("{what} {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_reads_the_same_everywhere() {
        assert_eq!(busy(2, 2, None, None).message(), "all 2 slot(s) are held");
        assert_eq!(
            busy(1, 2, Some(3), None).message(),
            "1 of 2 slot(s) are held and 3 earlier request(s) wait for the rest"
        );
        assert!(busy(
            1,
            2,
            None,
            Some((Duration::from_secs(5), Duration::from_secs(2)))
        )
        .message()
        .contains("lock-delay of 5s for about another 2s"));
        assert_eq!(busy(2, 2, None, None).kind(), ErrorKind::Busy);
    }

    #[test]
    fn limit_mismatch_carries_the_limit() {
        let e = limit_mismatch(4, 2);
        assert_eq!(e.kind(), ErrorKind::LimitMismatch);
        assert_eq!(e.current_limit(), Some(4));
        assert!(e.message().contains("use -n 4"));
    }

    #[test]
    fn limits_are_checked() {
        assert!(check_limit(1, 10).is_ok());
        assert_eq!(
            check_limit(0, 10).expect_err("zero").kind(),
            ErrorKind::InvalidInput
        );
        assert!(check_limit(11, 10)
            .expect_err("big")
            .message()
            .contains("at most 10"));
    }

    #[test]
    fn barrier_give_ups() {
        assert_eq!(barrier_gave_up(None).kind(), ErrorKind::Busy);
        let e = barrier_gave_up(Some(Duration::from_secs(1)));
        assert_eq!(e.kind(), ErrorKind::Timeout);
        assert!(e.message().contains("withdrawn"));
    }
}
