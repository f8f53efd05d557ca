//! The supervisor of a command run while holding a lease, through its public API.

use std::ffi::OsString;
use std::time::{Duration, Instant};

use baton_core::supervisor::{Exit, StopPolicy, Supervisor};

/// The deadline given with the go reaches the supervisor before the command starts, so
/// a holder that is paused (or never scheduled again) right after starting it cannot leave
/// it running with no deadline: here nothing else is ever said to the supervisor, and it
/// alone stops the command by the deadline.
#[test]
fn a_deadline_given_with_the_go_holds_the_command_from_its_start() {
    let argv: Vec<OsString> = vec!["sleep".into(), "30".into()];
    let stop = StopPolicy {
        grace: Duration::from_millis(100),
        reserve: Duration::from_millis(50),
    };
    let s = Supervisor::start(&argv, &[], &[], None, stop, false).expect("the supervisor");
    let by = Instant::now() + Duration::from_millis(300);
    let mut child = s.run(&[], Some(by)).expect("the command");
    // A liveness bound, not a timing assertion: without the deadline, sleep runs 30 s.
    let bound = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(exit) = child.try_wait().expect("wait for the command") {
            break exit;
        }
        assert!(
            Instant::now() < bound,
            "the command outlived the deadline it was started with"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        matches!(exit, Exit::Signal(libc::SIGTERM | libc::SIGKILL)),
        "stopped by the supervisor, not by itself: {exit:?}"
    );
    assert!(
        child.was_stopped(),
        "the supervisor says it stopped the group"
    );
}
