//! The real servers networked stores are tested against.
//!
//! `scripts/test` starts them (through `scripts/servers`) and passes their URLs in
//! `BATON_TEST_*` environment variables; [`url_from_env`] reads one. A property that must
//! restart or kill a server starts a private instance with [`Server::start`], so the shared
//! one stays up for the tests running beside it.
//!
//! Under `CI=true` a missing server is a failure, never a skip.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The URL in environment variable `var`. When it is unset: under `CI=true` this panics
/// (a missing server fails the run); elsewhere it returns why the tests are skipped.
pub fn url_from_env(var: &str) -> Result<String, String> {
    match std::env::var(var) {
        Ok(url) if !url.trim().is_empty() => Ok(url),
        _ => {
            let why = format!(
                "{var} is not set: run the suite with `bash scripts/test`, which starts the servers"
            );
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("CI=true and a test server is missing: {why}");
            }
            Err(why)
        }
    }
}

/// The project's `scripts/` directory.
pub fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts")
}

/// A private server instance started by `scripts/server-NAME`, stopped when dropped.
#[derive(Debug)]
pub struct Server {
    script: PathBuf,
    stop: &'static str,
    dir: tempfile::TempDir,
    vars: Vec<(String, String)>,
    env: Vec<(String, String)>,
}

impl Server {
    /// Runs `scripts/server-NAME START DIR` in a fresh temporary directory; `stop` is the
    /// subcommand that stops it again. The script prints `NAME=VALUE` lines (URLs).
    pub fn start(name: &str, start: &str, stop: &'static str) -> io::Result<Server> {
        Server::start_with_env(name, start, stop, &[])
    }

    /// [`Server::start`] with extra environment variables for the script, here and in every
    /// later [`Server::run`] (such as `BATON_SERVER_FAKETIME`, which the PostgreSQL and etcd
    /// scripts take to run the server under libfaketime).
    pub fn start_with_env(
        name: &str,
        start: &str,
        stop: &'static str,
        env: &[(String, String)],
    ) -> io::Result<Server> {
        let script = scripts_dir().join(format!("server-{name}"));
        let dir = tempfile::Builder::new()
            .prefix(&format!("baton-{name}-"))
            .tempdir()?;
        let mut server = Server {
            script,
            stop,
            dir,
            vars: Vec::new(),
            env: env.to_vec(),
        };
        let out = server.run(start)?;
        server.vars = out
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        Ok(server)
    }

    /// The value of a variable the start printed (e.g. `BATON_TEST_POSTGRES`).
    pub fn var(&self, name: &str) -> Option<&str> {
        self.vars
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The directory the server keeps its data (and, under libfaketime, its clock's
    /// offset file) in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The first URL the start printed.
    pub fn url(&self) -> &str {
        self.vars.first().map(|(_, v)| v.as_str()).unwrap_or("")
    }

    /// Runs `scripts/server-NAME SUBCOMMAND DIR` (e.g. `restart`, `kill-leader`) and
    /// returns its standard output.
    pub fn run(&self, subcommand: &str) -> io::Result<String> {
        let out = Command::new("bash")
            .arg(&self.script)
            .arg(subcommand)
            .arg(self.dir.path())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "{} {subcommand} failed ({}): {}",
                self.script.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.run(self.stop);
    }
}
