//! The `courier` command and broker as real processes on loopback: every
//! command's output and exit code, a broker killed with SIGKILL under load
//! and restarted, competing consumer processes with one killed, and 5,000
//! subscriptions restored after a broker restart. Each test cleans up its
//! processes (killed on drop) and directories.

mod support;
use support::{command, spawn_client, stderr, stdout, COURIER};

use courier_test_support::TempDir;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use courier_pubsub::remote::RemotePubSub;
use courier_pubsub::{Event, SubscribeOptions};
use courier_queue::remote::RemoteQueue;
use courier_rpc::{Client, ClientConfig};

/// A `courier serve` process, killed when dropped.
struct BrokerProcess {
    child: Child,
    url: String,
}

impl BrokerProcess {
    /// Starts a broker on `listen` (port 0 for any) with data in `data`.
    fn start(data: &Path, listen: &str) -> BrokerProcess {
        BrokerProcess::start_with(&[], data, listen)
    }

    /// The same, run through `prefix` (say `ip netns exec NAME`).
    fn start_with(prefix: &[&str], data: &Path, listen: &str) -> BrokerProcess {
        BrokerProcess::start_full(prefix, data, listen, &[], Stdio::null)
    }

    /// The same with more `serve` flags, and its stderr where `stderr` says.
    fn start_full(
        prefix: &[&str],
        data: &Path,
        listen: &str,
        flags: &[&str],
        stderr: impl Fn() -> Stdio,
    ) -> BrokerProcess {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut child = command(prefix)
                .args([
                    "serve",
                    "--listen",
                    listen,
                    "--metrics",
                    "",
                    "--grace",
                    "1s",
                ])
                .args(flags)
                .arg("--data")
                .arg(data)
                .env_remove("NO_COLOR")
                .stdout(Stdio::piped())
                .stderr(stderr())
                .spawn()
                .expect("courier serve starts");
            let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
            match lines.next() {
                Some(Ok(line)) if line.starts_with("listening ") => {
                    // Keep reading its stdout so it never blocks on a full pipe.
                    std::thread::spawn(move || for _ in lines {});
                    return BrokerProcess {
                        child,
                        url: line["listening ".len()..].to_string(),
                    };
                }
                _ => {
                    // The port may still be held by a broker just killed.
                    let _ = child.kill();
                    let _ = child.wait();
                    assert!(Instant::now() < deadline, "courier serve did not start");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn address(&self) -> courier_transport::Address {
        self.url.parse().unwrap()
    }

    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then the exit status.
    fn terminate(mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the broker did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `courier --url URL ARGS…` with `stdin` and returns its output.
fn courier(url: &str, args: &[&str], stdin: &str) -> Output {
    courier_with(&[], url, args, stdin)
}

/// The same, run through `prefix`.
fn courier_with(prefix: &[&str], url: &str, args: &[&str], stdin: &str) -> Output {
    spawn_client(prefix, url, args, stdin)
        .wait_with_output()
        .unwrap()
}

/// A `courier worker …` process, killed when dropped.
struct WorkerProcess {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl WorkerProcess {
    fn start(url: &str, args: &[&str]) -> WorkerProcess {
        let mut child = Command::new(COURIER)
            .args(["--url", url, "worker"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = lines.next().unwrap().unwrap();
        assert!(ready.starts_with("ready"), "{ready}");
        WorkerProcess { child, lines }
    }

    fn finish(mut self) -> u64 {
        drop(self.child.stdin.take());
        let done = self.lines.next().unwrap().unwrap();
        done.strip_prefix("done ").unwrap().parse().unwrap()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn every_command_prints_what_it_should_and_exits_with_the_documented_code() {
    let dir = TempDir::new("commands");
    let broker = BrokerProcess::start(&dir.0.join("data"), "tcp://127.0.0.1:0");
    let url = broker.url.clone();

    // sub: started first, told when it is active (on stderr).
    let mut sub = Command::new(COURIER)
        .args(["--url", &url, "--json", "sub", "cli.>", "--count", "3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut sub_err = BufReader::new(sub.stderr.take().unwrap()).lines();
    assert!(sub_err.next().unwrap().unwrap().starts_with("subscribed"));
    let published = courier(&url, &["pub", "cli.lines", "--lines"], "a\nb\nc\n");
    assert!(published.status.success(), "{}", stderr(&published));
    let got = sub.wait_with_output().unwrap();
    assert!(got.status.success());
    let lines: Vec<serde_json::Value> = stdout(&got)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let data: Vec<&str> = lines.iter().map(|l| l["data"].as_str().unwrap()).collect();
    assert_eq!(data, ["a", "b", "c"]);
    assert_eq!(lines[0]["subject"], "cli.lines");

    // queue push, pop, stats, list, ack by id.
    let pushed = courier(
        &url,
        &["queue", "push", "work", "--lines"],
        "one\ntwo\nthree\n",
    );
    assert!(pushed.status.success(), "{}", stderr(&pushed));
    let popped = courier(
        &url,
        &["--json", "queue", "pop", "work", "--count", "2"],
        "",
    );
    assert!(popped.status.success(), "{}", stderr(&popped));
    let popped: Vec<serde_json::Value> = stdout(&popped)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(popped[0]["data"], "one");
    assert_eq!(popped[1]["data"], "two");
    let looked = courier(&url, &["queue", "pop", "work", "--requeue"], "");
    let id = stdout(&looked).split(':').next().unwrap().to_string();
    let acked = courier(&url, &["queue", "ack", "work", &id], "");
    assert!(acked.status.success(), "{}", stderr(&acked));
    let stats = courier(&url, &["--json", "queue", "stats", "work"], "");
    let stats: serde_json::Value = serde_json::from_str(&stdout(&stats)).unwrap();
    assert_eq!(
        (stats["depth"].as_u64(), stats["acknowledged"].as_u64()),
        (Some(0), Some(3))
    );
    assert!(stdout(&courier(&url, &["queue", "list"], "")).contains("work"));
    let empty = courier(&url, &["queue", "pop", "work", "--wait", "100ms"], "");
    assert_eq!(empty.status.code(), Some(4), "{}", stderr(&empty));

    // request to a service instance in another process.
    let responder = WorkerProcess::start(&url, &["respond", "svc.shout", "shout"]);
    let reply = courier(&url, &["request", "svc.shout", "hello"], "");
    assert!(reply.status.success(), "{}", stderr(&reply));
    assert!(
        stdout(&reply).starts_with("HELLO (from process"),
        "{}",
        stdout(&reply)
    );
    assert_eq!(responder.finish(), 1);

    // stats over RPC.
    let stats = courier(&url, &["--json", "stats"], "");
    let stats: serde_json::Value = serde_json::from_str(&stdout(&stats)).unwrap();
    assert!(stats["published"].as_u64().unwrap() >= 4, "{stats}");

    // Errors: one line on stderr, and the documented code.
    for (args, code) in [
        (vec!["pub", "bad..subject", "x"], 2),
        (vec!["request", "nobody.home", "x", "--timeout", "200ms"], 4),
        (vec!["sub", "a.>.b"], 2),
        (vec!["no-such-command"], 2),
    ] {
        let output = courier(&url, &args, "");
        assert_eq!(
            output.status.code(),
            Some(code),
            "{args:?}: {}",
            stderr(&output)
        );
    }
    let unreachable = courier("tcp://127.0.0.1:1", &["pub", "a", "b"], "");
    assert_eq!(unreachable.status.code(), Some(3));
    let message = stderr(&unreachable);
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(
        message.starts_with("courier: error: cannot reach the broker at tcp://127.0.0.1:1"),
        "{message}"
    );

    // SIGTERM: a graceful exit with status 0.
    assert_eq!(broker.terminate().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_under_load_loses_no_acknowledged_message_and_clients_reconnect() {
    let dir = TempDir::new("kill9");
    let data = dir.0.join("data");
    let broker = BrokerProcess::start(&data, "tcp://127.0.0.1:0");
    let listen = broker.url.clone();
    let client = Client::connect(&broker.address(), ClientConfig::default())
        .await
        .unwrap();
    let queue = RemoteQueue::with_client(client.clone(), "ledger");
    let bus = RemotePubSub::with_client(client);
    let mut subscription = bus
        .subscribe("load.>", SubscribeOptions::default())
        .await
        .unwrap();

    // A producer enqueues one message at a time, remembering which the
    // broker acknowledged, until told to stop.
    let acknowledged = Arc::new(Mutex::new(BTreeSet::new()));
    let attempts = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let (queue, acknowledged, attempts, stop) = (
            queue.clone(),
            acknowledged.clone(),
            attempts.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Acquire) {
                attempts.fetch_add(1, Ordering::Relaxed);
                match queue
                    .enqueue(courier_queue::Message::new(n.to_le_bytes().to_vec()))
                    .await
                {
                    Ok(_) => {
                        acknowledged.lock().unwrap().insert(n);
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
                n += 1;
            }
        })
    };
    let wait_for = |what: &'static str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_for("300 acknowledged enqueues", &|| {
        acknowledged.lock().unwrap().len() >= 300
    });
    broker.kill9();
    let before_restart = acknowledged.lock().unwrap().len();

    // While the broker is down, a publish never vanishes silently: a
    // confirmed one fails, and a one-way one fails itself or its flush.
    let publisher = bus.publisher();
    assert!(publisher.publish_confirmed("load.lost", "x").await.is_err());
    let queued = publisher.publish("load.lost", "x").await;
    assert!(queued.is_err() || publisher.flush().await.is_err());

    let broker = BrokerProcess::start(&data, &listen);
    assert_eq!(broker.url, listen);
    wait_for("300 more acknowledged enqueues", &|| {
        acknowledged.lock().unwrap().len() >= before_restart + 300
    });
    stop.store(true, Ordering::Release);
    producer.await.unwrap();

    // The subscription restored itself and hears new messages.
    let event = tokio::time::timeout(Duration::from_secs(30), subscription.recv())
        .await
        .expect("the subscription noticed the restart")
        .unwrap()
        .unwrap();
    assert_eq!(event, Event::Restored);
    assert_eq!(
        publisher
            .publish_confirmed("load.after", "y")
            .await
            .unwrap(),
        1
    );
    let Event::Message(m) = subscription.recv().await.unwrap().unwrap() else {
        panic!("a message")
    };
    assert_eq!(&m.payload[..], b"y");

    // Every acknowledged enqueue is there (unacknowledged ones may be too).
    let mut stored = BTreeSet::new();
    // Counted before the consumer takes any.
    let depth = queue.stats().await.unwrap().depth;
    let mut consumer = queue.consumer(256).await.unwrap();
    for _ in 0..depth {
        let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .unwrap()
            .unwrap();
        stored.insert(u64::from_le_bytes(delivery.payload[..].try_into().unwrap()));
        delivery.ack().await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    let lost: Vec<_> = acknowledged.difference(&stored).collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    // Some enqueues failed while the broker was down, and the rest went on.
    assert!(attempts.load(Ordering::Relaxed) > acknowledged.len() as u64);
    drop(broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn competing_consumer_processes_share_the_work_and_a_killed_one_hands_its_messages_back() {
    let dir = TempDir::new("compete");
    let broker = BrokerProcess::start(&dir.0.join("data"), "tcp://127.0.0.1:0");
    let queue = RemoteQueue::with_client(
        Client::connect(&broker.address(), ClientConfig::default())
            .await
            .unwrap(),
        "jobs",
    );
    const JOBS: u64 = 1500;
    queue
        .enqueue_batch(
            (0..JOBS)
                .map(|n| courier_queue::Message::new(n.to_le_bytes().to_vec()))
                .collect(),
        )
        .await
        .unwrap();
    let mut workers: Vec<WorkerProcess> = (0..3)
        .map(|_| WorkerProcess::start(&broker.url, &["consume", "jobs"]))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while queue.stats().await.unwrap().acknowledged < JOBS / 5 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let victim = workers.remove(0);
    drop(victim); // SIGKILL, holding up to its prefetch of leased messages.
    loop {
        let stats = queue.stats().await.unwrap();
        if stats.acknowledged == JOBS {
            assert_eq!((stats.depth, stats.in_flight), (0, 0));
            assert!(
                stats.redelivered >= 1,
                "the victim's leases came back: {stats:?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{stats:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let shares: Vec<u64> = workers.into_iter().map(WorkerProcess::finish).collect();
    assert!(
        shares.iter().all(|s| *s > 0),
        "both survivors worked: {shares:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_subscriptions_and_a_group_membership_come_back_after_a_broker_restart() {
    const SUBSCRIPTIONS: usize = 5000;
    let dir = TempDir::new("many");
    let data = dir.0.join("data");
    let broker = BrokerProcess::start(&data, "tcp://127.0.0.1:0");
    let listen = broker.url.clone();
    let bus = RemotePubSub::connect(&broker.address(), ClientConfig::default())
        .await
        .unwrap();
    let (events, mut arrivals) = tokio::sync::mpsc::channel::<(usize, Event)>(1024);
    for n in 0..=SUBSCRIPTIONS {
        // The last one is a queue-group membership.
        let (filter, options) = if n == SUBSCRIPTIONS {
            (
                "many.group".to_string(),
                SubscribeOptions::default().group("g"),
            )
        } else {
            (format!("many.{n}"), SubscribeOptions::default())
        };
        let mut subscription = bus.subscribe(&filter, options).await.unwrap();
        let events = events.clone();
        tokio::spawn(async move {
            while let Some(Ok(event)) = subscription.recv().await {
                if events.send((n, event)).await.is_err() {
                    return;
                }
            }
        });
    }
    broker.kill9();
    let broker = BrokerProcess::start(&data, &listen);
    let mut restored = BTreeSet::new();
    while restored.len() <= SUBSCRIPTIONS {
        let (n, event) = tokio::time::timeout(Duration::from_secs(60), arrivals.recv())
            .await
            .expect("every subscription restores itself")
            .unwrap();
        assert_eq!(event, Event::Restored, "subscription {n}");
        restored.insert(n);
    }
    let publisher = bus.publisher();
    let delivered = publisher
        .publish_batch_confirmed(
            (0..SUBSCRIPTIONS)
                .map(|n| (format!("many.{n}"), n.to_string()))
                .chain([("many.group".to_string(), "g".to_string())]),
        )
        .await
        .unwrap();
    assert_eq!(delivered, SUBSCRIPTIONS as u64 + 1);
    let mut heard = BTreeSet::new();
    while heard.len() <= SUBSCRIPTIONS {
        let (n, event) = tokio::time::timeout(Duration::from_secs(60), arrivals.recv())
            .await
            .unwrap()
            .unwrap();
        let Event::Message(m) = event else {
            panic!("{event:?}")
        };
        if n < SUBSCRIPTIONS {
            assert_eq!(m.payload, n.to_string().as_bytes());
        }
        heard.insert(n);
    }
    drop(broker);
}

/// Two network namespaces joined by a veth pair, removed when dropped.
struct Namespaces {
    broker: String,
    client: String,
}

impl Namespaces {
    const BROKER_IP: &'static str = "10.231.0.1";

    /// Creates them, or says why it cannot (not root, no iproute2, no
    /// permission to make namespaces).
    fn create() -> Result<Namespaces, String> {
        let ip = support::netns::ip;
        let id = std::process::id() % 100_000;
        let spaces = Namespaces {
            broker: format!("courier-b{id}"),
            client: format!("courier-c{id}"),
        };
        let (vb, vc) = (format!("cvb{id}"), format!("cvc{id}"));
        ip(&["netns", "add", &spaces.broker])?;
        // From here on, dropping `spaces` removes what was made.
        ip(&["netns", "add", &spaces.client])?;
        ip(&["link", "add", &vb, "type", "veth", "peer", "name", &vc])?;
        ip(&["link", "set", &vb, "netns", &spaces.broker])?;
        ip(&["link", "set", &vc, "netns", &spaces.client])?;
        for (space, link, address) in [
            (&spaces.broker, &vb, "10.231.0.1/24"),
            (&spaces.client, &vc, "10.231.0.2/24"),
        ] {
            ip(&["-n", space, "addr", "add", address, "dev", link])?;
            ip(&["-n", space, "link", "set", link, "up"])?;
            ip(&["-n", space, "link", "set", "lo", "up"])?;
        }
        Ok(spaces)
    }

    fn exec(space: &str) -> [&str; 4] {
        ["ip", "netns", "exec", space]
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth pair, and the pair with it.
        for space in [&self.broker, &self.client] {
            let _ = Command::new("ip").args(["netns", "del", space]).status();
        }
    }
}

#[test]
fn across_network_namespaces_pub_sub_and_queues_survive_a_broker_kill() {
    let spaces = match Namespaces::create() {
        Ok(spaces) => spaces,
        Err(reason) => {
            println!("skipped: cannot create network namespaces ({reason})");
            return;
        }
    };
    let dir = TempDir::new("netns");
    let in_broker = Namespaces::exec(&spaces.broker);
    let in_client = Namespaces::exec(&spaces.client);
    let listen = format!("tcp://{}:0", Namespaces::BROKER_IP);
    let broker = BrokerProcess::start_with(&in_broker, &dir.0.join("data"), &listen);
    let url = broker.url.clone();
    assert!(url.starts_with("tcp://10.231.0.1:"), "{url}");

    // From the client namespace, over the veth link only.
    let mut sub = command(&in_client)
        .args(["--url", &url, "sub", "net.>", "--count", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut sub_err = BufReader::new(sub.stderr.take().unwrap()).lines();
    assert!(sub_err.next().unwrap().unwrap().starts_with("subscribed"));
    let published = courier_with(&in_client, &url, &["pub", "net.a", "--lines"], "x\ny\n");
    assert!(published.status.success(), "{}", stderr(&published));
    let got = sub.wait_with_output().unwrap();
    assert_eq!(stdout(&got), "net.a: x\nnet.a: y\n");
    let pushed = courier_with(&in_client, &url, &["queue", "push", "netq", "kept"], "");
    assert!(pushed.status.success(), "{}", stderr(&pushed));

    // kill -9 the broker: a publish from the other namespace fails loudly.
    let port = url.rsplit(':').next().unwrap().to_string();
    broker.kill9();
    let down = courier_with(&in_client, &url, &["pub", "net.a", "lost"], "");
    assert_eq!(down.status.code(), Some(3), "{}", stderr(&down));

    // Restarted on the same address and data: the stored message is there.
    let listen = format!("tcp://{}:{port}", Namespaces::BROKER_IP);
    let broker = BrokerProcess::start_with(&in_broker, &dir.0.join("data"), &listen);
    let popped = courier_with(
        &in_client,
        &broker.url,
        &["queue", "pop", "netq", "--wait", "10s"],
        "",
    );
    assert!(popped.status.success(), "{}", stderr(&popped));
    assert!(stdout(&popped).ends_with(": kept\n"), "{}", stdout(&popped));
    drop(broker);
}

#[test]
fn tls_and_tokens_from_the_command_line() {
    let dir = TempDir::new("tls");
    let certs = dir.0.join("certs");
    let generated = courier(
        "tcp://127.0.0.1:1",
        &["cert", "generate", "--dir", certs.to_str().unwrap()],
        "",
    );
    assert!(generated.status.success(), "{}", stderr(&generated));
    let config = dir.0.join("courier.toml");
    std::fs::write(
        &config,
        format!(
            "tls_cert = {:?}\ntls_key = {:?}\n[auth]\nrequired = true\n[[auth.users]]\nname = \"app\"\ntoken = \"app-token-123\"\npublish = [\"tls.>\"]\nproduce = [\"tlsq\"]\nconsume = [\"tlsq\"]\n",
            certs.join("server.pem"),
            certs.join("server-key.pem")
        ),
    )
    .unwrap();
    let mut child = Command::new(COURIER)
        .args([
            "serve",
            "--listen",
            "tls://127.0.0.1:0",
            "--metrics",
            "",
            "--grace",
            "1s",
        ])
        .arg("--config")
        .arg(&config)
        .arg("--data")
        .arg(dir.0.join("data"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let line = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .next()
        .unwrap()
        .unwrap();
    let broker = BrokerProcess {
        child,
        url: line["listening ".len()..].replace("127.0.0.1", "localhost"),
    };
    let url = broker.url.clone();
    let ca = certs.join("ca.pem");
    let ca = ca.to_str().unwrap();
    let tls = |args: &[&str], token: &str| {
        let mut all = vec!["--tls-ca", ca, "--token", token];
        all.extend_from_slice(args);
        courier(&url, &all, "")
    };
    let ok = tls(&["queue", "push", "tlsq", "secret work"], "app-token-123");
    assert!(ok.status.success(), "{}", stderr(&ok));
    let popped = tls(&["queue", "pop", "tlsq"], "app-token-123");
    assert!(
        stdout(&popped).ends_with(": secret work\n"),
        "{}",
        stderr(&popped)
    );
    // Wrong token, and a permission the token does not carry: exit 5.
    let wrong = tls(&["pub", "tls.x", "y"], "nope");
    assert_eq!(wrong.status.code(), Some(5), "{}", stderr(&wrong));
    assert!(!stderr(&wrong).contains("nope"));
    let denied = tls(&["pub", "other.x", "y"], "app-token-123");
    assert_eq!(denied.status.code(), Some(5), "{}", stderr(&denied));
    // Without the CA, no fallback to plain text: a clear error.
    let no_ca = courier(&url, &["--token", "app-token-123", "pub", "tls.x", "y"], "");
    assert!(!no_ca.status.success());
    assert!(stderr(&no_ca).contains("tls://"), "{}", stderr(&no_ca));
}

/// The soft limit on open files, from /proc (Linux).
fn open_file_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            limits
                .lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        })
        .unwrap_or(1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_garbage_and_silent_connections_does_not_stop_a_legitimate_client() {
    let dir = TempDir::new("flood");
    let broker = BrokerProcess::start(&dir.0.join("data"), "tcp://127.0.0.1:0");
    let target: std::net::SocketAddr = broker.url["tcp://".len()..].parse().unwrap();
    // 10,000, or as many as this process may open.
    let flood = 10_000.min(open_file_limit().saturating_sub(500));
    println!("flooding with {flood} connections");

    let client = Client::connect(&broker.address(), ClientConfig::default())
        .await
        .unwrap();
    let bus = RemotePubSub::with_client(client.clone());
    let mut sub = bus
        .subscribe("legit", SubscribeOptions::default())
        .await
        .unwrap();
    let publisher = bus.publisher();
    let queue = RemoteQueue::with_client(client, "legit");
    let mut consumer = queue.consumer(1).await.unwrap();

    let flooding = tokio::spawn(async move {
        let mut held = Vec::new();
        for n in 0..flood {
            let Ok(mut stream) = tokio::net::TcpStream::connect(target).await else {
                continue;
            };
            if n % 2 == 0 {
                // Garbage: refused at the preamble.
                let _ = tokio::io::AsyncWriteExt::write_all(
                    &mut stream,
                    b"GET / HTTP/1.1\r\n\r\n\xff\xfe",
                )
                .await;
            }
            // Silent ones are held open: half-open handshakes.
            held.push(stream);
        }
        held
    });
    // The legitimate client works all through the flood.
    let mut rounds = 0u64;
    while !flooding.is_finished() || rounds < 20 {
        publisher
            .publish("legit", rounds.to_le_bytes().to_vec())
            .await
            .unwrap();
        let Some(Ok(Event::Message(m))) = sub.recv().await else {
            panic!("a message")
        };
        assert_eq!(&m.payload[..], &rounds.to_le_bytes());
        queue
            .enqueue(courier_queue::Message::new(rounds.to_le_bytes().to_vec()))
            .await
            .unwrap();
        let delivery = consumer.recv().await.unwrap();
        delivery.ack().await.unwrap();
        rounds += 1;
    }
    let held = flooding.await.unwrap();
    // A new client gets in while the silent connections are still open.
    let late = RemotePubSub::connect(&broker.address(), ClientConfig::default())
        .await
        .expect("a new client is not starved");
    assert_eq!(
        late.publisher()
            .publish_confirmed("legit", "late")
            .await
            .unwrap(),
        1
    );
    println!("{rounds} publish/consume rounds during the flood");
    drop(held);
}

/// Sends `signal` (STOP, CONT, ...) to a process.
fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_within_its_deadline_with_a_frozen_subscriber() {
    let dir = TempDir::new("frozen-subscriber");
    let broker = BrokerProcess::start(&dir.0.join("data"), "tcp://127.0.0.1:0");
    let mut subscriber = Command::new(COURIER)
        .args(["--url", &broker.url, "sub", "big.>"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(subscriber.stderr.take().unwrap()).lines();
    let ready = lines.next().unwrap().unwrap();
    assert!(ready.starts_with("subscribed"), "{ready}");
    signal(subscriber.id(), "STOP");

    // Far more than the socket buffers hold, so the broker's writes to the
    // frozen subscriber block.
    let bus = RemotePubSub::connect(&broker.address(), ClientConfig::default())
        .await
        .unwrap()
        .publisher();
    let payload = vec![7u8; 512 * 1024];
    for _ in 0..100 {
        bus.publish("big.data", payload.clone()).await.unwrap();
    }

    // `--grace 1s`: the broker gives up on the subscriber and exits well
    // before `terminate`'s 30 s limit (it used to hang for good).
    let status = broker.terminate();
    assert!(status.success(), "{status:?}");
    signal(subscriber.id(), "CONT");
    let _ = subscriber.kill();
    let _ = subscriber.wait();
}

#[test]
fn serve_refuses_an_unknown_courier_variable_as_it_refuses_an_unknown_key() {
    let dir = TempDir::new("env-typo");
    let output = Command::new(COURIER)
        .args(["serve", "--listen", "tcp://127.0.0.1:0", "--metrics", ""])
        .arg("--data")
        .arg(&dir.0)
        .env("COURIER_MAX_DELIVERYS", "3")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("COURIER_MAX_DELIVERYS is not a setting"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn queue_stats_prints_a_table_and_json_stays_one_object() {
    let dir = TempDir::new("stats-table");
    let broker = BrokerProcess::start(&dir.0.join("data"), "tcp://127.0.0.1:0");
    let url = broker.url.clone();
    let pushed = courier(&url, &["queue", "push", "tbl", "--lines"], "a\nb\n");
    assert!(pushed.status.success(), "{}", stderr(&pushed));
    let table = courier(&url, &["queue", "stats", "tbl"], "");
    assert!(table.status.success(), "{}", stderr(&table));
    let text = stdout(&table);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "queue tbl", "{text}");
    let waiting = lines
        .iter()
        .find(|l| l.trim_start().starts_with("waiting"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(waiting.ends_with(" 2"), "{text}");
    assert!(
        !text.contains("QueueStats") && !text.contains('{'),
        "{text}"
    );
    let json = courier(&url, &["--json", "queue", "stats", "tbl"], "");
    let json: serde_json::Value = serde_json::from_str(stdout(&json).trim()).unwrap();
    assert_eq!(json["depth"].as_u64(), Some(2));
}

#[test]
fn a_redirected_broker_log_has_no_colour_codes() {
    let dir = TempDir::new("log-colour");
    std::fs::create_dir_all(&dir.0).unwrap();
    let log = dir.0.join("broker.log");
    let broker = BrokerProcess::start_full(
        &[],
        &dir.0.join("data"),
        "tcp://127.0.0.1:0",
        &["--log", "debug"],
        || Stdio::from(std::fs::File::create(&log).unwrap()),
    );
    assert_eq!(broker.terminate().code(), Some(0));
    let written = std::fs::read_to_string(&log).unwrap();
    assert!(written.contains("shutting down"), "{written}");
    assert!(
        !written.contains('\u{1b}'),
        "escape codes in a file: {written:?}"
    );
}

#[test]
fn serve_takes_the_queue_keys_as_flags() {
    let dir = TempDir::new("serve-flags");
    let broker = BrokerProcess::start_full(
        &[],
        &dir.0.join("data"),
        "tcp://127.0.0.1:0",
        &[
            "--max-deliveries",
            "1",
            "--fsync",
            "interval",
            "--fsync-interval",
            "2ms",
        ],
        Stdio::null,
    );
    let url = broker.url.clone();
    let pushed = courier(&url, &["queue", "push", "once", "x"], "");
    assert!(pushed.status.success(), "{}", stderr(&pushed));
    // One delivery given back: with --max-deliveries 1 it is a dead letter.
    let looked = courier(&url, &["queue", "pop", "once", "--requeue"], "");
    assert!(looked.status.success(), "{}", stderr(&looked));
    let stats = |queue: &str| {
        let output = courier(&url, &["--json", "queue", "stats", queue], "");
        assert!(output.status.success(), "{}", stderr(&output));
        serde_json::from_str::<serde_json::Value>(stdout(&output).trim()).unwrap()
    };
    // The dead letter is stored by the nack's own settle, before it returns.
    assert_eq!(stats("once")["dead_lettered"].as_u64(), Some(1));
    assert_eq!(stats("once.dlq")["depth"].as_u64(), Some(1));
    let refused = Command::new(COURIER)
        .args(["serve", "--max-deliveries", "0"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
}

/// `courier sub FILTER ARGS…` started, returned once it says it is subscribed.
fn subscribed(url: &str, filter: &str, args: &[&str]) -> Child {
    let mut sub = Command::new(COURIER)
        .args(["--url", url, "sub", filter])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(sub.stderr.as_mut().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("subscribed"), "{first}");
    sub
}

#[test]
fn sub_with_a_timeout_exits_4_when_nothing_more_arrives() {
    let dir = TempDir::new("sub-timeout");
    let broker = BrokerProcess::start(&dir.0.join("data"), "tcp://127.0.0.1:0");
    let url = broker.url.clone();

    let silent = courier(&url, &["sub", "quiet.>", "--timeout", "100ms"], "");
    assert_eq!(silent.status.code(), Some(4), "{}", stderr(&silent));
    assert!(
        stderr(&silent).contains("no message on quiet.>"),
        "{}",
        stderr(&silent)
    );

    // With --count, the timeout bounds the wait for each next message: one
    // arrives, the second never does.
    let sub = subscribed(&url, "tick.>", &["--count", "2", "--timeout", "3s"]);
    let published = courier(&url, &["pub", "tick.one", "1"], "");
    assert!(published.status.success(), "{}", stderr(&published));
    let got = sub.wait_with_output().unwrap();
    assert_eq!(got.status.code(), Some(4), "{}", stderr(&got));
    assert_eq!(stdout(&got), "tick.one: 1\n");
    assert!(
        stderr(&got).contains("no further message"),
        "{}",
        stderr(&got)
    );

    // Everything asked for in time: success.
    let sub = subscribed(&url, "tock.>", &["--count", "1", "--timeout", "30s"]);
    let published = courier(&url, &["pub", "tock.one", "1"], "");
    assert!(published.status.success(), "{}", stderr(&published));
    let got = sub.wait_with_output().unwrap();
    assert!(got.status.success(), "{}", stderr(&got));

    let bad = courier(&url, &["sub", "a", "--timeout", "soon"], "");
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_peek_shows_without_taking_and_purge_removes_what_waits() {
    // The command runs to its end on this thread; the consumer below keeps
    // its connection on the other.
    let courier = |url: &str, args: &[&str], stdin: &str| {
        tokio::task::block_in_place(|| courier(url, args, stdin))
    };
    let dir = TempDir::new("peek-purge");
    let broker = BrokerProcess::start(&dir.0.join("data"), "tcp://127.0.0.1:0");
    let url = broker.url.clone();
    let pushed = courier(&url, &["queue", "push", "pp", "--lines"], "a\nb\nc\nd\n");
    assert!(pushed.status.success(), "{}", stderr(&pushed));

    let peeked = courier(&url, &["queue", "peek", "pp", "--count", "2"], "");
    assert!(peeked.status.success(), "{}", stderr(&peeked));
    let data: Vec<String> = stdout(&peeked)
        .lines()
        .map(|l| l.split_once(": ").unwrap().1.to_string())
        .collect();
    assert_eq!(data, ["a", "b"]);
    // Nothing was taken: peeking again shows the same, and so does JSON.
    let again = courier(&url, &["--json", "queue", "peek", "pp"], "");
    let first: serde_json::Value = serde_json::from_str(stdout(&again).trim()).unwrap();
    assert_eq!(
        (first["data"].as_str(), first["deliveries"].as_u64()),
        (Some("a"), Some(0))
    );
    let depth = |url: &str| {
        let output = courier(url, &["--json", "queue", "stats", "pp"], "");
        let stats: serde_json::Value = serde_json::from_str(stdout(&output).trim()).unwrap();
        (
            stats["depth"].as_u64().unwrap(),
            stats["delivered"].as_u64().unwrap(),
        )
    };
    assert_eq!(depth(&url), (4, 0));

    // A consumer holds "a" (leased) while the rest is purged.
    let queue = RemoteQueue::connect(&broker.address(), "pp", ClientConfig::default())
        .await
        .unwrap();
    let mut consumer = queue.consumer(1).await.unwrap();
    let held = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .expect("a delivery within 30 s")
        .unwrap();
    assert_eq!(&held.payload[..], b"a");
    let purged = courier(&url, &["--json", "queue", "purge", "pp"], "");
    assert!(purged.status.success(), "{}", stderr(&purged));
    let purged: serde_json::Value = serde_json::from_str(stdout(&purged).trim()).unwrap();
    assert_eq!(purged["queue"], "pp");
    assert_eq!(
        (purged["purged"].as_u64(), purged["in_flight"].as_u64()),
        (Some(3), Some(1))
    );
    let empty = courier(&url, &["queue", "peek", "pp"], "");
    assert_eq!(empty.status.code(), Some(4), "{}", stderr(&empty));
    let text = courier(&url, &["queue", "purge", "pp"], "");
    assert_eq!(
        stdout(&text),
        "purged 0 messages from pp; 1 leased to consumers stay until answered\n"
    );
    // Given back, the leased message is there again: the purge lost nothing
    // that was in flight.
    held.nack(Duration::ZERO).await.unwrap();
    // The consumer may have taken it again before it goes; once gone, what
    // it held is ready.
    drop(consumer);
    let mut back = None;
    for _ in 0..1000 {
        let output = courier(&url, &["--json", "queue", "peek", "pp"], "");
        if output.status.success() {
            back = Some(serde_json::from_str::<serde_json::Value>(stdout(&output).trim()).unwrap());
            break;
        }
        assert_eq!(output.status.code(), Some(4), "{}", stderr(&output));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let back = back.expect("the leased message is back after its consumer went");
    assert_eq!(back["data"].as_str(), Some("a"));
    assert!(back["deliveries"].as_u64() >= Some(1), "{back}");

    // Bad input: an unknown queue, a bad count.
    for args in [
        &["queue", "peek", "nowhere"][..],
        &["queue", "purge", "nowhere"],
        &["queue", "stats", "nowhere"],
        &["queue", "peek", "pp", "--count", "0"],
        &["queue", "peek", "pp", "--count", "1001"],
    ] {
        let output = courier(&url, args, "");
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
        if args.contains(&"nowhere") {
            assert_eq!(stderr(&output).lines().count(), 1, "{}", stderr(&output));
        }
    }
    let unknown = courier(&url, &["queue", "purge", "nowhere"], "");
    assert!(
        stderr(&unknown).contains("no queue named \"nowhere\""),
        "{}",
        stderr(&unknown)
    );
}

#[test]
fn a_bad_queue_name_is_bad_input_before_any_broker_is_asked() {
    // Nobody listens there: the name is refused first, with exit 2.
    let url = "tcp://127.0.0.1:9";
    for args in [
        &["queue", "push", "../escape", "x"][..],
        &["queue", "pop", "a/b"],
        &["queue", "peek", ".."],
        &["queue", "purge", "has space"],
        &["queue", "stats", ""],
    ] {
        let output = courier(url, args, "");
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(
            stderr(&output).contains("invalid queue name"),
            "{args:?}: {}",
            stderr(&output)
        );
    }
}
