//! TLS for `tls://` addresses: rustls with the *ring* provider, no OpenSSL.
//!
//! A listener needs a [`TlsServer`] (certificate chain and key from PEM
//! files, and optionally a client CA to require client certificates: mutual
//! TLS); a client needs a [`TlsClient`] (the CA it trusts, and optionally
//! its own certificate). Both go in [`crate::TransportConfig`].
//!
//! A `tls://` address never falls back to plain text: without a
//! [`TlsClient`] the connection is refused, and a plain server (or any
//! non-TLS peer) fails the TLS handshake. After the handshake every record
//! is authenticated, so bytes altered in transit end the connection with an
//! error; nothing altered is delivered.
//!
//! Under mutual TLS the client's identity is the first DNS name in its
//! certificate's subject alternative names
//! ([`crate::Connection::peer_identity`]).
//!
//! `generate_dev_certs` writes a development CA and certificates signed by
//! it (with `rcgen`), so TLS can be tried in one command
//! (`courier cert generate`). Not for production: the CA key is written next
//! to the certificates. It exists only with the `dev-certs` feature (off by
//! default), so that a program reading its certificates from files does not
//! compile a certificate generator.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why TLS settings could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the certificates or keys.
    #[error("tls configuration: {0}")]
    Config(String),
    /// Generating development certificates failed (`generate_dev_certs`,
    /// with the `dev-certs` feature; kept without it, so that matches on
    /// this enum compile whatever the features).
    #[error("cannot generate certificates: {0}")]
    Generate(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |reason: String| TlsError::Pem {
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|err| pem(err.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| pem(err.to_string()))?;
    if certs.is_empty() {
        return Err(pem("no CERTIFICATE section".into()));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    // The error never includes the key's bytes.
    PrivateKeyDer::from_pem_file(path).map_err(|err| TlsError::Pem {
        path: path.to_path_buf(),
        reason: format!("no usable private key ({err})"),
    })
}

fn roots(ca: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(ca)? {
        roots.add(cert).map_err(|err| TlsError::Pem {
            path: ca.to_path_buf(),
            reason: format!("not a usable CA certificate: {err}"),
        })?;
    }
    Ok(roots)
}

fn config_error(err: impl std::fmt::Display) -> TlsError {
    TlsError::Config(err.to_string())
}

/// A listener's TLS settings. Cheap to clone.
#[derive(Clone)]
pub struct TlsServer {
    pub(crate) config: Arc<rustls::ServerConfig>,
    mutual: bool,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsServer")
            .field("client_certificates_required", &self.mutual)
            .finish_non_exhaustive()
    }
}

impl TlsServer {
    /// A server presenting the certificate chain in `cert` (PEM, leaf
    /// first) with the private key in `key` (PEM, PKCS#8, PKCS#1 or SEC1).
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<TlsServer, TlsError> {
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config_error)?
            .with_no_client_auth()
            .with_single_cert(certificates(cert)?, private_key(key)?)
            .map_err(config_error)?;
        Ok(TlsServer {
            config: Arc::new(config),
            mutual: false,
        })
    }

    /// The same, also requiring every client to present a certificate
    /// signed by a CA in `client_ca` (mutual TLS).
    pub fn with_mutual_tls(
        cert: &Path,
        key: &Path,
        client_ca: &Path,
    ) -> Result<TlsServer, TlsError> {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots(client_ca)?),
            provider(),
        )
        .build()
        .map_err(config_error)?;
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config_error)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certificates(cert)?, private_key(key)?)
            .map_err(config_error)?;
        Ok(TlsServer {
            config: Arc::new(config),
            mutual: true,
        })
    }
}

/// A client's TLS settings. Cheap to clone.
#[derive(Clone)]
pub struct TlsClient {
    pub(crate) config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient").finish_non_exhaustive()
    }
}

impl TlsClient {
    /// A client that trusts the CA certificates in `ca` (PEM) and nothing
    /// else.
    pub fn trusting(ca: &Path) -> Result<TlsClient, TlsError> {
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config_error)?
            .with_root_certificates(roots(ca)?)
            .with_no_client_auth();
        Ok(TlsClient {
            config: Arc::new(config),
        })
    }

    /// The same, presenting the certificate in `cert` with the key in `key`
    /// to servers that ask (mutual TLS).
    pub fn with_identity(ca: &Path, cert: &Path, key: &Path) -> Result<TlsClient, TlsError> {
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config_error)?
            .with_root_certificates(roots(ca)?)
            .with_client_auth_cert(certificates(cert)?, private_key(key)?)
            .map_err(config_error)?;
        Ok(TlsClient {
            config: Arc::new(config),
        })
    }
}

/// The identity in a client certificate: its first DNS subject
/// alternative name.
pub(crate) fn identity_of(certificate: &CertificateDer<'_>) -> Option<String> {
    let cert = webpki::EndEntityCert::try_from(certificate).ok()?;
    let name = cert.valid_dns_names().next().map(str::to_string);
    name
}

/// Files written by [`generate_dev_certs`].
#[cfg(feature = "dev-certs")]
#[derive(Debug, Clone)]
pub struct DevCerts {
    /// The CA certificate: give it to clients ([`TlsClient::trusting`]) and,
    /// for mutual TLS, to the server.
    pub ca_cert: PathBuf,
    /// The CA's private key (keep it away from production).
    pub ca_key: PathBuf,
    /// The server certificate and key.
    pub server_cert: PathBuf,
    /// The server's private key.
    pub server_key: PathBuf,
    /// A certificate and key per client name, for mutual TLS.
    pub clients: Vec<(String, PathBuf, PathBuf)>,
}

/// How long generated certificates are valid, from a day ago.
#[cfg(feature = "dev-certs")]
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// Days before now the validity starts (so clock skew does not bite).
    pub from_days_ago: i64,
    /// Days after now it ends; negative for a certificate already expired.
    pub until_days_from_now: i64,
}

#[cfg(feature = "dev-certs")]
impl Default for Validity {
    fn default() -> Self {
        Validity {
            from_days_ago: 1,
            until_days_from_now: 365,
        }
    }
}

/// Writes a development CA, a server certificate valid for `server_names`
/// (DNS names or IP addresses) and one client certificate per name in
/// `clients` (identity = that name) into `dir`, as PEM files readable by
/// the owner only. Returns their paths.
///
/// Only with the `dev-certs` feature.
#[cfg(feature = "dev-certs")]
pub fn generate_dev_certs(
    dir: &Path,
    server_names: &[String],
    clients: &[String],
    validity: Validity,
) -> Result<DevCerts, TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let generate = |err: rcgen::Error| TlsError::Generate(err.to_string());
    let io = |path: &Path, err: std::io::Error| TlsError::Pem {
        path: path.to_path_buf(),
        reason: err.to_string(),
    };
    if let Some(bad) = clients.iter().find(|name| {
        name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    }) {
        return Err(TlsError::Generate(format!(
            "client name {bad:?}: expected [A-Za-z0-9._-]+ (it becomes a file name and a DNS name)"
        )));
    }
    std::fs::create_dir_all(dir).map_err(|err| io(dir, err))?;
    let now = std::time::SystemTime::now();
    let day = std::time::Duration::from_secs(86_400);
    let shift = |days: i64| {
        if days >= 0 {
            now + day * days as u32
        } else {
            now - day * days.unsigned_abs() as u32
        }
    };
    let dated = |params: &mut CertificateParams| {
        params.not_before = shift(-validity.from_days_ago).into();
        params.not_after = shift(validity.until_days_from_now).into();
    };
    let write = |name: &str, pem: String| -> Result<PathBuf, TlsError> {
        let path = dir.join(name);
        std::fs::write(&path, pem).map_err(|err| io(&path, err))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(|err| io(&path, err))?;
        }
        Ok(path)
    };

    let ca_key = KeyPair::generate().map_err(generate)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(generate)?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Courier development CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    dated(&mut ca_params);
    let ca_cert = ca_params.self_signed(&ca_key).map_err(generate)?;
    let issuer = rcgen::Issuer::new(ca_params, &ca_key);

    let leaf = |names: Vec<String>, purpose: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().map_err(generate)?;
        let mut params = CertificateParams::new(names.clone()).map_err(generate)?;
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.extended_key_usages = vec![purpose];
        dated(&mut params);
        let cert = params.signed_by(&key, &issuer).map_err(generate)?;
        Ok::<_, TlsError>((cert.pem(), key.serialize_pem()))
    };
    let (server_pem, server_key_pem) =
        leaf(server_names.to_vec(), ExtendedKeyUsagePurpose::ServerAuth)?;
    let mut client_files = Vec::new();
    for name in clients {
        let (cert, key) = leaf(vec![name.clone()], ExtendedKeyUsagePurpose::ClientAuth)?;
        client_files.push((
            name.clone(),
            write(&format!("client-{name}.pem"), cert)?,
            write(&format!("client-{name}-key.pem"), key)?,
        ));
    }
    Ok(DevCerts {
        ca_cert: write("ca.pem", ca_cert.pem())?,
        ca_key: write("ca-key.pem", ca_key.serialize_pem())?,
        server_cert: write("server.pem", server_pem)?,
        server_key: write("server-key.pem", server_key_pem)?,
        clients: client_files,
    })
}
