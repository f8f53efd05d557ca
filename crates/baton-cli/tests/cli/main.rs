//! The `baton` command, tested through the real binary.

mod barrier;
mod fence;
mod group;
mod hostile;
mod leader;
mod lease;
mod manage;
mod run;
mod stress;
mod team;
mod usage;
mod util;
