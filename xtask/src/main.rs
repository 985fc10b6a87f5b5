//! `cargo xtask <command>`: everything the project automates, in one place.
//!
//! Plain std Rust with no dependencies, so it builds in seconds on a fresh
//! machine. Every command prints what it runs.

mod layers;

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

const HELP: &str = "\
cargo xtask <command> [options]

commands:
  ci                  everything CI checks: fmt, clippy -D warnings, layering,
                      tests and doc tests, benchmark and fuzz smoke runs
  test [ARGS..]       cargo test --workspace [ARGS..]
  bench [ARGS..]      the benchmarks (criterion and end-to-end, release build);
                      results in target/bench/
  demo                frames over every transport, with round-trip times
  fuzz [--seconds N] [--seed S]
                      mutation-fuzz the frame decoder for N seconds (default 60)
  crash [--seeds N]   the kill -9 crash test of the durable log with N seeds
                      (default 200; CI runs 5)
  layers              check that every crate depends only on lower layers
";

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let Some(command) = args.first() else {
        eprint!("{HELP}");
        return ExitCode::FAILURE;
    };
    let rest = &args[1..];
    let result = match command.as_str() {
        "ci" => ci(),
        "test" => cargo(&[&["test", "--workspace"], &strs(rest)[..]].concat()),
        "bench" => bench(rest),
        "demo" => cargo(&[
            "run",
            "--quiet",
            "--release",
            "-p",
            "courier-transport",
            "--example",
            "demo",
        ]),
        "fuzz" => fuzz(rest, true),
        "layers" => check_layers(),
        "crash" => crash(rest),
        "help" | "--help" | "-h" => {
            print!("{HELP}");
            Ok(())
        }
        other => Err(format!("unknown command {other:?}\n\n{HELP}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo(args: &[&str]) -> Result<(), String> {
    cargo_env(args, &[])
}

fn cargo_env(args: &[&str], envs: &[(&str, &str)]) -> Result<(), String> {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("$ cargo {}", args.join(" "));
    let status = Command::new(cargo)
        .args(args)
        .envs(envs.iter().copied())
        .current_dir(root())
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`cargo {}` failed ({status})", args.join(" ")))
    }
}

fn check_layers() -> Result<(), String> {
    let violations = layers::check(&root())?;
    if violations.is_empty() {
        eprintln!(
            "layering: every crate depends only on lower layers ({})",
            layers::LAYERS.join(" < ")
        );
        Ok(())
    } else {
        Err(format!("layering violated:\n  {}", violations.join("\n  ")))
    }
}

fn ci() -> Result<(), String> {
    type Step = (&'static str, Box<dyn Fn() -> Result<(), String>>);
    let steps: Vec<Step> = vec![
        ("format", Box::new(|| cargo(&["fmt", "--all", "--check"]))),
        ("layering", Box::new(check_layers)),
        (
            "clippy",
            Box::new(|| {
                cargo(&[
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ])
            }),
        ),
        (
            "tests and doc tests",
            Box::new(|| cargo(&["test", "--workspace"])),
        ),
        // Benchmarks in test mode: each criterion benchmark runs once and the
        // end-to-end harness runs with tiny counts. No timing is judged.
        (
            "benchmark smoke",
            Box::new(|| cargo(&["test", "--workspace", "--benches"])),
        ),
        (
            "fuzz smoke",
            Box::new(|| fuzz(&["--seconds".into(), "10".into()], false)),
        ),
        (
            "docs",
            Box::new(|| {
                cargo_env(
                    &["doc", "--workspace", "--no-deps"],
                    &[("RUSTDOCFLAGS", "-D warnings")],
                )
            }),
        ),
    ];
    let started = Instant::now();
    let mut timings = Vec::new();
    for (i, (name, run)) in steps.iter().enumerate() {
        eprintln!("\n==> [{}/{}] {name}", i + 1, steps.len());
        let step_started = Instant::now();
        let result = run();
        timings.push((*name, step_started.elapsed(), result.is_ok()));
        if let Err(message) = result {
            print_timings(&timings);
            return Err(format!("ci failed at step {name:?}: {message}"));
        }
    }
    print_timings(&timings);
    eprintln!("ci passed in {:.0?}", started.elapsed());
    Ok(())
}

fn print_timings(timings: &[(&str, std::time::Duration, bool)]) {
    eprintln!("\n{:<22} {:>9}  result", "step", "time");
    for (name, took, ok) in timings {
        eprintln!(
            "{name:<22} {:>8.1}s  {}",
            took.as_secs_f64(),
            if *ok { "ok" } else { "FAILED" }
        );
    }
}

fn bench(rest: &[String]) -> Result<(), String> {
    let out = root().join("target").join("bench");
    std::fs::create_dir_all(&out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let out = out.to_string_lossy().into_owned();
    let extra = strs(rest);
    cargo_env(
        &[&["bench", "-p", "courier-benches"], &extra[..]].concat(),
        &[("COURIER_BENCH_OUT", out.as_str())],
    )?;
    eprintln!("\nresults in {out}: one .tsv (a figure per line) and one .svg plot per benchmark");
    Ok(())
}

fn crash(rest: &[String]) -> Result<(), String> {
    let seeds = match strs(rest)[..] {
        [] => "200",
        ["--seeds", n] if n.parse::<u32>().is_ok() => n,
        _ => return Err("usage: cargo xtask crash [--seeds N]".into()),
    };
    cargo_env(
        &[
            "test",
            "--release",
            "-p",
            "courier-integration-tests",
            "--test",
            "crash",
            "--",
            "--nocapture",
        ],
        &[("COURIER_CRASH_SEEDS", seeds)],
    )
}

fn fuzz(rest: &[String], release: bool) -> Result<(), String> {
    let mut args = vec!["run", "--quiet", "-p", "courier-fuzz"];
    if release {
        args.push("--release");
    }
    args.push("--");
    args.extend(strs(rest));
    cargo(&args)
}
