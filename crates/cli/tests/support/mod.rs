//! What the process tests share: the `courier` binary under test, run
//! directly or through a prefix (`ip netns exec NAME`), and its output as
//! text.

#![allow(dead_code)]

pub mod cluster;
pub mod netns;

use std::io::Write;
use std::process::{Child, Command, Output, Stdio};

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

/// `courier --url URL ARGS…` through `prefix`, started with every pipe
/// open and `stdin` written (and closed: the pipe is dropped).
pub fn spawn_client(prefix: &[&str], url: &str, args: &[&str], stdin: &str) -> Child {
    let mut child = command(prefix)
        .arg("--url")
        .arg(url)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child
}

/// A finished process's standard output, as text.
pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A finished process's standard error, as text.
pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}
