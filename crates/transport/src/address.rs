//! Endpoint addresses: one URL-like syntax for every transport.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

/// Longest Unix socket path Linux accepts (`sun_path` is 108 bytes with the NUL).
pub const MAX_UNIX_PATH: usize = 107;
/// Longest `mem://` name.
pub const MAX_MEM_NAME: usize = 255;

/// Where an endpoint lives.
///
/// | form | meaning |
/// |---|---|
/// | `tcp://host:port` | TCP; `host` is a name, an IPv4 address or `[IPv6]` |
/// | `tls://host:port` | TLS 1.2/1.3 over TCP (rustls); the client checks the server's certificate against `host` |
/// | `udp://host:port` | UDP, one frame per datagram, CRC32C on every frame |
/// | `unix:///path/to/socket` | Unix stream socket (the path after `unix://`) |
/// | `mem://name` | in-process: frames move through channels, no sockets, no copies |
/// | `shm://name` | same machine, through shared-memory rings (Linux) |
///
/// Port `0` asks the system for a free port when binding;
/// [`crate::Listener::local_addr`] tells which one it chose.
///
/// ```
/// use courier_transport::Address;
/// let addr: Address = "tcp://[::1]:7000".parse()?;
/// assert_eq!(addr.to_string(), "tcp://[::1]:7000");
/// let err = "tcp://localhost".parse::<Address>().unwrap_err();
/// assert!(err.to_string().contains("tcp://host:port"));
/// # Ok::<(), courier_transport::AddressError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Address {
    /// `tcp://host:port`
    Tcp {
        /// Host name or IP literal (IPv6 without brackets).
        host: String,
        /// Port; 0 = any when binding.
        port: u16,
    },
    /// `tls://host:port`
    Tls {
        /// Host name or IP literal (IPv6 without brackets); the server's
        /// certificate must be valid for it.
        host: String,
        /// Port; 0 = any when binding.
        port: u16,
    },
    /// `udp://host:port`
    Udp {
        /// Host name or IP literal (IPv6 without brackets).
        host: String,
        /// Port; 0 = any when binding.
        port: u16,
    },
    /// `unix:///path`
    Unix(PathBuf),
    /// `mem://name`
    Mem(String),
    /// `shm://name`
    Shm(String),
}

/// Why a string is not a valid [`Address`]. Each message shows the expected form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AddressError {
    /// No `scheme://` at the start.
    #[error("address {0:?} has no scheme; expected one of tcp://host:port, tls://host:port, udp://host:port, unix:///path, mem://name, shm://name")]
    MissingScheme(String),
    /// A scheme Courier does not know (or does not support yet).
    #[error("unsupported scheme {scheme:?} in {address:?}; expected one of tcp://, tls://, udp://, unix://, mem://, shm://")]
    UnsupportedScheme {
        /// The scheme found.
        scheme: String,
        /// The whole input.
        address: String,
    },
    /// A host:port address without a usable host or port.
    #[error("invalid {scheme} address {address:?}: {reason}; expected {scheme}://host:port, e.g. {scheme}://127.0.0.1:7000 or {scheme}://[::1]:7000")]
    InvalidHostPort {
        /// `tcp` or `udp`.
        scheme: &'static str,
        /// The whole input.
        address: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A Unix address with an empty or over-long path.
    #[error("invalid unix address {address:?}: {reason}; expected unix:///path/to/socket (at most {MAX_UNIX_PATH} bytes)")]
    InvalidUnixPath {
        /// The whole input.
        address: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A comma-separated list ([`Address::parse_list`]) with nothing (or
    /// only spaces) between two commas, before the first or after the last.
    #[error("empty entry at position {position} of the address list; expected addresses separated by commas, e.g. tcp://10.0.0.1:7878,tcp://10.0.0.2:7878")]
    EmptyListEntry {
        /// Which entry, counting from 1.
        position: usize,
    },
    /// A comma-separated list with more distinct addresses than
    /// [`Address::MAX_LIST`].
    #[error("the address list has more than {limit} distinct addresses")]
    TooManyAddresses {
        /// The most a list may hold.
        limit: usize,
    },
    /// A mem address with an empty, over-long or oddly spelled name.
    #[error("invalid mem address {address:?}: {reason}; expected mem://name with letters, digits, '.', '_' or '-' (at most {MAX_MEM_NAME} bytes)")]
    InvalidMemName {
        /// The whole input.
        address: String,
        /// What is wrong.
        reason: &'static str,
    },
}

impl AddressError {
    /// Always false: the same string will fail the same way.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

impl Address {
    /// Most distinct addresses [`Address::parse_list`] accepts: a cluster
    /// has a handful of nodes, and the cap keeps a mistyped or hostile list
    /// (an environment variable, a config file) from growing a client's
    /// state without bound.
    pub const MAX_LIST: usize = 64;

    /// Parses a comma-separated list of addresses of equivalent servers,
    /// such as `tcp://10.0.0.1:7878, tcp://10.0.0.2:7878`, for clients that
    /// fail over between them. Spaces around each entry are ignored; an
    /// empty entry (`a,,b`, a leading or trailing comma, an empty text) is
    /// refused rather than skipped, since it is usually a typo; an entry
    /// given twice is kept once, where it first appears (so a client does
    /// not try one node twice per round); more than [`Address::MAX_LIST`]
    /// distinct addresses are refused. An entry that is not an address
    /// fails with that entry's own error.
    ///
    /// A comma always separates entries, so a Unix socket path containing
    /// a comma cannot be listed (parse it alone with [`str::parse`]).
    ///
    /// ```
    /// use courier_transport::Address;
    /// let list = Address::parse_list("tcp://10.0.0.1:7878, tcp://10.0.0.2:7878")?;
    /// assert_eq!(list.len(), 2);
    /// assert_eq!(list[1].to_string(), "tcp://10.0.0.2:7878");
    /// assert!(Address::parse_list("tcp://10.0.0.1:7878,").is_err());
    /// # Ok::<(), courier_transport::AddressError>(())
    /// ```
    pub fn parse_list(text: &str) -> Result<Vec<Address>, AddressError> {
        let mut list: Vec<Address> = Vec::new();
        for (index, entry) in text.split(',').enumerate() {
            let entry = entry.trim();
            if entry.is_empty() {
                return Err(AddressError::EmptyListEntry {
                    position: index + 1,
                });
            }
            let address: Address = entry.parse()?;
            // A linear search: the list never holds more than MAX_LIST.
            if list.contains(&address) {
                continue;
            }
            if list.len() == Address::MAX_LIST {
                // Stops at once, so a huge text costs no more than this.
                return Err(AddressError::TooManyAddresses {
                    limit: Address::MAX_LIST,
                });
            }
            list.push(address);
        }
        Ok(list)
    }

    /// A TCP address for a socket address.
    pub fn tcp(addr: SocketAddr) -> Address {
        Address::Tcp {
            host: addr.ip().to_string(),
            port: addr.port(),
        }
    }

    /// A UDP address for a socket address.
    pub fn udp(addr: SocketAddr) -> Address {
        Address::Udp {
            host: addr.ip().to_string(),
            port: addr.port(),
        }
    }

    /// A Unix socket address.
    pub fn unix(path: impl Into<PathBuf>) -> Address {
        Address::Unix(path.into())
    }

    /// An in-process address. The name is not validated here; [`crate::bind`]
    /// and [`crate::connect`] accept any name made this way.
    pub fn mem(name: impl Into<String>) -> Address {
        Address::Mem(name.into())
    }

    /// A TLS address for a socket address.
    pub fn tls(addr: SocketAddr) -> Address {
        Address::Tls {
            host: addr.ip().to_string(),
            port: addr.port(),
        }
    }

    /// The scheme: `tcp`, `tls`, `udp`, `unix` or `mem`.
    pub fn scheme(&self) -> &'static str {
        match self {
            Address::Tcp { .. } => "tcp",
            Address::Tls { .. } => "tls",
            Address::Udp { .. } => "udp",
            Address::Unix(_) => "unix",
            Address::Mem(_) => "mem",
            Address::Shm(_) => "shm",
        }
    }
}

fn parse_host_port(
    scheme: &'static str,
    rest: &str,
    address: &str,
) -> Result<(String, u16), AddressError> {
    let invalid = |reason| AddressError::InvalidHostPort {
        scheme,
        address: address.to_string(),
        reason,
    };
    let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
        let (host, after) = bracketed.split_once(']').ok_or(invalid("unclosed '['"))?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(invalid("not an IPv6 address inside [ ]"));
        }
        let port = after.strip_prefix(':').ok_or(invalid("missing :port"))?;
        (host, port)
    } else {
        let (host, port) = rest.rsplit_once(':').ok_or(invalid("missing :port"))?;
        if host.contains(':') {
            return Err(invalid("IPv6 addresses must be written in [ ]"));
        }
        (host, port)
    };
    if host.is_empty() {
        return Err(invalid("empty host"));
    }
    if host.contains(|c: char| c.is_whitespace() || c == '/' || c == '@') {
        return Err(invalid("host contains whitespace, '/' or '@'"));
    }
    let port = port
        .parse::<u16>()
        .map_err(|_| invalid("port is not a number from 0 to 65535"))?;
    Ok((host.to_string(), port))
}

impl FromStr for Address {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Address, AddressError> {
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| AddressError::MissingScheme(s.to_string()))?;
        match scheme {
            "tcp" => {
                let (host, port) = parse_host_port("tcp", rest, s)?;
                Ok(Address::Tcp { host, port })
            }
            "tls" => {
                let (host, port) = parse_host_port("tls", rest, s)?;
                Ok(Address::Tls { host, port })
            }
            "udp" => {
                let (host, port) = parse_host_port("udp", rest, s)?;
                Ok(Address::Udp { host, port })
            }
            "unix" => {
                let invalid = |reason| AddressError::InvalidUnixPath {
                    address: s.to_string(),
                    reason,
                };
                if rest.is_empty() {
                    return Err(invalid("empty path"));
                }
                if rest.len() > MAX_UNIX_PATH {
                    return Err(invalid("path too long for a Unix socket"));
                }
                if rest.contains('\0') {
                    return Err(invalid("path contains a NUL byte"));
                }
                Ok(Address::Unix(PathBuf::from(rest)))
            }
            "mem" | "shm" => {
                let invalid = |reason| AddressError::InvalidMemName {
                    address: s.to_string(),
                    reason,
                };
                if rest.is_empty() {
                    return Err(invalid("empty name"));
                }
                if rest.len() > MAX_MEM_NAME {
                    return Err(invalid("name too long"));
                }
                if !rest
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
                {
                    return Err(invalid("name contains a character outside [A-Za-z0-9._-]"));
                }
                Ok(if scheme == "mem" {
                    Address::Mem(rest.to_string())
                } else {
                    Address::Shm(rest.to_string())
                })
            }
            other => Err(AddressError::UnsupportedScheme {
                scheme: other.to_string(),
                address: s.to_string(),
            }),
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host_port = |f: &mut fmt::Formatter<'_>, scheme: &str, host: &str, port: u16| {
            if matches!(host.parse::<IpAddr>(), Ok(IpAddr::V6(_))) {
                write!(f, "{scheme}://[{host}]:{port}")
            } else {
                write!(f, "{scheme}://{host}:{port}")
            }
        };
        match self {
            Address::Tcp { host, port } => host_port(f, "tcp", host, *port),
            Address::Tls { host, port } => host_port(f, "tls", host, *port),
            Address::Udp { host, port } => host_port(f, "udp", host, *port),
            Address::Unix(path) => write!(f, "unix://{}", path.display()),
            Address::Mem(name) => write!(f, "mem://{name}"),
            Address::Shm(name) => write!(f, "shm://{name}"),
        }
    }
}

impl serde::Serialize for Address {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Address {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Address, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16) -> Address {
        Address::Tcp {
            host: host.to_string(),
            port,
        }
    }

    #[test]
    fn address_list_keeps_the_order_given_and_trims_spaces() {
        let list =
            Address::parse_list(" tcp://a:7878 ,tcp://b:7878,\tunix:///tmp/c.sock ").unwrap();
        assert_eq!(
            list,
            vec![
                tcp("a", 7878),
                tcp("b", 7878),
                Address::Unix(PathBuf::from("/tmp/c.sock"))
            ]
        );
    }

    #[test]
    fn address_list_of_one_is_the_address() {
        assert_eq!(
            Address::parse_list("tcp://[::1]:7000").unwrap(),
            vec!["tcp://[::1]:7000".parse::<Address>().unwrap()]
        );
    }

    #[test]
    fn address_list_refuses_empty_entries_naming_their_position() {
        for (text, position) in [
            ("", 1),
            ("   ", 1),
            (",tcp://a:1", 1),
            ("tcp://a:1,", 2),
            ("tcp://a:1,,tcp://b:1", 2),
            ("tcp://a:1, ,tcp://b:1", 2),
        ] {
            let err = Address::parse_list(text).unwrap_err();
            assert_eq!(err, AddressError::EmptyListEntry { position }, "{text:?}");
            assert!(err.to_string().contains("separated by commas"), "{err}");
        }
    }

    #[test]
    fn address_list_reports_the_bad_entry_with_its_own_error() {
        let err = Address::parse_list("tcp://a:1,tcp://b").unwrap_err();
        assert!(
            matches!(&err, AddressError::InvalidHostPort { address, .. } if address == "tcp://b"),
            "{err:?}"
        );
        assert!(matches!(
            Address::parse_list("tcp://a:1, b:2").unwrap_err(),
            AddressError::MissingScheme(entry) if entry == "b:2"
        ));
    }

    #[test]
    fn address_list_drops_repeats_keeping_the_first() {
        let list =
            Address::parse_list("tcp://b:1,tcp://a:1,tcp://b:1, tcp://a:1 ,tcp://c:1").unwrap();
        assert_eq!(list, vec![tcp("b", 1), tcp("a", 1), tcp("c", 1)]);
    }

    #[test]
    fn address_list_is_capped_at_max_list_distinct_addresses() {
        let list = |n: usize| {
            (0..n)
                .map(|port| format!("tcp://h:{port}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        assert_eq!(
            Address::parse_list(&list(Address::MAX_LIST)).unwrap().len(),
            64
        );
        assert_eq!(
            Address::parse_list(&list(Address::MAX_LIST + 1)).unwrap_err(),
            AddressError::TooManyAddresses { limit: 64 }
        );
        // Repeats do not count against the cap.
        let repeated = format!("{},{}", list(Address::MAX_LIST), list(Address::MAX_LIST));
        assert_eq!(Address::parse_list(&repeated).unwrap().len(), 64);
    }

    #[test]
    fn address_list_never_panics_on_odd_text() {
        for text in [
            ",",
            ",,,",
            "://,://",
            "tcp://[::1,tcp://a:1",
            "\u{0},tcp://a:1",
            "é,ß",
        ] {
            assert!(Address::parse_list(text).is_err(), "{text:?}");
        }
    }
}
