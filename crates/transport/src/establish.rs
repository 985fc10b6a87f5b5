//! A stream socket's way from accepted or connected to a [`Connection`]:
//! TLS when the address asks for it, the `shm://` ring set-up, and the
//! preamble exchange, all under one handshake timeout. Shared by the
//! listener (accepted sockets) and by [`crate::connect`] (dialled ones),
//! with the name resolution both need.

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpStream, UnixStream};

use crate::connection::{RecvLink, SendLink};
use crate::stream::{exchange_preamble, BoxRead, BoxWrite, StreamReader, StreamWriter};
use crate::{Address, Connection, HandshakeError, TransportConfig};

/// A freshly accepted or connected socket, before its handshake.
pub(crate) enum RawStream {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// Accepted on a `tls://` listener.
    TlsAccept(TcpStream, crate::TlsServer),
    /// Connected to a `tls://` address: the certificate must be valid for `host`.
    TlsConnect(TcpStream, crate::TlsClient, String),
    /// The control socket of an `shm://` listener, accepted.
    #[cfg(target_os = "linux")]
    ShmAccept(UnixStream, String),
    /// The control socket of an `shm://` listener, connected.
    #[cfg(target_os = "linux")]
    ShmConnect(UnixStream),
}

fn tls_failed(err: io::Error) -> HandshakeError {
    HandshakeError::Tls(err.to_string())
}

impl RawStream {
    /// Exchanges preambles and wraps the socket as a framed connection.
    pub(crate) async fn establish(
        self,
        config: &TransportConfig,
        peer: Option<Address>,
    ) -> Result<Connection, HandshakeError> {
        let limit = config.handshake_timeout;
        // TLS and the preamble together get one handshake timeout.
        let deadline = tokio::time::Instant::now() + limit;
        let within = |_| HandshakeError::Timeout(limit);
        let mut identity = None;
        let (read, write): (BoxRead, BoxWrite) = match self {
            RawStream::Tcp(mut stream) => {
                stream.set_nodelay(true)?;
                exchange_preamble(&mut stream, limit).await?;
                let (r, w) = stream.into_split();
                (Box::new(r), Box::new(w))
            }
            RawStream::Unix(mut stream) => {
                exchange_preamble(&mut stream, limit).await?;
                let (r, w) = stream.into_split();
                (Box::new(r), Box::new(w))
            }
            RawStream::TlsAccept(stream, server) => {
                stream.set_nodelay(true)?;
                let acceptor = tokio_rustls::TlsAcceptor::from(server.config.clone());
                let mut tls = tokio::time::timeout_at(deadline, acceptor.accept(stream))
                    .await
                    .map_err(within)?
                    .map_err(tls_failed)?;
                identity = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(crate::tls::identity_of);
                exchange_preamble(&mut tls, deadline - tokio::time::Instant::now()).await?;
                let (r, w) = tokio::io::split(tls);
                (Box::new(r), Box::new(w))
            }
            #[cfg(target_os = "linux")]
            RawStream::ShmAccept(control, name) => {
                let ring = config.shm_ring_size.next_power_of_two().max(4096) as u64;
                let (reader, writer) = tokio::time::timeout_at(
                    deadline,
                    crate::shm::accept(control, &name, ring, config.shm_spin),
                )
                .await
                .map_err(within)??;
                let mut both = tokio::io::join(reader, writer);
                exchange_preamble(&mut both, deadline - tokio::time::Instant::now()).await?;
                let (r, w) = both.into_inner();
                (Box::new(r), Box::new(w))
            }
            #[cfg(target_os = "linux")]
            RawStream::ShmConnect(control) => {
                let most = config.shm_ring_size.next_power_of_two().max(1 << 24) as u64;
                let (reader, writer) = tokio::time::timeout_at(
                    deadline,
                    crate::shm::connect(control, most, config.shm_spin),
                )
                .await
                .map_err(within)??;
                let mut both = tokio::io::join(reader, writer);
                exchange_preamble(&mut both, deadline - tokio::time::Instant::now()).await?;
                let (r, w) = both.into_inner();
                (Box::new(r), Box::new(w))
            }
            RawStream::TlsConnect(stream, client, host) => {
                stream.set_nodelay(true)?;
                let name =
                    rustls::pki_types::ServerName::try_from(host.clone()).map_err(|err| {
                        HandshakeError::Tls(format!("{host:?} is not a valid server name: {err}"))
                    })?;
                let connector = tokio_rustls::TlsConnector::from(client.config.clone());
                let mut tls = tokio::time::timeout_at(deadline, connector.connect(name, stream))
                    .await
                    .map_err(within)?
                    .map_err(tls_failed)?;
                exchange_preamble(&mut tls, deadline - tokio::time::Instant::now()).await?;
                let (r, w) = tokio::io::split(tls);
                (Box::new(r), Box::new(w))
            }
        };
        let codec = config.stream_codec();
        let mut connection = Connection::new(
            SendLink::Stream(StreamWriter::new(
                write,
                codec,
                config.send_buffer,
                config.linger,
            )),
            RecvLink::Stream(StreamReader::new(read, codec)),
            config.heartbeat,
            peer,
        );
        connection.set_identity(identity);
        Ok(connection)
    }
}

pub(crate) async fn resolve(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
    if addrs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "name resolved to no addresses",
        ));
    }
    Ok(addrs)
}
