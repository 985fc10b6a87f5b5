//! The three-node cluster of real `courier serve` processes that the
//! cluster tests share: starting, killing and restarting nodes, running
//! `courier` against them, and bounded waits.

#![allow(dead_code)]

use super::{command, spawn_client, stderr, stdout};
use courier_test_support::TempDir;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

/// Node ids of every cluster here.
pub const IDS: [u64; 3] = [1, 2, 3];

/// Raft timers for the tests: quicker heartbeats than the default, and
/// elections after 0.8–1.6 s without one (not shorter: CI machines are
/// small and shared, and needless elections would make writes fail).
pub const TIMERS: &str = "heartbeat_ms = 100\nelection_min_ms = 800\nelection_max_ms = 1600\n";

/// The longest any single `courier` command may run before the test gives
/// up on it (a write to a cut-off leader takes the 10 s call deadline; a
/// connection into a black hole up to 4 × 10 s).
pub const COMMAND_LIMIT: Duration = Duration::from_secs(90);

/// A `courier serve` process, killed when dropped.
pub struct BrokerProcess {
    pub child: Child,
}

impl BrokerProcess {
    /// Starts node `id` of a cluster on `listen` (a fixed port, known to
    /// its peers), with `--peer` flags for `peers` and `--join` if `join`,
    /// run through `prefix` (say `ip netns exec NAME`), its log (warnings
    /// and errors) appended to `log`.
    #[allow(clippy::too_many_arguments)]
    pub fn start_node(
        prefix: &[&str],
        config: &Path,
        data: &Path,
        log: &Path,
        listen: &str,
        id: u64,
        peers: &[(u64, String)],
        join: bool,
    ) -> BrokerProcess {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log_file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap();
            let mut command = command(prefix);
            command
                .args([
                    "serve",
                    "--listen",
                    listen,
                    "--metrics",
                    "",
                    "--log",
                    "warn",
                ])
                .args(["--grace", "1s", "--node", &id.to_string()])
                .arg("--config")
                .arg(config)
                .arg("--data")
                .arg(data);
            for (peer, address) in peers {
                command.arg("--peer").arg(format!("{peer}={address}"));
            }
            if join {
                command.arg("--join");
            }
            let mut child = command
                .stdout(Stdio::piped())
                .stderr(log_file)
                .spawn()
                .expect("courier serve starts");
            let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
            match lines.next() {
                Some(Ok(line)) if line == format!("listening {listen}") => {
                    // Keep reading its stdout so it never blocks on a full pipe.
                    std::thread::spawn(move || for _ in lines {});
                    return BrokerProcess { child };
                }
                _ => {
                    // The port may still be held by a node just killed.
                    let _ = child.kill();
                    let _ = child.wait();
                    assert!(
                        Instant::now() < deadline,
                        "node {id} did not start on {listen}; its log:\n{}",
                        std::fs::read_to_string(log).unwrap_or_default()
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `courier` client process started in the background, killed when
/// dropped.
pub struct Background {
    pub child: Child,
    pub stdout: Option<std::thread::JoinHandle<Vec<u8>>>,
    pub stderr: Option<std::thread::JoinHandle<Vec<u8>>>,
}

impl Background {
    /// `courier --url URL ARGS…` through `prefix`, with `stdin`.
    pub fn start(prefix: &[&str], url: &str, args: &[&str], stdin: &str) -> Background {
        let mut child = spawn_client(prefix, url, args, stdin);
        let drain = |mut pipe: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                let _ = pipe.read_to_end(&mut bytes);
                bytes
            })
        };
        let stdout = drain(Box::new(child.stdout.take().unwrap()));
        let stderr = drain(Box::new(child.stderr.take().unwrap()));
        Background {
            child,
            stdout: Some(stdout),
            stderr: Some(stderr),
        }
    }

    /// Waits for it to exit (at most `COMMAND_LIMIT`), and its output.
    pub fn finish(mut self, what: &str) -> Output {
        let deadline = Instant::now() + COMMAND_LIMIT;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("`courier {what}` did not finish within {COMMAND_LIMIT:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        Output {
            status,
            stdout: self.stdout.take().unwrap().join().unwrap(),
            stderr: self.stderr.take().unwrap().join().unwrap(),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `courier --url URL ARGS…` through `prefix` with `stdin` and
/// returns its output (panics if it runs longer than `COMMAND_LIMIT`).
pub fn courier_with(prefix: &[&str], url: &str, args: &[&str], stdin: &str) -> Output {
    Background::start(prefix, url, args, stdin).finish(&args.join(" "))
}

/// Exit code, stdout and stderr, for assertion messages.
pub fn show(output: &Output) -> String {
    format!(
        "exit {:?}, stdout {:?}, stderr {:?}",
        output.status.code(),
        stdout(output),
        stderr(output)
    )
}

/// Asserts `output` is a success, and returns its stdout.
pub fn ok(output: Output) -> String {
    assert!(output.status.success(), "{}", show(&output));
    stdout(&output)
}

/// Calls `attempt` until it gives `Ok`, at most `tries` times and for at
/// most `limit`, pausing 100 ms between tries; panics with the last error.
pub fn retry<T>(
    what: &str,
    tries: usize,
    limit: Duration,
    mut attempt: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + limit;
    let mut last = String::new();
    for n in 1..=tries {
        match attempt() {
            Ok(value) => return value,
            Err(err) => last = err,
        }
        if Instant::now() >= deadline {
            panic!("{what}: gave up after {n} tries (time limit {limit:?}); last: {last}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what}: gave up after {tries} tries; last: {last}");
}

/// A port nobody listens on now: bound, learned, released.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Three cluster nodes, each maybe in its own network namespace. Its
/// processes are killed, then its directory removed, when dropped.
pub struct Cluster {
    /// Field order matters: the processes go before the directory.
    pub nodes: Vec<Option<BrokerProcess>>,
    /// Per node: the address it listens on and its peers reach it at.
    pub addresses: Vec<String>,
    /// Per node: what runs its processes (`ip netns exec NS`, or nothing).
    pub prefixes: Vec<Vec<String>>,
    /// What runs the test's clients.
    pub client_prefix: Vec<String>,
    pub config: PathBuf,
    pub dir: TempDir,
}

impl Cluster {
    /// Three nodes on loopback with `[cluster]` settings `extra` (besides
    /// the test timers), started.
    pub fn on_loopback(label: &str, extra: &str) -> Cluster {
        let addresses = IDS
            .iter()
            .map(|_| format!("tcp://127.0.0.1:{}", free_port()))
            .collect();
        Cluster::start(label, extra, addresses, vec![Vec::new(); 3], Vec::new())
    }

    pub fn start(
        label: &str,
        extra: &str,
        addresses: Vec<String>,
        prefixes: Vec<Vec<String>>,
        client_prefix: Vec<String>,
    ) -> Cluster {
        let dir = TempDir::new(label);
        let config = dir.0.join("courier.toml");
        std::fs::write(&config, format!("[cluster]\n{TIMERS}{extra}")).unwrap();
        let mut cluster = Cluster {
            nodes: IDS.iter().map(|_| None).collect(),
            addresses,
            prefixes,
            client_prefix,
            config,
            dir,
        };
        for id in IDS {
            cluster.start_node(id);
        }
        cluster
    }

    pub fn index(id: u64) -> usize {
        (id - 1) as usize
    }

    pub fn data(&self, id: u64) -> PathBuf {
        self.dir.0.join(format!("node-{id}"))
    }

    /// Node `id`'s log (warnings and errors), for failure messages.
    pub fn log(&self, id: u64) -> String {
        std::fs::read_to_string(self.dir.0.join(format!("node-{id}.log"))).unwrap_or_default()
    }

    /// Starts node `id` on its address and data directory, its `--peer`
    /// flags naming the other two.
    pub fn start_node(&mut self, id: u64) {
        self.launch(id, false);
    }

    /// Starts node `id` with `--join` and no `--peer` flags: it waits to be
    /// added instead of founding a cluster.
    pub fn start_joining(&mut self, id: u64) {
        self.launch(id, true);
    }

    pub fn launch(&mut self, id: u64, join: bool) {
        assert!(self.nodes[Cluster::index(id)].is_none(), "node {id} runs");
        let peers: Vec<(u64, String)> = IDS
            .iter()
            .filter(|&&other| other != id && !join)
            .map(|&other| (other, self.address(other).to_string()))
            .collect();
        let prefix: Vec<&str> = self.prefixes[Cluster::index(id)]
            .iter()
            .map(String::as_str)
            .collect();
        let node = BrokerProcess::start_node(
            &prefix,
            &self.config,
            &self.data(id),
            &self.dir.0.join(format!("node-{id}.log")),
            self.address(id),
            id,
            &peers,
            join,
        );
        self.nodes[Cluster::index(id)] = Some(node);
    }

    /// SIGKILL.
    pub fn kill(&mut self, id: u64) {
        self.nodes[Cluster::index(id)]
            .take()
            .expect("the node runs")
            .kill9();
    }

    pub fn address(&self, id: u64) -> &str {
        &self.addresses[Cluster::index(id)]
    }

    /// Every node's address, as a `--url` list.
    pub fn url(&self) -> String {
        self.addresses.join(",")
    }

    /// Every node's but `id`'s.
    pub fn url_without(&self, id: u64) -> String {
        IDS.iter()
            .filter(|&&other| other != id)
            .map(|&other| self.address(other))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `courier --url URL ARGS…` from the clients' place.
    pub fn courier(&self, url: &str, args: &[&str]) -> Output {
        let prefix: Vec<&str> = self.client_prefix.iter().map(String::as_str).collect();
        courier_with(&prefix, url, args, "")
    }

    /// `courier --url URL ARGS…` from node `id`'s own namespace.
    pub fn courier_at(&self, id: u64, url: &str, args: &[&str]) -> Output {
        let prefix: Vec<&str> = self.prefixes[Cluster::index(id)]
            .iter()
            .map(String::as_str)
            .collect();
        courier_with(&prefix, url, args, "")
    }

    /// Waits until `url` serves linearizable reads (a leader that a
    /// majority follows).
    pub fn wait_ready(&self, url: &str) {
        retry(
            "a leader serving reads",
            300,
            Duration::from_secs(40),
            || {
                let read = self.courier(url, &["kv", "get", "never/written"]);
                match read.status.code() {
                    Some(4) => Ok(()),
                    _ => Err(show(&read)),
                }
            },
        );
    }

    /// `--json cluster status` as answered by the leader, found through `url`.
    pub fn leader_status(&self, url: &str) -> serde_json::Value {
        retry("the leader's status", 300, Duration::from_secs(40), || {
            let output = self.courier(url, &["--json", "cluster", "status"]);
            if !output.status.success() {
                return Err(show(&output));
            }
            let status: serde_json::Value =
                serde_json::from_str(stdout(&output).trim()).map_err(|e| e.to_string())?;
            let leads = status["role"] == "leader" && status["leader"] == status["node"];
            if leads {
                Ok(status)
            } else {
                Err(format!("not from a leader: {status}"))
            }
        })
    }

    pub fn leader(&self, url: &str) -> u64 {
        self.leader_status(url)["leader"].as_u64().unwrap()
    }

    /// `kv put KEY VALUE` through `url`, sent again until it succeeds
    /// (only for writes that may be applied twice).
    pub fn put_until_done(&self, url: &str, key: &str, value: &str) -> u64 {
        retry(
            &format!("kv put {key}"),
            300,
            Duration::from_secs(40),
            || {
                let output = self.courier(url, &["kv", "put", key, value]);
                if output.status.success() {
                    revision(&stdout(&output)).ok_or_else(|| show(&output))
                } else {
                    Err(show(&output))
                }
            },
        )
    }

    /// Waits until node `id` alone, read stale, has `key` = `value`.
    pub fn wait_caught_up(&self, id: u64, key: &str, value: &str) {
        let want = format!("{value}\n");
        retry(
            &format!("node {id} catching up to {key} = {value}"),
            300,
            Duration::from_secs(40),
            || {
                let read = self.courier_at(id, self.address(id), &["kv", "get", key, "--stale"]);
                if read.status.success() && stdout(&read) == want {
                    Ok(())
                } else {
                    Err(format!(
                        "{}\nnode {id}'s log:\n{}",
                        show(&read),
                        self.log(id)
                    ))
                }
            },
        );
    }

    /// The ids and voter flags of the members in `status`.
    pub fn members(status: &serde_json::Value) -> Vec<(u64, bool)> {
        status["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["id"].as_u64().unwrap(), m["voter"].as_bool().unwrap()))
            .collect()
    }
}

/// The revision in `revision N\n`.
pub fn revision(text: &str) -> Option<u64> {
    text.strip_prefix("revision ")?.trim_end().parse().ok()
}
