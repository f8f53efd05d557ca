//! Histories for the checkers' tests.

use baton_core::{Holder, Key, Lease, Token};

use crate::history::Event;
use crate::resource::Row;

pub fn key() -> Key {
    Key::new("stress/checker").expect("key")
}

pub fn grant(pid: u32, t_request_ns: u64, t_ns: u64, slot: u32, token: u64) -> Event {
    Event::Grant {
        pid,
        t_ns,
        t_request_ns,
        lease: Lease {
            key: key(),
            slot,
            limit: 1,
            token: Token(token),
            holder: Holder::current(vec!["checker".into()]),
            ttl: None,
            acquired_unix_ms: 0,
            sent_at: None,
        },
    }
}

pub fn release(pid: u32, t_ns: u64, slot: u32, token: u64) -> Event {
    Event::Release {
        pid,
        t_ns,
        key: key(),
        slot,
        token: Token(token),
    }
}

pub fn start(pid: u32, t_ns: u64, id: u64) -> Event {
    Event::Start { pid, t_ns, id }
}

pub fn done(pid: u32, t_ns: u64, id: u64, outcome: &str) -> Event {
    Event::Done {
        pid,
        t_ns,
        id,
        outcome: outcome.into(),
        message: None,
    }
}

pub fn row(id: u64, pid: u32, token: u64, kind: &str) -> Row {
    Row {
        id,
        pid,
        fence_key: "stress/checker#0".into(),
        token,
        kind: kind.into(),
    }
}
