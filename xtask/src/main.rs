//! `cargo xtask <command>`: everything the project automates, in one place.
//!
//! Plain std Rust with no dependencies, so it builds in seconds on a fresh
//! machine. Every command prints what it runs.

mod demo_web;
mod deps;
mod layers;

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

const HELP: &str = "\
cargo xtask <command> [options]

commands:
  ci                  everything CI checks: fmt, clippy -D warnings, layering,
                      tests and doc tests, examples, benchmark, peers and fuzz
                      smoke runs
  test [ARGS..]       cargo test --workspace [ARGS..]
  examples            run the two-process examples of messaging, rpc, queue and pubsub
  bench [ARGS..]      the benchmarks (criterion and end-to-end, release build);
                      results in target/bench/
  bench peers [--smoke] [--runs N] [FILTER..]
                      Courier beside nats-server (installed from Debian if
                      missing) and tarpc, same machine, same run: a table of
                      Courier / peer and Courier / raw for every workload
  demo                `courier demo`: a broker and worker processes on loopback,
                      all five mechanisms at work, a table of what happened
  demo web [--port BASE] [--http PORT]
                      the web example (examples/web): broker, worker, two
                      services and the HTTP gateway on loopback, until Ctrl-C
  cluster [--nodes N] a real N-node cluster (default 3) on loopback: node i
                      on port 7876+2i, metrics on the next port, data under
                      target/cluster/node<i>; until Ctrl-C stops every node
  sim [--seeds N] [--steps N] [--seed S]
                      the cluster simulations (3 and 5 nodes under partitions,
                      loss, crashes; power loss) for N seeds (default 10) of
                      N fault steps (default 40); CI runs one short seed each
  queue-kills [--rounds N] [--seed S]
                      kill -9 a replicated queue's leader under load N times
                      (default 20; CI runs 2) over three `courier serve`
                      processes, checking nothing confirmed is lost
  fuzz [--seconds N] [--seed S]
                      mutation-fuzz the frame decoder for N seconds (default 60)
  crash [--seeds N]   the kill -9 crash test of the durable log with N seeds
                      (default 200; CI runs 5)
  soak [--minutes N] [--seed S]
                      a mixed workload over a broker process with faults
                      injected from the seed (kill -9, SIGSTOP, stalled and
                      cut connections), checked throughout (CI runs
                      1 min of seed 7; without --seed, a random one)
  layers              check that every crate depends only on lower layers
  deps                check that the embedded queue and pub/sub (no default
                      features) compile no rpc, rustls, rcgen or syn of ours,
                      and transport without dev-certs no rcgen
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
        "demo" if rest.first().is_some_and(|a| a == "web") => demo_web::run(&rest[1..]),
        "demo" => cargo(&[
            "run",
            "--quiet",
            "--release",
            "-p",
            "courier-cli",
            "--",
            "demo",
        ]),
        "cluster" => cluster(rest),
        "sim" => sim(rest),
        "fuzz" => fuzz(rest, true),
        "layers" => check_layers(),
        "deps" => check_deps(),
        "examples" => examples(),
        "crash" => crash(rest),
        "queue-kills" => queue_kills(rest),
        "soak" => soak(rest),
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

/// Starts an N-node cluster on loopback: every broker is a member
/// (`--node i`, the others as `--peer`), with its own port and data
/// directory, and waits for them. Ctrl-C reaches every process in the
/// terminal's group, so each broker shuts down gracefully by itself.
fn cluster(args: &[String]) -> Result<(), String> {
    let nodes: u16 = match args {
        [] => 3,
        [flag, n] if flag == "--nodes" => n
            .parse()
            .map_err(|_| format!("--nodes {n:?} is not a number"))?,
        _ => return Err("usage: cargo xtask cluster [--nodes N]".into()),
    };
    cargo(&["build", "--quiet", "--release", "-p", "courier-cli"])?;
    let courier = root().join("target/release/courier");
    if nodes == 0 || nodes > 9 {
        return Err("--nodes takes 1 to 9".into());
    }
    let address = |n: u16| format!("tcp://127.0.0.1:{}", 7876 + 2 * n);
    let mut children = Vec::new();
    for n in 1..=nodes {
        let data = root().join(format!("target/cluster/node{n}"));
        let mut command = Command::new(&courier);
        command
            .args(["serve", "--listen", &address(n)])
            .args(["--metrics", &format!("127.0.0.1:{}", 7877 + 2 * n)])
            .arg("--data")
            .arg(&data)
            .args(["--node", &n.to_string()])
            // Queues named jobs.* are replicated, so the README's failover
            // example runs as written.
            .args(["--replicated-queue", "jobs.*"]);
        for peer in (1..=nodes).filter(|p| *p != n) {
            command.args(["--peer", &format!("{peer}={}", address(peer))]);
        }
        let child = command
            .spawn()
            .map_err(|err| format!("cannot start {}: {err}", courier.display()))?;
        println!(
            "node {n}: {}, metrics http://127.0.0.1:{}/metrics, data {}",
            address(n),
            7877 + 2 * n,
            data.display()
        );
        children.push(child);
    }
    let all: Vec<String> = (1..=nodes).map(address).collect();
    println!(
        "\ntry:\n  export COURIER_URL={}\n  target/release/courier cluster status\n  target/release/courier kv put greeting hello\n  target/release/courier kv watch '' --from 1\n  target/release/courier queue push jobs.demo 'first job'   # a replicated queue\n  target/release/courier queue stats jobs.demo               # its leader and replicas\nCtrl-C stops every node.",
        all.join(",")
    );
    let mut failed = 0;
    for mut child in children {
        match child.wait() {
            Ok(status) if status.success() => {}
            _ => failed += 1,
        }
    }
    if failed > 0 {
        return Err(format!("{failed} node(s) did not stop cleanly"));
    }
    Ok(())
}

/// Runs the cluster simulations for many seeds and more fault steps than
/// CI does; a failing seed is printed with the command that replays it.
fn sim(args: &[String]) -> Result<(), String> {
    let (mut seeds, mut steps, mut first) = (10u64, 40u64, None);
    let mut rest = args.iter();
    while let Some(flag) = rest.next() {
        let value = rest
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| format!("{flag} needs a number"))?;
        match flag.as_str() {
            "--seeds" => seeds = value,
            "--steps" => steps = value,
            "--seed" => first = Some(value),
            other => {
                return Err(format!(
                    "unknown option {other:?}: sim [--seeds N] [--steps N] [--seed S]"
                ))
            }
        }
    }
    let first = first.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs())
    });
    for seed in first..first + seeds {
        eprintln!("\n==> seed {seed} ({steps} steps)");
        let (seed_text, steps_text) = (seed.to_string(), steps.to_string());
        cargo_env(
            &["test", "-p", "courier-cluster", "--test", "cluster_sim", "--", "--nocapture"],
            &[("COURIER_SEED", &seed_text), ("COURIER_SIM_STEPS", &steps_text)],
        )
        .map_err(|e| {
            format!(
                "{e}\nreplay: COURIER_SEED={seed} COURIER_SIM_STEPS={steps} cargo test -p courier-cluster --test cluster_sim"
            )
        })?;
        cargo_env(
            &["test", "-p", "courier-cluster", "--test", "queue_sim", "--", "--nocapture"],
            &[("COURIER_SEED", &seed_text), ("COURIER_SIM_STEPS", &steps_text)],
        )
        .map_err(|e| {
            format!(
                "{e}\nreplay: COURIER_SEED={seed} COURIER_SIM_STEPS={steps} cargo test -p courier-cluster --test queue_sim"
            )
        })?;
    }
    eprintln!("\n{seeds} seeds passed");
    Ok(())
}

/// Builds `courier` (the dev profile, which CI's tests have built already)
/// and runs its soak with the given arguments.
fn soak(args: &[String]) -> Result<(), String> {
    cargo(&["build", "--quiet", "-p", "courier-cli"])?;
    let courier = root().join("target/debug/courier");
    eprintln!("$ {} soak {}", courier.display(), args.join(" "));
    let status = Command::new(&courier)
        .arg("soak")
        .args(args)
        .status()
        .map_err(|err| format!("cannot run {}: {err}", courier.display()))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("the soak found violations ({status})"))
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

/// Examples that run to completion by themselves: each starts its second
/// process, bounds every wait, and exits non-zero on failure. rpc's pair
/// is run by [`rpc_examples`], since its server waits for Ctrl-C.
const EXAMPLES: &[(&str, &str)] = &[
    ("courier-messaging", "orders"),
    ("courier-queue", "jobs"),
    ("courier-pubsub", "events"),
];

fn examples() -> Result<(), String> {
    // Built for the whole workspace (as `cargo test --workspace` already
    // did, so this is no work after it), then run directly: `cargo run -p`
    // would resolve one package's features and rebuild tokio and every
    // crate above it.
    cargo(&["build", "--quiet", "--workspace", "--examples"])?;
    let dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
        .join("debug")
        .join("examples");
    for (package, example) in EXAMPLES {
        let binary = dir.join(example);
        eprintln!("$ {} ({package})", binary.display());
        let status = Command::new(&binary)
            .current_dir(root())
            .status()
            .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
        if !status.success() {
            return Err(format!("example {example} of {package} failed ({status})"));
        }
    }
    rpc_examples(&dir)
}

/// rpc's `server` on a port the system picks, then its `client` against
/// the address the server printed; the server is stopped with SIGINT, as a
/// user's Ctrl-C would, and must exit cleanly.
fn rpc_examples(dir: &Path) -> Result<(), String> {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::sync::mpsc;
    use std::time::Duration;

    let server_bin = dir.join("server");
    eprintln!("$ {} tcp://127.0.0.1:0 (courier-rpc)", server_bin.display());
    let mut server = Command::new(&server_bin)
        .arg("tcp://127.0.0.1:0")
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", server_bin.display()))?;
    let stdout = server.stdout.take().ok_or("the server has no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let outcome = (|| {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| "the rpc server printed nothing within 30 s".to_string())?;
        // "serving Calculator on tcp://127.0.0.1:PORT; Ctrl-C to stop"
        let address = line
            .split_once(" on ")
            .and_then(|(_, rest)| rest.split(';').next())
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .ok_or_else(|| format!("unexpected first line from the rpc server: {line:?}"))?;
        let client_bin = dir.join("client");
        eprintln!("$ {} {address} (courier-rpc)", client_bin.display());
        let output = Command::new(&client_bin)
            .arg(address)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", client_bin.display()))?;
        let printed = String::from_utf8_lossy(&output.stdout);
        eprint!("{printed}");
        if !output.status.success() || !printed.contains("2 + 3 = 5") {
            return Err(format!(
                "example client of courier-rpc failed ({})",
                output.status
            ));
        }
        Ok(())
    })();
    // SIGINT, as Ctrl-C: the server shuts down gracefully and exits 0.
    let interrupted = Command::new("kill")
        .args(["-INT", &server.id().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        match server.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = server.kill();
                let _ = server.wait();
                break None;
            }
        }
    };
    outcome?;
    match status {
        Some(status) if interrupted && status.success() => Ok(()),
        Some(status) => Err(format!(
            "the rpc example server exited with {status} after SIGINT"
        )),
        None => Err("the rpc example server did not stop within 10 s of SIGINT".into()),
    }
}

fn check_layers() -> Result<(), String> {
    let violations = layers::check(&root())?;
    if violations.is_empty() {
        eprintln!(
            "layering: every crate depends only on lower layers ({})",
            layers::order()
        );
        Ok(())
    } else {
        Err(format!("layering violated:\n  {}", violations.join("\n  ")))
    }
}

/// Runs `cargo tree` for each of [`deps::CHECKS`] and fails naming every
/// crate that appears where it must not, with the chain that brought it.
fn check_deps() -> Result<(), String> {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut failures = Vec::new();
    for check in deps::CHECKS {
        let args = deps::tree_args(check.package);
        eprintln!("$ cargo {}", args.join(" "));
        let output = Command::new(&cargo)
            .args(&args)
            .current_dir(root())
            .stderr(std::process::Stdio::inherit())
            .output()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "`cargo {}` failed ({})",
                args.join(" "),
                output.status
            ));
        }
        let tree = String::from_utf8_lossy(&output.stdout);
        let found = deps::offenders(&tree, check.forbidden);
        match deps::report(check.package, &found) {
            Some(message) => failures.push(message),
            None => eprintln!("{}: none of the forbidden crates", check.package),
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "dependencies that must not be there:\n  {}",
            failures.join("\n  ")
        ))
    }
}

fn ci() -> Result<(), String> {
    type Step = (&'static str, Box<dyn Fn() -> Result<(), String>>);
    let steps: Vec<Step> = vec![
        ("format", Box::new(|| cargo(&["fmt", "--all", "--check"]))),
        ("layering", Box::new(check_layers)),
        ("dependencies", Box::new(check_deps)),
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
        ("examples", Box::new(examples)),
        // What `--workspace` does not build: the features that are off by
        // default, and the crates without the ones that are on.
        (
            "features",
            Box::new(|| {
                for package in ["courier-queue", "courier-pubsub", "courier-transport"] {
                    cargo(&[
                        "clippy",
                        "-p",
                        package,
                        "--no-default-features",
                        "--",
                        "-D",
                        "warnings",
                    ])?;
                }
                cargo(&[
                    "clippy",
                    "-p",
                    "courier-rpc",
                    "--features",
                    "otel",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ])?;
                cargo(&[
                    "test",
                    "-p",
                    "courier-rpc",
                    "--features",
                    "otel",
                    "--test",
                    "otel",
                ])
            }),
        ),
        // Benchmarks in test mode: each criterion benchmark runs once and the
        // end-to-end harness runs with tiny counts. No timing is judged.
        (
            "benchmark smoke",
            Box::new(|| cargo(&["test", "--workspace", "--benches"])),
        ),
        // A fixed seed, so CI's fault schedule is the same every run (the
        // seed is printed either way); random seeds are for long runs.
        (
            "soak (1 min)",
            Box::new(|| soak(&["--minutes".into(), "1".into(), "--seed".into(), "7".into()])),
        ),
        (
            "fuzz smoke",
            Box::new(|| fuzz(&["--seconds".into(), "10".into()], false)),
        ),
        // The peers workspace (async-nats, tarpc) is built only here and by
        // `bench peers`: lint it, then run every row once with tiny counts.
        (
            "peers smoke",
            Box::new(|| {
                let manifest = root().join("peers").join("Cargo.toml");
                let manifest = manifest.to_string_lossy().into_owned();
                let target = root().join("target").to_string_lossy().into_owned();
                let env = [("CARGO_TARGET_DIR", target.as_str())];
                cargo_env(&["fmt", "--manifest-path", &manifest, "--check"], &env)?;
                cargo_env(
                    &[
                        "clippy",
                        "--release",
                        "--manifest-path",
                        &manifest,
                        "--",
                        "-D",
                        "warnings",
                    ],
                    &env,
                )?;
                peers(&["--smoke".into()])
            }),
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
    if rest.first().map(String::as_str) == Some("peers") {
        return peers(&rest[1..]);
    }
    let out = root().join("target").join("bench");
    std::fs::create_dir_all(&out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let out = out.to_string_lossy().into_owned();
    let extra = strs(rest);
    cargo(&["build", "--release", "-p", "courier-cli"])?; // the cluster bench's failover runs it
    cargo_env(
        &[&["bench", "-p", "courier-benches"], &extra[..]].concat(),
        &[("COURIER_BENCH_OUT", out.as_str())],
    )?;
    eprintln!("\nresults in {out}: one .tsv (a figure per line) and one .svg plot per benchmark");
    Ok(())
}

/// `cargo xtask bench peers [--smoke] [ARGS..]`: Courier beside nats-server
/// and tarpc, same machine, same run (the `peers/` workspace, built here
/// only, so its clients' dependency trees stay out of every other build).
fn peers(rest: &[String]) -> Result<(), String> {
    ensure_nats_server();
    cargo(&["build", "--release", "-p", "courier-cli"])?;
    let target = root().join("target");
    let target_dir = target.to_string_lossy().into_owned();
    let manifest = root().join("peers").join("Cargo.toml");
    let manifest = manifest.to_string_lossy().into_owned();
    cargo_env(
        &["build", "--release", "--manifest-path", &manifest],
        &[("CARGO_TARGET_DIR", &target_dir)],
    )?;
    let program = target.join("release").join("courier-peers");
    let courier = target.join("release").join("courier");
    let out = target.join("bench");
    let mut command = Command::new(&program);
    command
        .arg("--courier")
        .arg(&courier)
        .arg("--out")
        .arg(&out)
        .args(rest)
        .current_dir(root());
    eprintln!("$ {} {}", program.display(), rest.join(" "));
    let status = command
        .status()
        .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("courier-peers failed ({status})"))
    }
}

/// Installs Debian's nats-server when it is missing and apt can (as root);
/// otherwise the NATS cells of `bench peers` say why they are empty.
fn ensure_nats_server() {
    let found = Command::new("nats-server")
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success());
    if found {
        return;
    }
    eprintln!("$ apt-get install -y nats-server   (nats-server is missing)");
    let installed = Command::new("apt-get")
        .args(["install", "-y", "-q", "nats-server"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .is_ok_and(|status| status.success());
    if !installed {
        eprintln!("could not install nats-server: the NATS cells will be empty");
    }
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

/// The replicated queue's kill test, for more rounds than CI runs.
fn queue_kills(rest: &[String]) -> Result<(), String> {
    let (mut rounds, mut seed) = ("20".to_string(), None);
    let mut args = rest.iter();
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .filter(|v| v.parse::<u64>().is_ok())
            .ok_or_else(|| format!("{flag} needs a number"))?;
        match flag.as_str() {
            "--rounds" => rounds = value.clone(),
            "--seed" => seed = Some(value.clone()),
            other => {
                return Err(format!(
                    "unknown option {other:?}: queue-kills [--rounds N] [--seed S]"
                ))
            }
        }
    }
    let mut env = vec![("COURIER_QUEUE_KILLS", rounds.as_str())];
    if let Some(seed) = &seed {
        env.push(("COURIER_SEED", seed));
    }
    cargo_env(
        &[
            "test",
            "-p",
            "courier-cli",
            "--test",
            "cluster_queue",
            "killing",
            "--",
            "--nocapture",
        ],
        &env,
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
