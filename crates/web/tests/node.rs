//! The JavaScript client's own tests (`crates/web/js/test/*.test.mjs`, run
//! by Node's built-in test runner) against real gateways started here, in
//! process, over one [`Bus`]:
//!
//! - `COURIER_WS_URL`: an open gateway. A Rust responder on the bus answers
//!   `svc.echo` with the payload, ASCII letters uppercased.
//! - `COURIER_WS_DROP_URL`: an open gateway that a publish to `test.drop`
//!   restarts (every connection closed with 1001, a new gateway bound on the
//!   same port), so the module's reconnect meets a real broker going away.
//! - `COURIER_WS_TOKEN_URL` with `COURIER_TOKEN`: a gateway that requires a
//!   token; the token proves `alice`, who may do anything except touch
//!   subjects under `forbidden.`.
//!
//! Without `node` on the PATH the test is skipped (a line on stderr says
//! so), unless `CI_REQUIRE_NODE` is set, as CI sets it: then it fails.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use courier_pubsub::remote::PubSubAccess;
use courier_pubsub::{Bus, Event, Filter, Subject, SubscribeOptions};
use courier_rpc::{Authenticator, Secret};
use courier_web::{Gateway, GatewayConfig, WebServer};
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

/// How long the whole Node run may take before it is killed.
const NODE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a restarting gateway waits for its connections to close.
const RESTART_GRACE: Duration = Duration::from_secs(2);
/// The one token the authenticated gateway accepts.
const ALICE_TOKEN: &str = "alice-token-for-node-tests";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn javascript_client_tests_pass_against_real_gateways() -> Result<()> {
    let Some(node) = find_node()? else {
        return Ok(());
    };
    let bus = Bus::new();
    let mut tasks = Tasks::default();
    tasks.push(echo_responder(&bus).await?);

    let open = Gateway::new(bus.clone(), GatewayConfig::default())
        .serve(bind_local().await?, None)
        .context("serving the open gateway")?;
    let authed = Gateway::new(bus.clone(), GatewayConfig::default())
        .with_authenticator(Arc::new(OneToken), true)
        .with_access(Arc::new(NotForbidden))
        .serve(bind_local().await?, None)
        .context("serving the authenticated gateway")?;
    let restartable = Restartable::start(bus.clone()).await?;
    let drop_url = restartable.url();
    tasks.push(restartable.clone().on_publish_to(&bus, "test.drop").await?);

    let run = run_node(
        &node,
        &[
            ("COURIER_WS_URL", open.url()),
            ("COURIER_WS_DROP_URL", drop_url),
            ("COURIER_WS_TOKEN_URL", authed.url()),
            ("COURIER_TOKEN", ALICE_TOKEN.to_string()),
        ],
    )
    .await;

    drop(tasks);
    restartable.shutdown().await;
    open.shutdown(Duration::from_secs(1)).await;
    authed.shutdown(Duration::from_secs(1)).await;
    run
}

/// `node` and the flags it needs for a global `WebSocket`, or `None` to
/// skip (no `node`, and CI did not ask for it).
fn find_node() -> Result<Option<Node>> {
    let has_websocket = |flags: &[&str]| {
        std::process::Command::new("node")
            .args(flags)
            .args([
                "-e",
                "process.exit(typeof WebSocket === 'function' ? 0 : 1)",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
    };
    match has_websocket(&[]) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            if std::env::var_os("CI_REQUIRE_NODE").is_some() {
                bail!("node not found: install Node.js (Debian: apt-get install nodejs)");
            }
            eprintln!("skipped: node not found (set CI_REQUIRE_NODE=1 to fail instead)");
            Ok(None)
        }
        Err(err) => Err(err).context("running node"),
        Ok(status) if status.success() => Ok(Some(Node { flags: vec![] })),
        Ok(_) => {
            // Node 20 has WebSocket behind a flag; 22 and later by default.
            let flag = "--experimental-websocket";
            if has_websocket(&[flag]).context("running node")?.success() {
                Ok(Some(Node {
                    flags: vec![flag.to_string()],
                }))
            } else {
                bail!("this node has no WebSocket, even with {flag}: install Node.js 20 or later")
            }
        }
    }
}

struct Node {
    flags: Vec<String>,
}

/// Runs every `js/test/*.test.mjs` (named one by one: Node 20 would also
/// take the helpers in `test/` for tests), printing Node's output; fails
/// unless Node exits 0 within [`NODE_TIMEOUT`]. A run that hangs is killed
/// with the test files' own processes (its process group), and what it
/// printed until then is shown, so that the hanging test can be found.
async fn run_node(node: &Node, env: &[(&str, String)]) -> Result<()> {
    let web = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tests = test_files(&web.join("js/test"))?;
    let mut command = tokio::process::Command::new("node");
    command
        .args(&node.flags)
        .arg("--test")
        .args(&tests)
        .current_dir(web)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Also killed if this test fails or panics while it runs.
        .kill_on_drop(true);
    // Its own group: `node --test` runs each file in a child process, which
    // a kill of `node` alone would leave running (and holding the pipes).
    #[cfg(unix)]
    command.process_group(0);
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command.spawn().context("starting node")?;
    let stdout = Captured::start(child.stdout.take());
    let stderr = Captured::start(child.stderr.take());
    let status = match tokio::time::timeout(NODE_TIMEOUT, child.wait()).await {
        Ok(status) => Some(status.context("waiting for node")?),
        Err(_) => {
            kill_group(&mut child).await;
            None
        }
    };
    println!("{}", stdout.finish().await);
    eprintln!("{}", stderr.finish().await);
    match status {
        None => bail!(
            "node did not finish within {NODE_TIMEOUT:?}; killed (its output so far is above)"
        ),
        Some(status) if !status.success() => {
            bail!("node --test failed ({status}); its output is above")
        }
        Some(_) => Ok(()),
    }
}

/// How long the pipes may stay open after `node` ended (grandchildren).
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// A child's pipe read to its end in the background, kept as it comes.
struct Captured {
    text: Arc<std::sync::Mutex<Vec<u8>>>,
    task: Option<JoinHandle<()>>,
}

impl Captured {
    fn start<R: tokio::io::AsyncRead + Unpin + Send + 'static>(pipe: Option<R>) -> Captured {
        let text = Arc::new(std::sync::Mutex::new(Vec::new()));
        let task = pipe.map(|mut pipe| {
            let text = text.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut chunk = [0u8; 8192];
                // A read error ends the capture: what came before is kept.
                while let Ok(n @ 1..) = pipe.read(&mut chunk).await {
                    text.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend_from_slice(&chunk[..n]);
                }
            })
        });
        Captured { text, task }
    }

    /// Everything read, once the pipe closed or [`DRAIN_GRACE`] passed.
    async fn finish(mut self) -> String {
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(DRAIN_GRACE, task).await.is_err() {
                abort.abort();
            }
        }
        let text = self.text.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&text).into_owned()
    }
}

/// Kills `node` and, on Unix, the test-file processes in its group.
async fn kill_group(child: &mut tokio::process::Child) {
    #[cfg(unix)]
    if let Some(pid) = child.id() {
        // The group's id is node's pid (process_group(0) above).
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .status();
    }
    // Also reaps it; an error means it is gone already.
    let _ = child.kill().await;
}

fn test_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.to_str().is_some_and(|p| p.ends_with(".test.mjs")) {
            files.push(path);
        }
    }
    files.sort();
    if files.is_empty() {
        bail!("no *.test.mjs in {}", dir.display());
    }
    Ok(files)
}

async fn bind_local() -> Result<TcpListener> {
    TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding 127.0.0.1:0")
}

/// Answers `svc.echo` (a queue group, so that it answers once however the
/// tests run) with the payload, ASCII letters uppercased.
async fn echo_responder(bus: &Bus) -> Result<JoinHandle<()>> {
    let mut sub = bus
        .subscribe("svc.echo", SubscribeOptions::default().group("echo"))
        .await?;
    let publisher = bus.publisher();
    Ok(tokio::spawn(async move {
        while let Some(Ok(event)) = sub.recv().await {
            if let Event::Message(request) = event {
                let reply = request.payload.to_ascii_uppercase();
                // A failed reply is the requester's timeout to report.
                let _ = publisher.reply(&request, reply).await;
            }
        }
    }))
}

/// A gateway that can be restarted on the port it first bound.
#[derive(Clone)]
struct Restartable {
    bus: Bus,
    address: SocketAddr,
    server: Arc<Mutex<Option<WebServer>>>,
}

impl Restartable {
    async fn start(bus: Bus) -> Result<Restartable> {
        let listener = bind_local().await?;
        let address = listener.local_addr()?;
        let server = Gateway::new(bus.clone(), GatewayConfig::default())
            .serve(listener, None)
            .context("serving the restartable gateway")?;
        Ok(Restartable {
            bus,
            address,
            server: Arc::new(Mutex::new(Some(server))),
        })
    }

    fn url(&self) -> String {
        format!("ws://{}", self.address)
    }

    /// Closes every connection (1001) and serves a new gateway on the same
    /// address.
    async fn restart(&self) -> Result<()> {
        let mut slot = self.server.lock().await;
        if let Some(old) = slot.take() {
            old.shutdown(RESTART_GRACE).await;
        }
        let listener = TcpListener::bind(self.address)
            .await
            .with_context(|| format!("binding {} again", self.address))?;
        *slot = Some(
            Gateway::new(self.bus.clone(), GatewayConfig::default())
                .serve(listener, None)
                .context("serving the restarted gateway")?,
        );
        Ok(())
    }

    /// Restarts on every message published to `subject`.
    async fn on_publish_to(self, bus: &Bus, subject: &str) -> Result<JoinHandle<()>> {
        let mut sub = bus.subscribe(subject, SubscribeOptions::default()).await?;
        Ok(tokio::spawn(async move {
            while let Some(Ok(event)) = sub.recv().await {
                if let Event::Message(_) = event {
                    if let Err(err) = self.restart().await {
                        // The Node test waiting to reconnect fails and says so.
                        eprintln!("restarting the gateway failed: {err:#}");
                    }
                }
            }
        }))
    }

    async fn shutdown(&self) {
        if let Some(server) = self.server.lock().await.take() {
            server.shutdown(Duration::from_secs(1)).await;
        }
    }
}

/// Spawned tasks, aborted when dropped (also when the test fails early).
#[derive(Default)]
struct Tasks(Vec<JoinHandle<()>>);

impl Tasks {
    fn push(&mut self, task: JoinHandle<()>) {
        self.0.push(task);
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// [`ALICE_TOKEN`] proves `alice`; nothing else proves anything.
struct OneToken;

impl Authenticator for OneToken {
    fn authenticate(&self, token: &Secret) -> Option<String> {
        token
            .matches(&Secret::new(ALICE_TOKEN))
            .then(|| "alice".to_string())
    }
}

/// Anyone identified may do anything except touch `forbidden.…` subjects
/// (nor subscribe to a filter that could match one).
struct NotForbidden;

impl NotForbidden {
    fn allowed(who: Option<&str>, first_token: &str) -> bool {
        who.is_some() && !matches!(first_token, "forbidden" | "*" | ">")
    }
}

impl PubSubAccess for NotForbidden {
    fn may_publish(&self, who: Option<&str>, subject: &Subject) -> bool {
        Self::allowed(who, first(subject.as_str()))
    }

    fn may_request(&self, who: Option<&str>, subject: &Subject) -> bool {
        Self::allowed(who, first(subject.as_str()))
    }

    fn may_subscribe(&self, who: Option<&str>, filter: &Filter) -> bool {
        Self::allowed(who, first(filter.as_str()))
    }
}

fn first(subject: &str) -> &str {
    subject.split('.').next().unwrap_or(subject)
}
