//! Holder identity: who holds a lease, precisely enough that a PID reused after a reboot
//! or after the holder's death is never mistaken for the holder.

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::{unix_ms, Error, ErrorKind};

/// A random 128-bit holder id, printed as 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HolderId(pub u128);

impl HolderId {
    /// A fresh random id from the OS's random source.
    pub fn random() -> HolderId {
        let mut bytes = [0u8; 16];
        if getrandom::getrandom(&mut bytes).is_err() {
            // The OS random source is unavailable (very old kernel, seccomp): fall back to
            // the time and pid, which is still unique enough to tell holders apart.
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            return HolderId(now ^ (u128::from(std::process::id()) << 96));
        }
        HolderId(u128::from_be_bytes(bytes))
    }
}

impl fmt::Display for HolderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for HolderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HolderId({self})")
    }
}

impl FromStr for HolderId {
    type Err = Error;
    fn from_str(s: &str) -> Result<HolderId, Error> {
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("invalid holder id '{s}': expected 32 hex digits"),
            ));
        }
        u128::from_str_radix(s, 16).map(HolderId).map_err(|e| {
            Error::new(
                ErrorKind::InvalidInput,
                format!("invalid holder id '{s}': {e}"),
            )
        })
    }
}

impl Serialize for HolderId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HolderId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<HolderId, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Who holds a lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// Random id, unique per holder.
    pub id: HolderId,
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// The process's start time in clock ticks after boot (`/proc/PID/stat` field 22);
    /// with `boot_id` it tells a live holder from a reused PID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_start: Option<u64>,
    /// The kernel's boot id (`/proc/sys/kernel/random/boot_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// User name (or the numeric uid when it has no name).
    pub user: String,
    /// The command the holder runs or protects, as argv.
    #[serde(default)]
    pub command: Vec<String>,
    /// When the holder started, in milliseconds since the Unix epoch (display only).
    pub started_unix_ms: u64,
    /// The supervisor of the holder's command ([`crate::supervisor`]), on the holder's
    /// host: pid and start time. It outlives the holder process only while the command's
    /// process group still runs, so the holder counts as alive while either lives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervisor: Option<ProcessRef>,
}

/// A process on the holder's host: its pid and start time (clock ticks after boot).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRef {
    /// Process id.
    pub pid: u32,
    /// Start time in clock ticks after boot (`/proc/PID/stat` field 22).
    pub start: u64,
}

/// Whether a holder's process is alive, judged on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// The process runs here, with the same start time since the same boot.
    Alive,
    /// The holder was on this host and boot, and its process is gone (or the PID was reused).
    Dead,
    /// The holder is on another host or another boot; this host cannot tell.
    Unknown,
}

impl Holder {
    /// The holder as JSON, the form the database stores keep it in;
    /// [`ErrorKind::InvalidInput`] when it cannot be encoded.
    pub fn to_json(&self) -> Result<String, Error> {
        serde_json::to_string(self).map_err(|e| {
            Error::new(ErrorKind::InvalidInput, "cannot encode the holder").with_source(e)
        })
    }

    /// A holder from the JSON a store kept; `None` when it is not one (a record written by
    /// hand or by another program).
    pub fn from_json(json: &str) -> Option<Holder> {
        serde_json::from_str(json).ok()
    }

    /// This process, protecting `command`.
    pub fn current(command: Vec<String>) -> Holder {
        let pid = std::process::id();
        Holder {
            id: HolderId::random(),
            host: hostname(),
            pid,
            pid_start: pid_start_ticks(pid),
            boot_id: boot_id(),
            user: user_name(),
            command,
            started_unix_ms: unix_ms(SystemTime::now()),
            supervisor: None,
        }
    }

    /// Whether this holder's process — or the supervisor of its command, which outlives
    /// it only while the command's process group runs — is still alive, as far as this
    /// host can tell.
    ///
    /// `Dead` is only ever a positive finding: same host and boot, and `/proc/PID` is gone
    /// or shows another start time, for the holder and for its supervisor. Any failure to
    /// look (a full file table, memory pressure, a hidden /proc) is `Unknown`, never
    /// `Dead`: a slot is never freed on a guess.
    pub fn liveness(&self) -> Liveness {
        if self.host != hostname() || self.boot_id.is_none() || self.boot_id != boot_id() {
            return Liveness::Unknown;
        }
        let Some(want) = self.pid_start else {
            return Liveness::Unknown;
        };
        match process_liveness(self.pid, want) {
            Liveness::Dead => match self.supervisor {
                Some(s) => process_liveness(s.pid, s.start),
                None => Liveness::Dead,
            },
            other => other,
        }
    }

    /// The command as one line, for display.
    pub fn command_line(&self) -> String {
        self.command.join(" ")
    }
}

/// This host's name.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is valid for buf.len() bytes; gethostname NUL-terminates on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        if let Ok(s) = std::str::from_utf8(&buf[..end]) {
            if !s.is_empty() {
                return s.to_owned();
            }
        }
    }
    "localhost".into()
}

/// The start time of process `pid` in clock ticks after boot, or `None` if it is gone or
/// cannot be read.
pub fn pid_start_ticks(pid: u32) -> Option<u64> {
    read_pid_start(pid).ok()
}

/// Whether process `pid` that started at `start` runs on this host (same boot assumed).
fn process_liveness(pid: u32, start: u64) -> Liveness {
    match read_pid_start(pid) {
        Ok(have) if have == start => Liveness::Alive,
        Ok(_) => Liveness::Dead,
        // /proc mounted with hidepid=invisible hides another user's live process as if
        // it did not exist (a team sharing a store on one host): only the kernel's own
        // answer to kill(pid, 0), which hidepid does not change, says it is gone.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if pid_absent(pid) {
                Liveness::Dead
            } else {
                Liveness::Unknown
            }
        }
        Err(_) => Liveness::Unknown,
    }
}

/// Whether no process `pid` exists at all: `kill(pid, 0)` answers `ESRCH`. (`EPERM` is
/// another user's process, alive.)
fn pid_absent(pid: u32) -> bool {
    // No process can have a PID beyond pid_t.
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return true;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let rc = unsafe { libc::kill(pid, 0) };
    rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// The start time of process `pid`; `NotFound` only when the process does not exist.
fn read_pid_start(pid: u32) -> std::io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let unparsable = || std::io::Error::new(std::io::ErrorKind::InvalidData, "unparsable stat");
    // The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    let after = &stat[stat.rfind(')').ok_or_else(unparsable)? + 1..];
    // Fields after ')' start at field 3 (state); starttime is field 22.
    after
        .split_whitespace()
        .nth(19)
        .and_then(|t| t.parse().ok())
        .ok_or_else(unparsable)
}

/// The kernel's boot id, or `None` when /proc does not give it.
pub fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

pub(crate) fn user_name() -> String {
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0u8; 4096];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the given sizes; getpwuid_r writes only into them.
    let rc = unsafe {
        libc::getpwuid_r(
            uid,
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if rc == 0 && !result.is_null() && !pwd.pw_name.is_null() {
        // SAFETY: pw_name points into buf, NUL-terminated by getpwuid_r.
        let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
        if let Ok(s) = name.to_str() {
            return s.to_owned();
        }
    }
    uid.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_process_is_alive_and_a_dead_pid_is_dead() {
        let me = Holder::current(vec!["test".into()]);
        assert_eq!(me.liveness(), Liveness::Alive);
        assert!(me.pid_start.is_some());
        let mut other = me.clone();
        other.pid_start = other.pid_start.map(|t| t + 1);
        assert_eq!(
            other.liveness(),
            Liveness::Dead,
            "same pid, other start time"
        );
        let mut remote = me.clone();
        remote.host = "elsewhere.invalid".into();
        assert_eq!(remote.liveness(), Liveness::Unknown);
        let mut no_start = me.clone();
        no_start.pid_start = None;
        assert_eq!(
            no_start.liveness(),
            Liveness::Unknown,
            "a PID alone decides nothing"
        );
        let mut gone = me.clone();
        gone.pid = u32::MAX - 1; // above any pid_max: no such process
        assert_eq!(gone.liveness(), Liveness::Dead);
        // A gone holder whose command's supervisor (here: this process) still runs is alive.
        let mut supervised = gone.clone();
        supervised.supervisor = Some(ProcessRef {
            pid: me.pid,
            start: me.pid_start.expect("start"),
        });
        assert_eq!(supervised.liveness(), Liveness::Alive);
        supervised.supervisor = Some(ProcessRef {
            pid: u32::MAX - 1,
            start: 1,
        });
        assert_eq!(supervised.liveness(), Liveness::Dead);
    }

    #[test]
    fn holder_ids_round_trip_and_reject_garbage() {
        let id = HolderId::random();
        assert_eq!(id.to_string().parse::<HolderId>().expect("parse"), id);
        assert!("xyz".parse::<HolderId>().is_err());
        assert_ne!(HolderId::random(), HolderId::random());
        let me = Holder::current(vec!["a b".into(), "c".into()]);
        let json = serde_json::to_string(&me).expect("json");
        assert_eq!(serde_json::from_str::<Holder>(&json).expect("back"), me);
    }
}
