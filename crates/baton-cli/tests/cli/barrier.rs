//! `baton barrier KEY --parties N`: all go on once N have arrived; reusable by
//! generation; a timeout withdraws the arrival; a dead party does not count.

use crate::stress::stores;
use crate::util::{wait_until, Dir};

/// Waits until a party waits at barrier `key` of the directory store.
fn wait_arrival(dir: &Dir, key: &str) {
    let arrivals = dir.store_dir().join("+barriers").join(key);
    wait_until("the first party arrived", || {
        std::fs::read_dir(&arrivals).is_ok_and(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("arr."))
        })
    });
}

#[test]
fn parties_pass_together_and_the_barrier_is_reused() {
    let dir = Dir::new();
    for store in stores(&dir) {
        for generation in 0..2 {
            let first = dir
                .bare(&["-s", &store, "barrier", "b", "--parties", "3", "-w", "60s"])
                .spawn();
            let second = dir
                .bare(&["-s", &store, "barrier", "b", "--parties", "3", "-w", "60s"])
                .spawn();
            let third = dir
                .bare(&["-s", &store, "barrier", "b", "--parties", "3", "--json"])
                .output();
            third.code(0);
            let v: serde_json::Value = serde_json::from_str(third.stdout.trim()).expect("json");
            assert_eq!(v["generation"], generation, "{store}: {v}");
            for party in [first, second] {
                party
                    .finish()
                    .code(0)
                    .stdout_has(&format!("generation {generation} passed (3 parties)"));
            }
        }
    }
}

#[test]
fn a_timeout_withdraws_the_arrival() {
    let dir = Dir::new();
    for store in stores(&dir) {
        let args = [
            "-s",
            &store,
            "barrier",
            "t",
            "--parties",
            "2",
            "-w",
            "200ms",
        ];
        dir.bare(&args)
            .output()
            .code(75)
            .one_error_line()
            .stderr_has("withdrawn");
        // Had the first arrival stayed, the next party would pass alone.
        dir.bare(&args).output().code(75);
    }
}

#[test]
fn a_dead_party_does_not_count_with_kernel_locks() {
    let dir = Dir::new();
    let waiting = dir.cmd(&["barrier", "d", "--parties", "2"]).spawn();
    wait_arrival(&dir, "d");
    waiting.signal(libc::SIGKILL);
    waiting.finish();
    dir.cmd(&["barrier", "d", "--parties", "2", "-w", "500ms"])
        .output()
        .code(75);
}

#[test]
fn parties_must_agree_and_bad_input_is_refused() {
    let dir = Dir::new();
    let waiting = dir
        .cmd(&["barrier", "m", "--parties", "3", "-w", "60s"])
        .spawn();
    wait_arrival(&dir, "m");
    dir.cmd(&["barrier", "m", "--parties", "2"])
        .output()
        .code(2)
        .one_error_line()
        .stderr_has("3 parties");
    waiting.signal(libc::SIGTERM);
    waiting.finish();
    dir.cmd(&["barrier", "m", "--parties", "0"])
        .output()
        .code(2);
    dir.cmd(&["barrier", "bad..key", "--parties", "2"])
        .output()
        .code(2);
    dir.bare(&["-s", "noop:", "barrier", "n", "--parties", "2"])
        .output()
        .code(69)
        .one_error_line()
        .stderr_has("does not support");
}
