//! What the process tests share: the `courier` binary under test, run
//! directly or through a prefix (`ip netns exec NAME`), and its output as
//! text.

#![allow(dead_code)]

use std::process::{Command, Output};

/// The binary cargo built for these tests.
pub const COURIER: &str = env!("CARGO_BIN_EXE_courier");

/// `courier`, or `PREFIX… courier` when a prefix is given.
pub fn command(prefix: &[&str]) -> Command {
    match prefix {
        [] => Command::new(COURIER),
        [program, args @ ..] => {
            let mut command = Command::new(program);
            command.args(args).arg(COURIER);
            command
        }
    }
}

/// A finished process's standard output, as text.
pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A finished process's standard error, as text.
pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}
