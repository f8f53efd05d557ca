//! The `baton` command, tested through the real binary.

mod hostile;
mod lease;
mod manage;
mod run;
mod usage;
mod util;
