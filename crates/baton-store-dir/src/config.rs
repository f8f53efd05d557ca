//! `dir:PATH[?mode=kernel]`, parsed from the store URL.

use std::path::PathBuf;

use baton_core::{Error, ErrorKind, Op, StoreUrl};

/// How the directory store holds slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Kernel OFD locks (the default): for local filesystems.
    Kernel,
    /// Lease files with heartbeats: for shared filesystems without reliable kernel locks.
    Lease,
}

impl Mode {
    /// The name used in URLs and in the store's mode file.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Kernel => "kernel",
            Mode::Lease => "lease",
        }
    }
}

/// The directory store's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirConfig {
    /// The store's root directory.
    pub root: PathBuf,
    /// True for the default directory, which must be a real directory (not a symlink)
    /// owned by this user; it is created mode 0700.
    pub is_default: bool,
    /// Kernel locks or lease files.
    pub mode: Mode,
}

/// The default directory: `$XDG_RUNTIME_DIR/baton` when that is set to an absolute path,
/// else `/tmp/baton-$UID`.
pub fn default_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if PathBuf::from(&d).is_absolute() => PathBuf::from(d).join("baton"),
        _ => PathBuf::from(format!(
            "/tmp/baton-{}",
            rustix::process::geteuid().as_raw()
        )),
    }
}

impl DirConfig {
    /// Parses `dir:PATH`. An empty path means the default directory. The only query
    /// parameter is `mode`: `kernel` (the default) or `lease`.
    pub fn from_url(url: &StoreUrl) -> Result<DirConfig, Error> {
        let bad =
            |kind: ErrorKind, why: String| Error::new(kind, why).with_op(Op::Open).with_store(url);
        let mut mode = Mode::Kernel;
        for (name, value) in url.query() {
            match (name, value) {
                ("mode", "kernel") => mode = Mode::Kernel,
                ("mode", "lease") => mode = Mode::Lease,
                ("mode", other) => {
                    return Err(bad(
                        ErrorKind::InvalidInput,
                        format!("unknown mode '{other}' (known: kernel, lease)"),
                    ))
                }
                (other, _) => {
                    return Err(bad(
                        ErrorKind::InvalidInput,
                        format!("unknown parameter '{other}' (known: mode)"),
                    ))
                }
            }
        }
        let path = url.path();
        let default = default_dir();
        let root = if path.is_empty() {
            default.clone()
        } else {
            PathBuf::from(path)
        };
        if !root.is_absolute() {
            return Err(bad(
                ErrorKind::InvalidInput,
                format!(
                    "the directory must be an absolute path, not '{}'",
                    root.display()
                ),
            ));
        }
        Ok(DirConfig {
            is_default: root == default,
            root,
            mode,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_paths_and_modes() {
        let url = StoreUrl::parse("dir:/var/lock/x").expect("url");
        let cfg = DirConfig::from_url(&url).expect("cfg");
        assert_eq!(cfg.root, PathBuf::from("/var/lock/x"));
        assert!(!cfg.is_default);
        let url = StoreUrl::parse("dir:").expect("url");
        assert!(DirConfig::from_url(&url).expect("cfg").is_default);
        let url = StoreUrl::parse("dir:/x?mode=lease").expect("url");
        assert_eq!(DirConfig::from_url(&url).expect("cfg").mode, Mode::Lease);
        for (u, kind) in [
            ("dir:/x?mode=zzz", ErrorKind::InvalidInput),
            ("dir:/x?color=red", ErrorKind::InvalidInput),
            ("dir:relative/path", ErrorKind::InvalidInput),
        ] {
            let url = StoreUrl::parse(u).expect("url");
            assert_eq!(DirConfig::from_url(&url).expect_err(u).kind(), kind, "{u}");
        }
    }
}
