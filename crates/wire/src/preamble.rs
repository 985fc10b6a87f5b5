//! The stream preamble: eight bytes each side sends first on a stream
//! connection, before any frame.
//!
//! ```text
//!  0                               7   8
//! +---+---+---+---+---+---+---+---+
//! | C | O | U | R | I | E | R | v |     v = protocol version (u8)
//! +---+---+---+---+---+---+---+---+
//! ```
//!
//! A peer that is not Courier (an HTTP client typing `GET / HTTP/1.1`) or
//! speaks another version is refused here, with an error naming what it
//! sent, before any of its bytes could be read as a giant frame length.

use crate::{PreambleError, PROTOCOL_VERSION};

/// Length of the preamble.
pub const PREAMBLE_LEN: usize = 8;

const MAGIC: &[u8; 7] = b"COURIER";

/// The preamble this build sends.
pub fn preamble() -> [u8; PREAMBLE_LEN] {
    let mut out = [0u8; PREAMBLE_LEN];
    out[..7].copy_from_slice(MAGIC);
    out[7] = PROTOCOL_VERSION;
    out
}

/// Checks the preamble a peer sent.
///
/// ```
/// use courier_wire::preamble::{check, preamble};
/// assert!(check(&preamble()).is_ok());
/// let err = check(b"GET / HT").unwrap_err();
/// assert!(err.to_string().contains("GET / HT"));
/// ```
pub fn check(received: &[u8; PREAMBLE_LEN]) -> Result<(), PreambleError> {
    if &received[..7] != MAGIC {
        return Err(PreambleError::NotCourier {
            received: received.escape_ascii().to_string(),
        });
    }
    if received[7] != PROTOCOL_VERSION {
        return Err(PreambleError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: received[7],
        });
    }
    Ok(())
}
