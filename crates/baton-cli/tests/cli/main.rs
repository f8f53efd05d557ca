//! The `baton` command, tested through the real binary.

mod fence;
mod hostile;
mod leader;
mod lease;
mod manage;
mod run;
mod usage;
mod util;
