//! Dialling: opening a connection to an address of any kind.

// Only the error for shm:// off Linux names `io` directly.
#[cfg(not(target_os = "linux"))]
use std::io;

use tokio::net::{TcpStream, UnixStream};

use crate::establish::{resolve, RawStream};
use crate::{udp, Address, ConnectError, Connection, HandshakeError, TransportConfig};

/// Opens a connection on any address kind.
pub(crate) async fn connect(
    address: &Address,
    config: &TransportConfig,
) -> Result<Connection, ConnectError> {
    let timeout = |_| ConnectError::Timeout {
        address: address.clone(),
        after: config.connect_timeout,
    };
    let io_err = |source| ConnectError::Io {
        address: address.clone(),
        source,
    };
    let deadline = tokio::time::Instant::now() + config.connect_timeout;
    let (raw, peer) = match address {
        Address::Tcp { host, port } | Address::Tls { host, port } => {
            let addrs = tokio::time::timeout_at(deadline, resolve(host, *port))
                .await
                .map_err(timeout)?
                .map_err(|source| ConnectError::Resolve {
                    address: address.clone(),
                    source,
                })?;
            let mut last_err = None;
            let mut connected = None;
            for addr in addrs {
                match tokio::time::timeout_at(deadline, TcpStream::connect(addr))
                    .await
                    .map_err(timeout)?
                {
                    Ok(stream) => {
                        connected = Some((stream, addr));
                        break;
                    }
                    Err(err) => last_err = Some(err),
                }
            }
            let (stream, addr) = connected
                .ok_or_else(|| io_err(last_err.expect("at least one address was tried")))?;
            match address {
                Address::Tls { .. } => {
                    let client =
                        config
                            .tls_client
                            .clone()
                            .ok_or_else(|| ConnectError::Handshake {
                                address: address.clone(),
                                source: HandshakeError::TlsNotConfigured(
                                    "trusted CAs (TransportConfig::with_tls_client)",
                                ),
                            })?;
                    (
                        RawStream::TlsConnect(stream, client, host.clone()),
                        Address::tls(addr),
                    )
                }
                _ => (RawStream::Tcp(stream), Address::tcp(addr)),
            }
        }
        Address::Unix(path) => {
            let stream = tokio::time::timeout_at(deadline, UnixStream::connect(path))
                .await
                .map_err(timeout)?
                .map_err(io_err)?;
            (RawStream::Unix(stream), address.clone())
        }
        Address::Udp { host, port } => return udp::connect(address, host, *port, config).await,
        Address::Mem(name) => return crate::mem::connect(address, name, config).await,
        #[cfg(target_os = "linux")]
        Address::Shm(name) => {
            let stream = tokio::time::timeout_at(
                deadline,
                UnixStream::connect(crate::shm::control_path(name)),
            )
            .await
            .map_err(timeout)?
            .map_err(io_err)?;
            (RawStream::ShmConnect(stream), address.clone())
        }
        #[cfg(not(target_os = "linux"))]
        Address::Shm(_) => {
            return Err(io_err(io::Error::new(
                io::ErrorKind::Unsupported,
                "shm:// is supported on Linux only",
            )))
        }
    };
    raw.establish(config, Some(peer))
        .await
        .map_err(|source| ConnectError::Handshake {
            address: address.clone(),
            source,
        })
}
