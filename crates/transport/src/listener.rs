//! Listeners: binding an address of any kind, and the accept loop that runs
//! handshakes (in [`crate::establish`]) concurrently and queues ready
//! connections. Dialling is in [`crate::dial`].

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::establish::{resolve, RawStream};
use crate::mem::MemRegistration;
use crate::{udp, AcceptError, Address, BindError, Connection, TransportConfig};

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) accepted: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) dropped_datagrams: AtomicU64,
}

/// What a listener has seen so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListenerStats {
    /// Connections that completed their handshake (UDP: peers that sent a
    /// first valid frame).
    pub accepted: u64,
    /// Connections turned away: bad preamble, handshake timeout, I/O error.
    pub refused: u64,
    /// UDP datagrams dropped by the listener: corrupt first datagrams, peer
    /// queue full, too many peers, oversized.
    pub dropped_datagrams: u64,
}

/// Accepts connections on one address. Created by [`crate::bind`].
///
/// Handshakes run in the background, many at once and each under a timeout,
/// so a slow or hostile client never holds up the others; `accept` returns
/// connections that are ready. Dropping the listener stops accepting (and
/// removes a Unix socket file or a `mem://` name); connections already
/// accepted live on.
pub struct Listener {
    local: Address,
    incoming: mpsc::Receiver<Connection>,
    counters: Arc<Counters>,
    task: Option<JoinHandle<()>>,
    cleanup: Cleanup,
}

enum Cleanup {
    Nothing,
    UnixSocketFile(PathBuf),
    MemName(#[allow(dead_code)] MemRegistration),
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        if let Cleanup::UnixSocketFile(path) = &self.cleanup {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Listener {
    /// The next connection whose handshake completed.
    pub async fn accept(&mut self) -> Result<Connection, AcceptError> {
        self.incoming
            .recv()
            .await
            .ok_or_else(|| AcceptError::Stopped {
                address: self.local.clone(),
            })
    }

    /// The address this listener is bound to, with the port the system chose
    /// when port 0 was asked for.
    pub fn local_addr(&self) -> &Address {
        &self.local
    }

    /// Counters of what this listener has accepted and refused.
    pub fn stats(&self) -> ListenerStats {
        ListenerStats {
            accepted: self.counters.accepted.load(Ordering::Relaxed),
            refused: self.counters.refused.load(Ordering::Relaxed),
            dropped_datagrams: self.counters.dropped_datagrams.load(Ordering::Relaxed),
        }
    }
}

enum RawListener {
    Tcp(TcpListener),
    Tls(TcpListener, crate::TlsServer),
    Unix(UnixListener),
    #[cfg(target_os = "linux")]
    Shm(UnixListener, String),
}

impl RawListener {
    async fn accept(&self) -> io::Result<(RawStream, Option<Address>)> {
        match self {
            RawListener::Tcp(listener) => {
                let (stream, peer) = listener.accept().await?;
                Ok((RawStream::Tcp(stream), Some(Address::tcp(peer))))
            }
            RawListener::Tls(listener, server) => {
                let (stream, peer) = listener.accept().await?;
                Ok((
                    RawStream::TlsAccept(stream, server.clone()),
                    Some(Address::tls(peer)),
                ))
            }
            RawListener::Unix(listener) => {
                let (stream, _) = listener.accept().await?;
                Ok((RawStream::Unix(stream), None))
            }
            #[cfg(target_os = "linux")]
            RawListener::Shm(listener, name) => {
                let (stream, _) = listener.accept().await?;
                Ok((RawStream::ShmAccept(stream, name.clone()), None))
            }
        }
    }
}

/// Handshakes under way, oldest first. When full, the listener waits for
/// one to finish, unless the oldest has already taken longer than a real
/// client would (a fiftieth of the handshake timeout, at least 50 ms): then that one is
/// dropped to make room. A burst of real clients waits its turn in the
/// kernel's backlog; a flood of connections that stall cannot starve them.
#[derive(Default)]
struct Handshakes {
    next: u64,
    running: std::collections::BTreeMap<u64, (tokio::time::Instant, tokio::task::AbortHandle)>,
}

async fn accept_loop(
    listener: RawListener,
    incoming: mpsc::Sender<Connection>,
    config: TransportConfig,
    counters: Arc<Counters>,
) {
    let config = Arc::new(config);
    let capacity = config.max_pending_handshakes.max(1);
    let handshakes = Arc::new(std::sync::Mutex::new(Handshakes::default()));
    let finished = Arc::new(tokio::sync::Notify::new());
    let stalled_after = (config.handshake_timeout / 50).max(Duration::from_millis(50));
    loop {
        // Make room before accepting.
        loop {
            let wait = {
                let mut table = handshakes
                    .lock()
                    .unwrap_or_else(|poison| poison.into_inner());
                match table.running.first_key_value() {
                    _ if table.running.len() < capacity => None,
                    Some((_, (started, _))) if started.elapsed() >= stalled_after => {
                        if let Some((_, (_, oldest))) = table.running.pop_first() {
                            oldest.abort();
                            counters.refused.fetch_add(1, Ordering::Relaxed);
                        }
                        None
                    }
                    Some((_, (started, _))) => {
                        Some(stalled_after.saturating_sub(started.elapsed()))
                    }
                    None => None,
                }
            };
            match wait {
                None => break,
                Some(wait) => {
                    let _ = tokio::time::timeout(wait, finished.notified()).await;
                }
            }
        }
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // Typically EMFILE: back off instead of spinning on it.
                tracing::warn!(%err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (incoming, config, task_counters) =
            (incoming.clone(), config.clone(), counters.clone());
        let registry = handshakes.clone();
        // Held only for map updates, never across an await.
        let finished_one = finished.clone();
        let mut table = handshakes
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let id = table.next;
        table.next += 1;
        // Registered under the lock, so the task cannot deregister first.
        let task = tokio::spawn(async move {
            let outcome = stream.establish(&config, peer.clone()).await;
            match outcome {
                Ok(conn) => {
                    task_counters.accepted.fetch_add(1, Ordering::Relaxed);
                    let _ = incoming.send(conn).await;
                }
                Err(reason) => {
                    // Counted, and logged at debug only: a flood of bad
                    // connections must not become a flood of log lines.
                    task_counters.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(peer = ?peer, %reason, "refused connection");
                }
            }
            let mut table = registry.lock().unwrap_or_else(|poison| poison.into_inner());
            table.running.remove(&id);
            finished_one.notify_one();
        });
        table
            .running
            .insert(id, (tokio::time::Instant::now(), task.abort_handle()));
    }
}

/// Binds a listener on any address kind.
pub(crate) async fn bind(
    address: &Address,
    config: &TransportConfig,
) -> Result<Listener, BindError> {
    let counters = Arc::new(Counters::default());
    let io_err = |source: io::Error| {
        if source.kind() == io::ErrorKind::AddrInUse {
            BindError::InUse {
                address: address.clone(),
            }
        } else {
            BindError::Io {
                address: address.clone(),
                source,
            }
        }
    };
    let resolve_err = |source| BindError::Resolve {
        address: address.clone(),
        source,
    };
    let (tx, rx) = mpsc::channel(config.accept_queue.max(1));
    let (local, task, cleanup) = match address {
        Address::Tcp { host, port } => {
            let addrs = resolve(host, *port).await.map_err(resolve_err)?;
            let listener = TcpListener::bind(&addrs[..]).await.map_err(io_err)?;
            let local = Address::tcp(listener.local_addr().map_err(io_err)?);
            let task = tokio::spawn(accept_loop(
                RawListener::Tcp(listener),
                tx,
                config.clone(),
                counters.clone(),
            ));
            (local, Some(task), Cleanup::Nothing)
        }
        Address::Tls { host, port } => {
            let server = config.tls_server.clone().ok_or_else(|| BindError::Io {
                address: address.clone(),
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "tls:// needs a certificate and key (TransportConfig::with_tls_server)",
                ),
            })?;
            let addrs = resolve(host, *port).await.map_err(resolve_err)?;
            let listener = TcpListener::bind(&addrs[..]).await.map_err(io_err)?;
            let local = Address::tls(listener.local_addr().map_err(io_err)?);
            let task = tokio::spawn(accept_loop(
                RawListener::Tls(listener, server),
                tx,
                config.clone(),
                counters.clone(),
            ));
            (local, Some(task), Cleanup::Nothing)
        }
        Address::Unix(path) => {
            let listener = bind_unix(path).await.map_err(io_err)?;
            let task = tokio::spawn(accept_loop(
                RawListener::Unix(listener),
                tx,
                config.clone(),
                counters.clone(),
            ));
            (
                address.clone(),
                Some(task),
                Cleanup::UnixSocketFile(path.clone()),
            )
        }
        Address::Udp { host, port } => {
            let addrs = resolve(host, *port).await.map_err(resolve_err)?;
            let (socket, local) = udp::bind_socket(addrs[0]).await.map_err(io_err)?;
            let task = tokio::spawn(udp::route(socket, tx, config.clone(), counters.clone()));
            (Address::udp(local), Some(task), Cleanup::Nothing)
        }
        #[cfg(target_os = "linux")]
        Address::Shm(name) => {
            let path = crate::shm::control_path(name);
            let listener = bind_unix(&path).await.map_err(io_err)?;
            let task = tokio::spawn(accept_loop(
                RawListener::Shm(listener, name.clone()),
                tx,
                config.clone(),
                counters.clone(),
            ));
            (address.clone(), Some(task), Cleanup::UnixSocketFile(path))
        }
        #[cfg(not(target_os = "linux"))]
        Address::Shm(_) => {
            return Err(BindError::Io {
                address: address.clone(),
                source: io::Error::new(
                    io::ErrorKind::Unsupported,
                    "shm:// is supported on Linux only",
                ),
            })
        }
        Address::Mem(name) => {
            let (rx, registration) = crate::mem::bind(address, name, config, counters.clone())?;
            return Ok(Listener {
                local: address.clone(),
                incoming: rx,
                counters,
                task: None,
                cleanup: Cleanup::MemName(registration),
            });
        }
    };
    Ok(Listener {
        local,
        incoming: rx,
        counters,
        task,
        cleanup,
    })
}

/// Binds a Unix socket, replacing a stale socket file left by a dead process
/// but never one that a live listener still answers on.
async fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    match UnixListener::bind(path) {
        Err(err) if err.kind() == io::ErrorKind::AddrInUse => {
            if UnixStream::connect(path).await.is_ok() {
                return Err(err);
            }
            tracing::info!(path = %path.display(), "removing stale unix socket file");
            std::fs::remove_file(path)?;
            UnixListener::bind(path)
        }
        other => other,
    }
}
