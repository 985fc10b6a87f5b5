//! `cargo xtask demo web`: the tickets example (`examples/web`) running for
//! real on loopback — a broker, one worker, two services and the HTTP
//! gateway — until Ctrl-C.
//!
//! Ctrl-C without a signal handler (xtask has no dependencies, hence no
//! `libc`, and no unsafe code): once built, xtask runs itself again under
//! `sh -c "trap '' INT; exec ..."`, so the terminal's SIGINT no longer
//! kills it. The broker, worker and services run in process groups of their
//! own, out of the terminal's reach; the gateway stays in the terminal's
//! group (its own SIGINT handler replaces the inherited "ignore"), so
//! Ctrl-C stops the gateway first. Seeing it exit, xtask stops the rest in
//! order — SIGTERM to the worker and services, then to the broker —
//! each within a bound (then SIGKILL), removes the data directory and
//! exits 0. A service killed by hand (`kill <pid>`, as the demo suggests)
//! is only reported: the other one answers.
//!
//! The gateway starts right after the broker, so a Ctrl-C while the
//! worker and services start reaches it too: xtask, seeing it gone, stops
//! what started and exits (a Ctrl-C during the broker's own start, which
//! takes well under a second, waits for that).
//!
//! Nothing outlives xtask, even killed with SIGKILL or by a closed
//! terminal: every child's stdin is a pipe whose writing end only xtask
//! holds. The example's roles run with `--exit-with-parent` and shut down
//! when it closes; `courier serve` has no such flag, so it runs under a
//! small `sh` wrapper ([`PARENT_WATCH`]) that sends it SIGTERM then.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Set on the second run (built, SIGINT ignored).
const STAGE_ENV: &str = "XTASK_DEMO_WEB_STAGE";
/// How long each process gets to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long each process gets to exit once asked.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of a log is shown when a process fails.
const TAIL_BYTES: u64 = 4000;
/// `sh -c PARENT_WATCH sh PROGRAM ARGS...`: runs the program, forwards
/// SIGTERM to it, and sends it SIGTERM when stdin ends (xtask gone);
/// exits with the program's status. SIGTERM, not SIGINT: the wrapper and
/// its background job inherit xtask's ignored SIGINT, which sh cannot
/// trap. Stdin is kept on fd 3 for the watcher, since a background
/// command's stdin is /dev/null. A `wait` cut short by the trap (status
/// over 128, the program still there) is waited again; the program's own
/// status comes from `wait`, which keeps it even if the program ended at
/// once.
const PARENT_WATCH: &str = r#"exec 3<&0
"$@" 3<&- &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null' TERM
( cat <&3 >/dev/null 2>&1; kill -TERM "$pid" 2>/dev/null ) &
watcher=$!
exec 3<&- 0</dev/null
wait "$pid"
status=$?
while [ "$status" -gt 128 ] && kill -0 "$pid" 2>/dev/null; do
  wait "$pid"
  status=$?
done
kill "$watcher" 2>/dev/null
exit "$status""#;
/// How often the running demo looks at its processes.
const POLL: Duration = Duration::from_millis(100);

const USAGE: &str = "usage: cargo xtask demo web [--port BASE] [--http PORT]
  --port BASE  the broker's ports: BASE (Courier), BASE+1 (metrics and dashboard),
               BASE+2 (WebSocket); default 7878
  --http PORT  the app's HTTP port; default 8080";

/// The ports the demo uses.
#[derive(Clone, Copy, Debug)]
struct Ports {
    broker: u16,
    metrics: u16,
    ws: u16,
    http: u16,
}

fn parse(args: &[String]) -> Result<Ports, String> {
    let (mut base, mut http) = (7878u16, 8080u16);
    let mut rest = args.iter();
    while let Some(flag) = rest.next() {
        let value = rest.next().and_then(|v| v.parse::<u16>().ok());
        match (flag.as_str(), value) {
            ("--port", Some(v)) if (1..=65533).contains(&v) => base = v,
            ("--http", Some(v)) if v > 0 => http = v,
            _ => return Err(format!("bad option {flag:?}\n{USAGE}")),
        }
    }
    let ports = Ports {
        broker: base,
        metrics: base + 1,
        ws: base + 2,
        http,
    };
    if [ports.broker, ports.metrics, ports.ws].contains(&http) {
        return Err(format!(
            "--http {http} is one of the broker's ports\n{USAGE}"
        ));
    }
    Ok(ports)
}

/// The command: builds, then runs the demo in the second stage.
pub fn run(args: &[String]) -> Result<(), String> {
    let ports = parse(args)?;
    if std::env::var_os(STAGE_ENV).is_some() {
        return supervise(ports);
    }
    super::cargo(&[
        "build",
        "--release",
        "-p",
        "courier-cli",
        "-p",
        "courier-example-web",
    ])?;
    free(ports)?;
    let me = std::env::current_exe().map_err(|e| format!("cannot find xtask itself: {e}"))?;
    // Replaces this process (same pid, same terminal): from here on
    // SIGINT is ignored by xtask and reaches only the gateway.
    let err = Command::new("sh")
        .arg("-c")
        .arg("trap '' INT; exec \"$0\" \"$@\"")
        .arg(me)
        .args(["demo", "web"])
        .args(args)
        .env(STAGE_ENV, "run")
        .exec();
    Err(format!("cannot run sh: {err}"))
}

/// A clear error for each port already taken.
fn free(ports: Ports) -> Result<(), String> {
    let taken: Vec<String> = [
        (ports.broker, "the broker"),
        (ports.metrics, "the broker's metrics and dashboard"),
        (ports.ws, "the broker's WebSocket"),
        (ports.http, "the app"),
    ]
    .iter()
    .filter(|(port, _)| TcpListener::bind(("127.0.0.1", *port)).is_err())
    .map(|(port, what)| format!("127.0.0.1:{port} ({what}) is taken"))
    .collect();
    if taken.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{}; stop what uses it or pick others with --port BASE / --http PORT",
        taken.join(", ")
    ))
}

/// One process of the demo.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    /// Whether it was stopped on purpose.
    stopping: bool,
    /// Whether it leads a process group of its own (killed as a group).
    own_group: bool,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Everything started so far, stopped and cleaned up on drop whatever
/// happened.
struct Demo {
    dir: PathBuf,
    procs: Vec<Proc>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        // The app's processes first, the broker (the first started) last.
        while let Some(mut proc) = self.procs.pop() {
            stop(&mut proc, "-TERM");
        }
        if let Err(err) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("cannot remove {}: {err}", self.dir.display());
        }
    }
}

/// Sends `signal`, waits [`STOP_TIMEOUT`], then kills.
fn stop(proc: &mut Proc, signal: &str) {
    if let Ok(Some(_)) = proc.child.try_wait() {
        return;
    }
    proc.stopping = true;
    let _ = Command::new("kill")
        .args([signal, &proc.pid().to_string()])
        .status();
    let deadline = Instant::now() + STOP_TIMEOUT;
    loop {
        match proc.child.try_wait() {
            Ok(Some(status)) if status.success() => return,
            Ok(Some(status)) => {
                eprintln!("{} exited with {status} while stopping", proc.name);
                return;
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                eprintln!(
                    "{} did not stop within {STOP_TIMEOUT:?}; killing it",
                    proc.name
                );
                if proc.own_group {
                    // The whole group: the broker's wrapper and the broker.
                    let _ = Command::new("kill")
                        .args(["-KILL", "--", &format!("-{}", proc.pid())])
                        .status();
                }
                let _ = proc.child.kill();
                let _ = proc.child.wait();
                return;
            }
        }
    }
}

/// The last [`TAIL_BYTES`] of a log.
fn tail(path: &Path) -> String {
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::from("(no log)");
    };
    let len = file.metadata().map_or(0, |m| m.len());
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

impl Demo {
    /// Starts `program args`, stderr to `<name>.log`, and waits for a
    /// stdout line starting with `ready` (the rest of stdout is drained).
    /// `own_group`: out of the terminal's reach (see the module docs).
    fn start(
        &mut self,
        name: &str,
        program: &Path,
        args: &[&str],
        ready: &str,
        own_group: bool,
    ) -> Result<String, String> {
        let log = self.dir.join(format!("{name}.log"));
        let stderr = std::fs::File::create(&log)
            .map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let mut command = Command::new(program);
        command
            .args(args)
            // `courier serve` refuses COURIER_* variables it does not know;
            // none of ours is meant for the children.
            .env_remove(STAGE_ENV)
            // Held by `child` (see the module docs): closed when xtask
            // ends, however it ends.
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr);
        if own_group {
            command.process_group(0);
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        let stdout = child.stdout.take();
        self.procs.push(Proc {
            name: name.to_string(),
            child,
            log: log.clone(),
            stopping: false,
            own_group,
        });
        let (tx, rx) = mpsc::channel();
        let wanted = ready.to_string();
        std::thread::spawn(move || {
            let Some(stdout) = stdout else { return };
            let mut sent = false;
            // Read to the end, so the child never blocks on a full pipe.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !sent && line.starts_with(&wanted) {
                    let _ = tx.send(line);
                    sent = true;
                }
            }
        });
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(line) = rx.recv_timeout(POLL) {
                return Ok(line);
            }
            // Ctrl-C reached the gateway (started early for this): stop.
            if let Some(gateway) = self
                .procs
                .iter_mut()
                .find(|p| p.name == "gateway" && p.name != name)
            {
                if let Ok(Some(_)) = gateway.child.try_wait() {
                    gateway.stopping = true;
                    return Err(format!("interrupted while {name} was starting"));
                }
            }
            let proc = self.procs.last_mut().expect("just pushed");
            if let Ok(Some(status)) = proc.child.try_wait() {
                return Err(format!(
                    "{name} exited during startup ({status}); the end of its log:\n{}",
                    tail(&log)
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{name} was not ready within {READY_TIMEOUT:?}; the end of its log:\n{}",
                    tail(&log)
                ));
            }
        }
    }
}

/// Waits until something accepts connections at `address`.
fn wait_accepting(address: SocketAddr, what: &str, demo: &mut Demo) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    while TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_err() {
        let broker = demo.procs.first_mut().expect("the broker runs");
        if let Ok(Some(status)) = broker.child.try_wait() {
            return Err(format!(
                "the broker exited during startup ({status}); the end of its log:\n{}",
                tail(&broker.log)
            ));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{what} ({address}) did not accept within {READY_TIMEOUT:?}"
            ));
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}

/// The second stage: starts everything, reports, and waits for Ctrl-C.
fn supervise(ports: Ports) -> Result<(), String> {
    free(ports)?;
    let release = super::root().join("target/release");
    let courier = release.join("courier");
    let app = release.join("courier-example-web");
    let dir = std::env::temp_dir().join(format!("courier-demo-web-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut demo = Demo {
        dir: dir.clone(),
        procs: Vec::new(),
    };
    let broker_url = format!("tcp://127.0.0.1:{}", ports.broker);
    let ws_url = format!("ws://127.0.0.1:{}", ports.ws);
    let metrics = format!("127.0.0.1:{}", ports.metrics);
    let database = format!("sqlite://{}", dir.join("tickets.db").display());
    let broker_data = dir.join("broker");
    let broker_data = broker_data.to_string_lossy();

    eprintln!("starting the broker ...");
    let courier = courier.to_string_lossy();
    demo.start(
        "broker",
        Path::new("sh"),
        &[
            "-c",
            PARENT_WATCH,
            "sh",
            &courier,
            "serve",
            "--listen",
            &broker_url,
            "--listen",
            &ws_url,
            "--metrics",
            &metrics,
            "--data",
            &broker_data,
        ],
        "listening",
        true,
    )?;
    for (port, what) in [
        (ports.broker, "the broker"),
        (ports.ws, "the broker's WebSocket"),
    ] {
        wait_accepting(SocketAddr::from(([127, 0, 0, 1], port)), what, &mut demo)?;
    }
    eprintln!("starting the gateway (Ctrl-C stops the demo from here on) ...");
    let http = format!("127.0.0.1:{}", ports.http);
    let line = demo.start(
        "gateway",
        &app,
        &[
            "gateway",
            "--exit-with-parent",
            "--broker",
            &broker_url,
            "--ws-url",
            &ws_url,
            "--listen",
            &http,
        ],
        "gateway listening on ",
        false,
    )?;
    let common = [
        "--exit-with-parent",
        "--broker",
        broker_url.as_str(),
        "--database",
        database.as_str(),
    ];
    eprintln!("starting the worker and two services ...");
    demo.start(
        "worker",
        &app,
        &[&["worker"], &common[..]].concat(),
        "worker ready",
        true,
    )?;
    for n in 1..=2 {
        let name = format!("service {n}");
        demo.start(
            &name,
            &app,
            &[&["service"], &common[..]].concat(),
            "service ready",
            true,
        )?;
    }
    let url = line
        .trim_start_matches("gateway listening on ")
        .trim()
        .to_string();

    let pids: Vec<String> = demo
        .procs
        .iter()
        .map(|p| format!("{} {}", p.name, p.pid()))
        .collect();
    let service_pids: Vec<String> = demo
        .procs
        .iter()
        .filter(|p| p.name.starts_with("service"))
        .map(|p| p.pid().to_string())
        .collect();
    println!(
        "
  the app        {url}/
  the dashboard  http://{metrics}/
  processes      {pids}
  logs           {dir}/*.log

try:
  - open the app in two tabs; create a ticket in one: it appears in both at once
    (stored by the worker, pushed by the broker over WebSocket)
  - search, and watch \"answered by\" alternate between the two services
  - kill a service: kill {first}   (reads go on, answered by the other; then kill {second} too)
  - watch the dashboard while you do

Ctrl-C stops everything.",
        pids = pids.join(", "),
        dir = dir.display(),
        first = service_pids.first().map_or("", String::as_str),
        second = service_pids.get(1).map_or("", String::as_str),
    );

    // Runs until the gateway exits (Ctrl-C reaches it) or the broker dies.
    loop {
        std::thread::sleep(POLL);
        let mut ended = None;
        for (i, proc) in demo.procs.iter_mut().enumerate() {
            if proc.stopping {
                continue;
            }
            if let Ok(Some(status)) = proc.child.try_wait() {
                proc.stopping = true;
                ended = Some((i, status));
                break;
            }
        }
        let Some((i, status)) = ended else { continue };
        let proc = &demo.procs[i];
        match proc.name.as_str() {
            "gateway" if status.success() => {
                eprintln!("\nstopping ...");
                drop(demo);
                eprintln!("stopped; removed {}", dir.display());
                return Ok(());
            }
            "gateway" | "broker" => {
                let message = died(proc, status);
                drop(demo);
                return Err(message);
            }
            _ => eprintln!("{}", died(proc, status)),
        }
    }
}

/// What to say about a process that exited by itself.
fn died(proc: &Proc, status: ExitStatus) -> String {
    let how = if status.success() {
        "stopped".to_string()
    } else {
        format!("exited with {status}")
    };
    let mut text = format!("{} (pid {}) {how}", proc.name, proc.pid());
    if !status.success() {
        text.push_str(&format!("; the end of its log:\n{}", tail(&proc.log)));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn ports_default_and_move_together() {
        let p = parse(&[]).unwrap();
        assert_eq!(
            (p.broker, p.metrics, p.ws, p.http),
            (7878, 7879, 7880, 8080)
        );
        let p = parse(&args(&["--port", "9000", "--http", "9100"])).unwrap();
        assert_eq!(
            (p.broker, p.metrics, p.ws, p.http),
            (9000, 9001, 9002, 9100)
        );
        assert!(parse(&args(&["--port"])).is_err());
        assert!(parse(&args(&["--port", "65535"])).is_err());
        assert!(parse(&args(&["--http", "7879"])).is_err());
        assert!(parse(&args(&["--verbose"])).is_err());
    }

    /// The broker's wrapper stops its program when its stdin closes (xtask
    /// gone), and on SIGTERM, and exits with the program's status.
    #[test]
    fn the_parent_watch_stops_its_program_when_stdin_closes() {
        let start = |program: &str| {
            Command::new("sh")
                .args(["-c", PARENT_WATCH, "sh", "sh", "-c", program])
                .stdin(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let wait = |child: &mut Child| {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    return Some(status);
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    return None;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        // `exec sleep`: SIGTERM kills it (no handler), so it exits at once.
        let mut child = start("exec sleep 30");
        std::thread::sleep(Duration::from_millis(200));
        assert!(child.try_wait().unwrap().is_none(), "ended on its own");
        drop(child.stdin.take());
        let status = wait(&mut child).expect("still running after stdin closed");
        assert!(!status.success(), "{status}");

        let mut child = start("exec sleep 30");
        std::thread::sleep(Duration::from_millis(200));
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        assert!(wait(&mut child).is_some(), "SIGTERM was not forwarded");

        // A program that ends by itself: its status, with stdin still open.
        let mut child = start("exit 3");
        let status = wait(&mut child).expect("did not exit with its program");
        assert_eq!(status.code(), Some(3));
    }

    #[test]
    fn a_taken_port_is_named() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let ports = Ports {
            broker: port,
            metrics: 1,
            ws: 2,
            http: 3,
        };
        // Ports 1-3 may be bindable or not (privileges); ours is taken.
        let err = free(ports).unwrap_err();
        assert!(
            err.contains(&format!("127.0.0.1:{port} (the broker) is taken")),
            "{err}"
        );
    }
}
