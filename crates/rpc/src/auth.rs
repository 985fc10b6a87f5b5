//! Who is calling: the hello exchange that opens every connection, bearer
//! tokens, identities, and the caller as a handler sees it.
//!
//! Every connection opens with the client's `Hello` frame (carrying its
//! token, if it has one) and the server's `Hello` answer (the identity it
//! recognised) or an `Error` (`Unauthenticated`, `TooManyConnections`),
//! after which the server closes the connection. Until the answer, the
//! server reads nothing else from the connection; a client that does not say
//! hello within [`crate::ServerConfig::hello_timeout`] is dropped.
//!
//! The identity is, in order: the client certificate's identity under
//! mutual TLS; else what the [`Authenticator`] makes of the token; else
//! none (anonymous), which [`crate::ServerConfig::require_identity`] refuses.
//! Handlers read it with [`caller`].
//!
//! Tokens are [`Secret`]s: their `Debug` form is redacted, they have no
//! `Display`, they are compared in constant time, and no error message or
//! log line contains one.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A secret (a bearer token): never printed, compared in constant time.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Secret {
        Secret(secret.into())
    }

    /// Compares with `other` in time that depends only on their lengths.
    pub fn matches(&self, other: &Secret) -> bool {
        let (a, b) = (self.0.as_bytes(), other.0.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Turns a token into an identity.
pub trait Authenticator: Send + Sync + 'static {
    /// The identity `token` proves, or `None` if it proves nothing.
    fn authenticate(&self, token: &Secret) -> Option<String>;
}

/// What the client says first.
#[derive(Serialize, Deserialize, Debug)]
pub struct Hello {
    /// Its token, if any.
    pub token: Option<Secret>,
}

/// What the server answers to a hello it accepts.
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
pub struct Welcome {
    /// The identity it recognised; `None` for anonymous.
    pub identity: Option<String>,
}

/// Decodes a client's hello, as the server does (for fuzzing and tests).
pub fn decode_hello(payload: &[u8]) -> Result<Hello, postcard::Error> {
    postcard::from_bytes(payload)
}

/// The identity of whoever made the call being handled: `None` for an
/// anonymous caller, and outside a handler.
pub fn caller() -> Option<Arc<str>> {
    crate::server::caller()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_never_printed_and_compare_by_content() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?}"), "Secret(<redacted>)");
        assert!(!format!(
            "{:?}",
            Hello {
                token: Some(secret.clone())
            }
        )
        .contains("hunter2"));
        assert!(secret.matches(&Secret::new("hunter2")));
        assert!(!secret.matches(&Secret::new("hunter3")));
        assert!(!secret.matches(&Secret::new("hunter")));
    }

    #[test]
    fn there_is_no_caller_outside_a_handler() {
        assert_eq!(caller(), None);
    }
}
