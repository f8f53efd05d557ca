//! What `baton status`, `list` and `break` say, built the same way on every store.
//!
//! Guarantees: one vocabulary. A slot freed by break, a slot above a lowered limit, a
//! lost lease held back by the lock-delay and a key name that is not a key read the same
//! on every store; `list` answers sorted, without duplicates, and a stored name that is
//! not a valid key is `Corrupt` (never skipped silently, never a panic).

use std::time::Duration;

use crate::{format_duration, Error, ErrorKind, Holder, Key, SlotState, SlotStatus, Token};

/// The note of a slot held above a limit that was lowered by resize.
pub fn above_limit_note(limit: u32) -> String {
    format!("above the limit of {limit} (the key was resized down): held until released")
}

/// The note of a slot whose lease was lost and is held back by the key's lock-delay.
pub fn held_back_note(delay: Duration, left: Option<Duration>) -> String {
    match left {
        Some(left) => format!(
            "held back: a lost lease's slot, free again in about {} (lock-delay {})",
            format_duration(left),
            format_duration(delay)
        ),
        None => format!(
            "lost: the next acquire holds the slot back for the lock-delay of {}",
            format_duration(delay)
        ),
    }
}

/// A slot that `break` freed: free now, with the token and holder it had. `was_live` is
/// false when the lease had already ended on its own (expired, or the server removed it).
pub fn broken(
    slot: u32,
    token: Option<Token>,
    holder: Option<Holder>,
    since_unix_ms: Option<u64>,
    was_live: bool,
) -> SlotStatus {
    let mut st = SlotStatus::free(slot);
    debug_assert_eq!(st.state, SlotState::Free);
    st.token = token;
    st.holder = holder;
    st.since_unix_ms = since_unix_ms;
    st.note = Some(if was_live {
        "freed by break; its holder's next renew answers lost".into()
    } else {
        "had already expired; nothing was held".into()
    });
    st
}

/// The keys named by a store's entries, sorted and without duplicates. `names` yields the
/// key part of each entry and the entry's full name (for the error). A name that is not a
/// valid key is `Corrupt`.
pub fn keys_from_names<'a>(
    names: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<Vec<Key>, Error> {
    let mut keys = Vec::new();
    for (key, entry) in names {
        keys.push(Key::new(key).map_err(|_| {
            Error::new(
                ErrorKind::Corrupt,
                format!("{entry} names '{key}', which is not a valid key"),
            )
        })?);
    }
    keys.sort();
    keys.dedup();
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_sorted_deduplicated_and_checked() {
        let keys = keys_from_names([("b", "x/b#limit"), ("a", "x/a#limit"), ("b", "x/b#limit")])
            .expect("keys");
        let names: Vec<&str> = keys.iter().map(Key::as_str).collect();
        assert_eq!(names, ["a", "b"]);
        let e = keys_from_names([("bad\u{0}", "x/bad#limit")]).expect_err("corrupt");
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(e.message().contains("x/bad#limit"));
    }

    #[test]
    fn broken_slots_are_free_and_say_why() {
        let s = broken(1, Some(Token(7)), None, Some(5), true);
        assert_eq!(s.state, SlotState::Free);
        assert_eq!(s.token, Some(Token(7)));
        assert!(s.note.as_deref().unwrap_or("").contains("freed by break"));
    }
}
