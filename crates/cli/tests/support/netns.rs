//! Network namespaces for the cluster tests: each node in its own, joined
//! to the clients' through a bridge, so a node can be cut off by taking
//! its link down.

#![allow(dead_code)]

use super::cluster::{Background, Cluster, IDS};
use std::process::Command;

/// Three network namespaces, one per node, each joined by a veth pair to a
/// bridge in a fourth, where the test's clients run. Removed when dropped.
pub struct Bridged {
    pub bridge: String,
    pub nodes: Vec<String>,
    /// Per node, its end of its veth pair (in its namespace).
    links: Vec<String>,
}

impl Bridged {
    pub const SUBNET: &'static str = "10.233.0";

    /// Creates them, or says why it cannot (not root, no iproute2, no
    /// permission to make namespaces or bridges).
    pub fn create() -> Result<Bridged, String> {
        // Unique per process and call: tests of one binary run at once.
        static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 10;
        let id = format!("{}{call}", std::process::id() % 100_000);
        let spaces = Bridged {
            bridge: format!("courier-kb{id}"),
            nodes: IDS.iter().map(|n| format!("courier-k{id}n{n}")).collect(),
            links: IDS.iter().map(|n| format!("ck{id}n{n}")).collect(),
        };
        let ip = ip;
        let bridge = spaces.bridge.as_str();
        ip(&["netns", "add", bridge])?;
        // From here on, dropping `spaces` removes what was made.
        ip(&["-n", bridge, "link", "add", "br0", "type", "bridge"])?;
        let bridge_ip = format!("{}.100/24", Bridged::SUBNET);
        ip(&["-n", bridge, "addr", "add", &bridge_ip, "dev", "br0"])?;
        ip(&["-n", bridge, "link", "set", "br0", "up"])?;
        ip(&["-n", bridge, "link", "set", "lo", "up"])?;
        for (n, (space, link)) in IDS.iter().zip(spaces.nodes.iter().zip(&spaces.links)) {
            let port = format!("ck{id}p{n}");
            ip(&["netns", "add", space])?;
            ip(&["link", "add", link, "type", "veth", "peer", "name", &port])?;
            ip(&["link", "set", link, "netns", space])?;
            ip(&["link", "set", &port, "netns", bridge])?;
            ip(&["-n", bridge, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", bridge, "link", "set", &port, "up"])?;
            let address = format!("{}.{n}/24", Bridged::SUBNET);
            ip(&["-n", space, "addr", "add", &address, "dev", link])?;
            ip(&["-n", space, "link", "set", link, "up"])?;
            ip(&["-n", space, "link", "set", "lo", "up"])?;
        }
        Ok(spaces)
    }

    pub fn exec(space: &str) -> Vec<String> {
        ["ip", "netns", "exec", space].map(String::from).to_vec()
    }

    /// `courier ARGS…` against node `id` alone, from its own namespace,
    /// in the background (for a node about to be, or already, cut off).
    pub fn start_at(&self, cluster: &Cluster, id: u64, args: &[&str]) -> Background {
        let exec = Bridged::exec(&self.nodes[Cluster::index(id)]);
        let prefix: Vec<&str> = exec.iter().map(String::as_str).collect();
        Background::start(&prefix, cluster.address(id), args, "")
    }

    /// Brings node `id`'s link up or down.
    pub fn link(&self, id: u64, up: bool) {
        let i = Cluster::index(id);
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.nodes[i], "link", "set", &self.links[i], state]).unwrap();
    }
}

impl Drop for Bridged {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of a veth pair, and the pair
        // with it; the bridge goes with its namespace.
        for space in self.nodes.iter().chain([&self.bridge]) {
            let _ = Command::new("ip").args(["netns", "del", space]).status();
        }
    }
}

impl Bridged {
    /// Each node's address, inside its namespace.
    pub fn addresses(&self) -> Vec<String> {
        IDS.iter()
            .map(|n| format!("tcp://{}.{n}:7878", Bridged::SUBNET))
            .collect()
    }

    /// What runs each node's processes.
    pub fn prefixes(&self) -> Vec<Vec<String>> {
        self.nodes.iter().map(|s| Bridged::exec(s)).collect()
    }

    /// What runs the test's clients: the bridge's namespace.
    pub fn client_prefix(&self) -> Vec<String> {
        Bridged::exec(&self.bridge)
    }

    /// A tokio runtime whose threads live in the bridge's namespace, so
    /// the connections its tasks open reach the nodes. Run client code
    /// with `spawn` (not `block_on`, which polls on the caller's thread,
    /// outside the namespace).
    pub fn client_runtime(&self) -> Result<tokio::runtime::Runtime, String> {
        runtime_in(Some(&self.bridge))
    }

    /// Starts a cluster with `[cluster]` settings `extra`, a node in each
    /// namespace and the clients on the bridge.
    pub fn cluster(&self, label: &str, extra: &str) -> Cluster {
        Cluster::start(
            label,
            extra,
            self.addresses(),
            self.prefixes(),
            self.client_prefix(),
        )
    }
}

/// A multi-threaded tokio runtime (2 workers) built on a thread that has
/// entered network namespace `space` first (if given): its workers, and
/// the threads they start, inherit it.
pub fn runtime_in(space: Option<&str>) -> Result<tokio::runtime::Runtime, String> {
    let space = space.map(str::to_owned);
    std::thread::spawn(move || {
        if let Some(space) = space {
            enter(&space)?;
        }
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    })
    .join()
    .map_err(|_| "the runtime's thread panicked".to_owned())?
}

/// Moves the calling thread into network namespace `space` (made by
/// `ip netns add`).
fn enter(space: &str) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let path = format!("/var/run/netns/{space}");
    let file = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
    // SAFETY: setns only reads the descriptor, which `file` keeps open for
    // the call, and changes nothing but this thread's network namespace.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!("setns {path}: {}", std::io::Error::last_os_error()))
    }
}

/// Runs `ip ARGS…` (iproute2), or says why it failed.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|err| format!("cannot run ip (iproute2): {err}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}
