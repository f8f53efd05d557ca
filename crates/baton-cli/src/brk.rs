//! `baton break KEY`: free a dead or stuck holder's slot.
//!
//! Lease stores can free a slot from outside (`Store::break_lease`). Kernel-lock stores
//! (the directory store) cannot and need not: the kernel frees a slot the moment its
//! holder exits. There `break` explains that and shows who holds the key (exit 1), and
//! `--kill` stops the holders instead: SIGTERM to each holder process that is provably
//! the holder (same host, same boot, same process start time), never to a PID that was
//! reused. baton forwards the SIGTERM to its command and releases the slot when the
//! command has exited.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

use baton::{pid_start_ticks, ErrorKind, HolderId, Key, Liveness, SlotState, SlotStatus};
use clap::Args as ClapArgs;

use crate::common::{open_store, print, runtime, Failure};
use crate::exit_code;
use crate::status;

/// Options of `baton break`.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// The key whose slot(s) to free.
    #[arg(value_name = "KEY")]
    pub key: String,

    /// Only this holder's slot (its 32-hex-digit id, as `status` shows it).
    #[arg(long, value_name = "ID")]
    pub holder: Option<String>,

    /// Also send SIGTERM to each holder process that is alive on this host (checked by
    /// boot id and process start time, so a reused PID is never signalled).
    #[arg(long)]
    pub kill: bool,

    /// Print JSON Lines: {"type":"freed"|"signalled"|"skipped"|"key",...}.
    #[arg(long)]
    pub json: bool,
}

/// Runs `baton break`; returns the exit code.
pub fn run(store: Option<&str>, args: Args) -> Result<u8, Failure> {
    let key = Key::new(args.key.as_str())?;
    let only = args
        .holder
        .as_deref()
        .map(str::parse::<HolderId>)
        .transpose()?;
    let store = open_store(store)?;
    runtime()?.block_on(async {
        // Who holds it now: the processes --kill may signal, and what to show when the
        // store cannot break.
        let before = store.inspect(&key).await?;
        let mut out = Report::new(args.json);
        let freed = match store.break_lease(&key, only).await {
            Ok(freed) => freed,
            Err(err) if err.kind() == ErrorKind::Unsupported => {
                if !args.kill {
                    if args.json {
                        out.json(status::key_json(&before));
                    } else {
                        out.text(status::human(&before));
                    }
                    out.flush()?;
                    return Err(Failure::new(
                        exit_code::FAILURE,
                        format!(
                            "{err:#}; its slots come back {}; to free one now, stop its \
                             holder (baton break --kill sends it SIGTERM)",
                            store.capabilities().recovery
                        ),
                    ));
                }
                Vec::new()
            }
            Err(err) => return Err(err.into()),
        };
        for slot in &freed {
            out.freed(&key, slot);
        }
        let signalled = if args.kill {
            signal_holders(&mut out, &key, &before.slots, only)
        } else {
            0
        };
        out.flush()?;
        if freed.is_empty() && signalled == 0 {
            let whom = match only {
                Some(id) => format!("holder {id}"),
                None => "anyone".to_owned(),
            };
            let what = if args.kill {
                "no slot freed and no live holder on this host signalled"
            } else {
                "no slot freed"
            };
            return Err(Failure::new(
                exit_code::FAILURE,
                format!("break '{key}' on {}: {what} (held by {whom}?)", store.url()),
            ));
        }
        Ok(exit_code::SUCCESS)
    })
}

/// Sends SIGTERM to each live holder of `slots` (only `only`'s, if given); returns how
/// many were signalled.
fn signal_holders(
    out: &mut Report,
    key: &Key,
    slots: &[SlotStatus],
    only: Option<HolderId>,
) -> usize {
    let mut signalled = 0;
    for slot in slots.iter().filter(|s| s.state == SlotState::Held) {
        let Some(holder) = &slot.holder else { continue };
        if only.is_some_and(|id| id != holder.id) {
            continue;
        }
        let why_not = match (holder.liveness(), holder.pid_start) {
            (Liveness::Alive, Some(start)) => {
                match signal_exact(holder.pid, start, libc::SIGTERM) {
                    Ok(true) => None,
                    Ok(false) => Some("it exited just now".to_owned()),
                    // The kernel's own rule, as for kill(1): never another user's
                    // process unless this caller could signal it anyway (root).
                    Err(e) if e.raw_os_error() == Some(libc::EPERM) => Some(format!(
                        "it runs as user '{}', whose processes only that user or root may signal ({e})",
                        holder.user
                    )),
                    Err(e) => Some(format!("cannot signal it: {e}")),
                }
            }
            (Liveness::Alive, None) | (Liveness::Unknown, _) => Some(format!(
                "it runs on {} or since another boot; this host cannot tell it is still the holder",
                holder.host
            )),
            (Liveness::Dead, _) => Some("its process is gone".to_owned()),
        };
        match why_not {
            None => {
                signalled += 1;
                out.line(
                    serde_json::json!({
                        "type": "signalled", "key": key.as_str(), "slot": slot.slot,
                        "pid": holder.pid, "host": holder.host, "holder": holder.id.to_string(),
                        "signal": "SIGTERM",
                    }),
                    format!(
                        "sent SIGTERM to pid {} on {} (slot {} of '{key}', holder {})",
                        holder.pid, holder.host, slot.slot, holder.id
                    ),
                );
            }
            Some(reason) => out.line(
                serde_json::json!({
                    "type": "skipped", "key": key.as_str(), "slot": slot.slot,
                    "pid": holder.pid, "host": holder.host, "holder": holder.id.to_string(),
                    "reason": reason,
                }),
                format!(
                    "not signalled: pid {} on {} (slot {} of '{key}'): {reason}",
                    holder.pid, holder.host, slot.slot
                ),
            ),
        }
    }
    signalled
}

/// Sends `signal` to `pid` only if it is still the process that started at `start`
/// (clock ticks after boot). A pidfd pins the process while its start time is checked,
/// so a PID reused in between is never signalled. `Ok(false)`: it is gone.
fn signal_exact(pid: u32, start: u64, signal: libc::c_int) -> io::Result<bool> {
    let pid_t = libc::pid_t::try_from(pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid_t, 0) };
    if raw < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ESRCH) => Ok(false),
            _ => Err(err),
        };
    }
    let raw = libc::c_int::try_from(raw)
        .map_err(|_| io::Error::other("pidfd_open returned an impossible descriptor"))?;
    // SAFETY: raw is a fresh descriptor that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(raw) };
    if pid_start_ticks(pid) != Some(start) {
        return Ok(false);
    }
    // SAFETY: pidfd is a valid pidfd; a null siginfo means "as kill(2) would".
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            std::os::fd::AsRawFd::as_raw_fd(&pidfd),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ESRCH) => Ok(false),
            _ => Err(err),
        };
    }
    Ok(true)
}

/// What `break` prints: JSON Lines or text, collected and written at once.
struct Report {
    json: bool,
    text: String,
}

impl Report {
    fn new(json: bool) -> Report {
        Report {
            json,
            text: String::new(),
        }
    }

    fn json(&mut self, value: serde_json::Value) {
        self.text.push_str(&value.to_string());
        self.text.push('\n');
    }

    fn text(&mut self, text: String) {
        self.text.push_str(&text);
    }

    fn line(&mut self, value: serde_json::Value, text: String) {
        if self.json {
            self.json(value);
        } else {
            self.text.push_str(&text);
            self.text.push('\n');
        }
    }

    fn freed(&mut self, key: &Key, slot: &SlotStatus) {
        let holder = slot.holder.as_ref();
        let who = holder.map_or_else(String::new, |h| format!(", pid {} on {}", h.pid, h.host));
        let token = slot
            .token
            .map_or_else(String::new, |t| format!(" (token {t}{who})"));
        self.line(
            serde_json::json!({
                "type": "freed", "key": key.as_str(),
                "slot": status::slot_json(slot),
            }),
            format!("freed slot {} of '{key}'{token}", slot.slot),
        );
    }

    fn flush(&mut self) -> Result<(), Failure> {
        let text = std::mem::take(&mut self.text);
        print(&text)
    }
}
