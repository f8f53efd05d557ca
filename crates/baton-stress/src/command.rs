//! A command that is slow to stop, for the scenarios and properties that check a holder's
//! whole process group is dead before its slot can be granted again: the shell handles
//! SIGTERM slowly, one grandchild ignores SIGTERM (only SIGKILL ends it), another is an
//! ordinary background process.

use std::path::Path;
use std::time::Duration;

use baton_core::KeeperConfig;

/// The shell script of a command slow to stop: its SIGTERM handler takes `half_grace`,
/// and a grandchild ignores SIGTERM. With `pids`, each of its three processes appends its
/// pid to that file.
pub fn slow_to_stop(half_grace: Duration, pids: Option<&Path>) -> String {
    let half = half_grace.as_secs_f64();
    let note = |who: &str| match pids {
        Some(p) => format!(" echo {who} >> '{}';", p.display()),
        None => String::new(),
    };
    format!(
        "(trap '' TERM; exec sleep 3600) &{}\n\
         sleep 3600 &{}\n\
         trap 'sleep {half:.3}; exit 0' TERM\n\
         {}\n\
         while :; do sleep 0.05; done\n",
        note("$!"),
        note("$!"),
        note("$$").trim_start().trim_end_matches(';'),
    )
}

/// The largest kill grace `baton run` accepts for `ttl`, so that a stop takes as long as
/// the contract allows.
pub fn largest_grace(ttl: Duration) -> Duration {
    let config = KeeperConfig::for_ttl(ttl);
    config.max_stop_lead().saturating_sub(config.kill_reserve())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_names_its_processes_when_asked() {
        let s = slow_to_stop(Duration::from_millis(150), Some(Path::new("/tmp/p")));
        assert_eq!(s.matches(">> '/tmp/p'").count(), 3, "{s}");
        assert!(s.contains("sleep 0.150; exit 0"), "{s}");
        let quiet = slow_to_stop(Duration::from_millis(150), None);
        assert!(!quiet.contains(">>"), "{quiet}");
        assert_eq!(
            largest_grace(Duration::from_secs(30)),
            Duration::from_millis(13_450)
        );
    }
}
