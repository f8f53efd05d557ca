//! A test server for the network-store benchmarks: the one an environment variable names,
//! or one a `scripts/server-*` script starts for the run and stops after it.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::Result;

/// A server: the one the environment names, or one this run started (stopped on drop).
pub struct ServerGuard {
    /// The server's URL.
    pub url: String,
    /// The script and directory of a server this run started.
    started: Option<(PathBuf, PathBuf)>,
    /// A directory that must outlive the server, removed after it stops.
    _dir: Option<tempfile::TempDir>,
}

impl ServerGuard {
    /// The server the environment variable `var` names, if it is set and not empty.
    pub fn from_env(var: &str) -> Option<ServerGuard> {
        let url = std::env::var(var).ok()?;
        let url = url.trim();
        (!url.is_empty()).then(|| ServerGuard {
            url: url.to_owned(),
            started: None,
            _dir: None,
        })
    }

    /// Starts a server in `dir` with `bash script start dir`, whose output names it in a
    /// `var=URL` line; `keep` is dropped after the server stops.
    pub fn start(
        var: &str,
        script: &Path,
        dir: PathBuf,
        keep: Option<tempfile::TempDir>,
    ) -> Result<ServerGuard> {
        eprintln!(
            "  {var} is unset: starting a server with {} start {}",
            script.display(),
            dir.display()
        );
        let out = Command::new("bash")
            .arg(script)
            .arg("start")
            .arg(&dir)
            .output()?;
        if !out.status.success() {
            return Err(format!(
                "{} start failed: {}",
                script.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )
            .into());
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let prefix = format!("{var}=");
        let name = script.file_name().unwrap_or_default().to_string_lossy();
        let url = stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .ok_or_else(|| format!("scripts/{name} printed no {var} line"))?
            .trim()
            .to_owned();
        Ok(ServerGuard {
            url,
            started: Some((script.to_owned(), dir)),
            _dir: keep,
        })
    }
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        if let Some((script, dir)) = &self.started {
            let _ = Command::new("bash")
                .arg(script)
                .arg("stop")
                .arg(dir)
                .output();
        }
    }
}
