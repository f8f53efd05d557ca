//! A small harness to run the real `baton` binary: each test gets its own temporary
//! directory and store, and `BATON_STORE` is cleared so nothing leaks in from outside.
//!
//! Waits are liveness bounds (generous, to survive a loaded machine), never timing
//! assertions.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a test waits for something that should happen promptly before failing.
pub const BOUND: Duration = Duration::from_secs(20);

/// The baton binary under test.
pub fn baton_bin() -> &'static str {
    env!("CARGO_BIN_EXE_baton")
}

/// A test's own directory and store.
pub struct Dir {
    tmp: tempfile::TempDir,
}

impl Dir {
    pub fn new() -> Dir {
        Dir {
            tmp: tempfile::Builder::new()
                .prefix("baton-cli-test")
                .tempdir()
                .expect("temp dir"),
        }
    }

    /// The temporary directory.
    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// The store's directory (`<tmp>/store`).
    pub fn store_dir(&self) -> PathBuf {
        self.path().join("store")
    }

    /// The store URL tests pass with `-s`.
    pub fn store(&self) -> String {
        format!("dir:{}", self.store_dir().display())
    }

    /// `baton -s dir:<tmp>/store ARGS...`.
    pub fn cmd(&self, args: &[&str]) -> TestCommand {
        let mut cmd = self.bare(&["-s", &self.store()]);
        cmd.args(args);
        cmd
    }

    /// `baton ARGS...` without `-s`; the default directory is under this test's temp
    /// dir (`XDG_RUNTIME_DIR=<tmp>`), never the real one.
    pub fn bare(&self, args: &[&str]) -> TestCommand {
        let mut cmd = Command::new(baton_bin());
        cmd.args(args)
            .current_dir(self.path())
            .env_remove("BATON_STORE")
            .env("XDG_RUNTIME_DIR", self.path())
            .stdin(Stdio::null());
        TestCommand {
            cmd,
            dir: self.path().to_owned(),
        }
    }

    /// Whether `status KEY` shows at least `n` slots of KEY held.
    pub fn held(&self, key: &str, n: u64) -> bool {
        let out = self.cmd(&["status", "--json", key]).output();
        if out.code != Some(0) {
            return false;
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(out.stdout.trim()) else {
            return false;
        };
        v["held"].as_u64().is_some_and(|h| h >= n)
    }

    /// Waits (up to [`BOUND`]) until `status KEY` shows `n` slots held.
    pub fn wait_held(&self, key: &str, n: u64) {
        wait_until(&format!("{n} slot(s) of '{key}' held"), || {
            self.held(key, n)
        });
    }

    /// The path `<tmp>/name` (not created).
    pub fn file(&self, name: &str) -> PathBuf {
        self.path().join(name)
    }
}

/// A baton command being built.
pub struct TestCommand {
    cmd: Command,
    dir: PathBuf,
}

impl TestCommand {
    pub fn args(&mut self, args: &[&str]) -> &mut TestCommand {
        self.cmd.args(args);
        self
    }

    pub fn env(&mut self, name: &str, value: impl AsRef<std::ffi::OsStr>) -> &mut TestCommand {
        self.cmd.env(name, value);
        self
    }

    /// Sends its stdout to `fd` instead of collecting it.
    pub fn stdout_to(&mut self, fd: std::os::fd::OwnedFd) -> &mut TestCommand {
        self.cmd.stdout(Stdio::from(fd));
        self
    }

    /// Runs it to the end and collects its output.
    pub fn output(&mut self) -> Outcome {
        let out = self.cmd.output().expect("run baton");
        Outcome::new(
            out.status,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Starts it in the background, its output going to files.
    pub fn spawn(&mut self) -> Running {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let stdout = self.dir.join(format!("bg{n}.out"));
        let stderr = self.dir.join(format!("bg{n}.err"));
        let child = self
            .cmd
            .stdout(fs::File::create(&stdout).expect("stdout file"))
            .stderr(fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("spawn baton");
        Running {
            child: Some(child),
            stdout,
            stderr,
        }
    }
}

/// How a finished baton ended.
#[derive(Debug)]
pub struct Outcome {
    /// The exit code, when it exited.
    pub code: Option<i32>,
    /// The signal, when it was killed.
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    fn new(status: ExitStatus, stdout: String, stderr: String) -> Outcome {
        use std::os::unix::process::ExitStatusExt;
        Outcome {
            code: status.code(),
            signal: status.signal(),
            stdout,
            stderr,
        }
    }

    /// Asserts the exit code, showing everything on failure.
    #[track_caller]
    pub fn code(&self, want: i32) -> &Outcome {
        assert_eq!(self.code, Some(want), "exit code; outcome: {self:#?}");
        self
    }

    /// Asserts that stderr is exactly one line starting `baton: `.
    #[track_caller]
    pub fn one_error_line(&self) -> &Outcome {
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one stderr line; outcome: {self:#?}");
        assert!(
            lines[0].starts_with("baton: "),
            "starts 'baton: '; outcome: {self:#?}"
        );
        self
    }

    /// Asserts that stderr contains `text`.
    #[track_caller]
    pub fn stderr_has(&self, text: &str) -> &Outcome {
        assert!(
            self.stderr.contains(text),
            "stderr has {text:?}; outcome: {self:#?}"
        );
        self
    }

    /// Asserts that stdout contains `text`.
    #[track_caller]
    pub fn stdout_has(&self, text: &str) -> &Outcome {
        assert!(
            self.stdout.contains(text),
            "stdout has {text:?}; outcome: {self:#?}"
        );
        self
    }
}

/// A baton running in the background; killed (SIGKILL) if the test ends first.
pub struct Running {
    child: Option<Child>,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Running {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// Sends `signal` to baton.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill has no memory-safety preconditions.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill({}, {signal})", self.pid());
    }

    /// What it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits (up to [`BOUND`]) for it to end.
    pub fn finish(mut self) -> Outcome {
        let mut child = self.child.take().expect("running");
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return Outcome::new(
                    status,
                    fs::read_to_string(&self.stdout).unwrap_or_default(),
                    fs::read_to_string(&self.stderr).unwrap_or_default(),
                );
            }
            if start.elapsed() > BOUND {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "baton did not end within {BOUND:?}; stderr: {}",
                    fs::read_to_string(&self.stderr).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `cond` until it holds, failing the test after [`BOUND`].
#[track_caller]
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < BOUND, "not within {BOUND:?}: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether process `pid` still exists and is not a zombie (a zombie has already died; in
/// a container nobody may reap it).
pub fn process_alive(pid: i32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
        .unwrap_or("");
    state != "Z" && state != "X"
}

/// Reads a pid a test's child wrote, once it is there.
pub fn read_pid(path: &Path) -> i32 {
    let mut pid = 0;
    wait_until(
        &format!("a pid in {}", path.display()),
        || match fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            Some(p) => {
                pid = p;
                true
            }
            None => false,
        },
    );
    pid
}

/// Says that `what` was skipped and why: on the stderr descriptor (libtest captures
/// `eprintln!`) and, when `BATON_TEST_SKIPS` names a file (`bash scripts/test` sets it), as
/// a line of the test command's skip summary.
pub fn skipped(what: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED {what}: {why}");
    if let Some(path) = std::env::var_os("BATON_TEST_SKIPS") {
        if let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = f.write_all(format!("{what}: {why}\n").as_bytes());
        }
    }
}
