//! Inputs for the parsers' property tests of every crate: mutations of valid examples
//! (truncation, byte flips, the pieces parsers trip on, repeats) and bounded arbitrary text.
//! Included by each crate's parser tests (`#[path]`), so the generators are written once.

use proptest::prelude::*;

/// Pieces a mutation inserts: the bytes parsers trip on.
pub const NASTY: &[&str] = &[
    "\0",
    "\u{7f}",
    "\u{e9}",
    "\u{202e}",
    "\u{1f600}",
    "18446744073709551616",
    "99999999999999999999999999999999999999",
    "-1",
    "+1",
    "%",
    "%zz",
    "%+1",
    "..",
    "/",
    "//",
    ":",
    "@",
    "?",
    "&",
    "=",
    "\\",
    "[",
    "]",
    ",",
    " ",
    "\n",
    "1e999",
    "0",
];

/// One mutation of a valid example: truncated, a byte flipped, a nasty piece inserted,
/// or its tail repeated; the bytes are then read as UTF-8, lossily.
pub fn mutated(valid: Vec<&'static str>) -> impl Strategy<Value = String> {
    (
        proptest::sample::select(valid),
        0usize..4,
        any::<prop::sample::Index>(),
        any::<u8>(),
        proptest::sample::select(NASTY.to_vec()),
        1usize..8,
    )
        .prop_map(|(seed, how, at, byte, piece, times)| {
            let mut b = seed.as_bytes().to_vec();
            let i = at.index(b.len() + 1);
            match how {
                0 => b.truncate(i),
                1 if !b.is_empty() => {
                    let j = i.min(b.len() - 1);
                    b[j] ^= byte | 1;
                }
                2 => {
                    for _ in 0..times {
                        b.splice(i..i, piece.bytes());
                    }
                }
                _ => {
                    let tail = b[i..].to_vec();
                    for _ in 0..times {
                        b.extend_from_slice(&tail);
                    }
                }
            }
            String::from_utf8_lossy(&b).into_owned()
        })
}

/// Arbitrary text, bounded: any unicode, or mostly the characters a URL splits on.
pub fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,200}",
        "[a-z0-9./_:@?&=%,\\[\\] -]{0,200}",
        proptest::collection::vec(any::<u8>(), 0..200)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ]
}
