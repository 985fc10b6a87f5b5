//! Broker processes for one workload: Courier's `courier serve` and
//! `nats-server`, each started under `taskset` on the CPU its placement
//! names, on a free loopback port, with a data folder of its own. Dropping
//! the handle kills the process and removes the folder.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// How long a broker may take to accept its first connection.
const READY_WITHIN: Duration = Duration::from_secs(20);

/// A running broker.
pub struct BrokerProcess {
    child: Child,
    dir: PathBuf,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port nobody listens on now (the bind is dropped before the broker
/// takes it; a race with another program is possible and shows as a
/// start-up failure, never as a wrong figure).
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn scratch(tag: &str) -> anyhow::Result<PathBuf> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("courier-peers-{}-{tag}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn start(
    mut command: Command,
    dir: PathBuf,
    addr: SocketAddr,
    what: &str,
) -> anyhow::Result<BrokerProcess> {
    let log = std::fs::File::create(dir.join("broker.log"))?;
    command
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let child = command
        .spawn()
        .with_context(|| format!("starting {what} ({command:?})"))?;
    let mut broker = BrokerProcess { child, dir, addr };
    let started = Instant::now();
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(broker);
        }
        if let Some(status) = broker.child.try_wait()? {
            let log = std::fs::read_to_string(broker.dir.join("broker.log")).unwrap_or_default();
            bail!("{what} exited at start ({status}): {}", log.trim());
        }
        if started.elapsed() > READY_WITHIN {
            bail!("{what} did not listen on {addr} within {READY_WITHIN:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn taskset(cpu: usize, program: &Path) -> Command {
    let mut command = Command::new("taskset");
    command.arg("-c").arg(cpu.to_string()).arg(program);
    command
}

/// `courier serve` on `cpu`, its queues written with `fsync`.
pub fn courier(program: &Path, cpu: usize, fsync: &str) -> anyhow::Result<BrokerProcess> {
    let dir = scratch("courier")?;
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let mut command = taskset(cpu, program);
    command
        .arg("serve")
        .arg("--listen")
        .arg(format!("tcp://{addr}"))
        .arg("--data")
        .arg(dir.join("data"))
        .arg("--fsync")
        .arg(fsync)
        .arg("--metrics")
        .arg("")
        .arg("--log")
        .arg("warn");
    start(command, dir, addr, "courier serve")
}

/// `nats-server` on `cpu` with JetStream stored in its own folder.
pub fn nats(program: &Path, cpu: usize) -> anyhow::Result<BrokerProcess> {
    let dir = scratch("nats")?;
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let mut command = taskset(cpu, program);
    command
        .arg("-a")
        .arg("127.0.0.1")
        .arg("-p")
        .arg(addr.port().to_string())
        .arg("-js")
        .arg("-sd")
        .arg(dir.join("js"));
    start(command, dir, addr, "nats-server")
}

/// `nats-server --version`, or why it cannot run.
pub fn nats_version(program: &Path) -> Result<String, String> {
    match Command::new(program).arg("--version").output() {
        Ok(out) if out.status.success() => {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        }
        Ok(out) => Err(format!(
            "{} --version failed: {}",
            program.display(),
            out.status
        )),
        Err(err) => Err(format!(
            "{} not found ({err}); install Debian's nats-server package",
            program.display()
        )),
    }
}

/// A fresh scratch folder for an in-process measurement (the disk baseline).
pub fn scratch_dir(tag: &str) -> anyhow::Result<ScratchDir> {
    Ok(ScratchDir(scratch(tag)?))
}

/// A folder removed on drop.
pub struct ScratchDir(pub PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
