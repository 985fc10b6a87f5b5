//! What travels between the processes: the read requests the gateway sends
//! to `svc.tickets`, their replies, and the writes it puts on the
//! `tickets.writes` queue. Each process validates what it receives; these
//! types and their limits are shared so the checks agree.

use serde::{Deserialize, Serialize};

/// The subject (and queue group) of the ticket service.
pub const SERVICE_SUBJECT: &str = "svc.tickets";
/// The durable queue of accepted writes.
pub const WRITES_QUEUE: &str = "tickets.writes";
/// Where the worker announces each stored ticket (JSON, for browsers).
pub const CHANGES_SUBJECT: &str = "tickets.changed";

/// A title's longest length, in characters (Unicode scalar values). In
/// characters, not bytes, so that the page's `maxlength` (which counts
/// UTF-16 units, never fewer than characters) lets through nothing the
/// server refuses: 200 CJK characters are 600 bytes and fine.
pub const MAX_TITLE_CHARS: usize = 200;
/// A body's longest length, in characters.
pub const MAX_BODY_CHARS: usize = 4000;
/// A search text's longest length, in characters.
pub const MAX_QUERY_CHARS: usize = 200;
/// A ticket id's longest length, in bytes.
pub const MAX_ID_BYTES: usize = 64;
/// The most tickets one search returns.
pub const MAX_RESULTS: u32 = 50;

/// One ticket, as stored and as shown.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    /// Its id (the gateway's, or a seed's fixed one).
    pub id: String,
    /// A one-line summary.
    pub title: String,
    /// The description.
    pub body: String,
    /// When the gateway accepted it, in milliseconds since the Unix epoch.
    pub created_at: i64,
}

/// A read, sent as a typed request to [`SERVICE_SUBJECT`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReadRequest {
    /// Tickets whose title or body contains `query` (all if empty), newest
    /// first, at most `limit` (capped at [`MAX_RESULTS`] by the service).
    Search {
        /// The text to look for.
        query: String,
        /// How many at most.
        limit: u32,
    },
    /// One ticket by id.
    Get {
        /// Its id.
        id: String,
    },
}

/// The service's answer to a [`ReadRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadReply {
    /// Which instance answered (`service-<pid>`), so the page can show it.
    pub served_by: String,
    /// What it found, or why it could not.
    pub outcome: ReadOutcome,
}

/// What a read found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReadOutcome {
    /// A search's tickets, newest first.
    Tickets(Vec<Ticket>),
    /// A get's ticket, `None` if there is no such id.
    Ticket(Option<Ticket>),
    /// The request was invalid (a reason for the user).
    Invalid(String),
    /// The database failed (a reason for the log; not retryable here).
    Failed(String),
}

/// A ticket the gateway accepted, on its way to the worker through the
/// durable queue. The id and time are fixed here, so a redelivery stores
/// the same row.
pub type TicketWrite = Ticket;

/// What the browser posts to create a ticket.
#[derive(Clone, Debug, Deserialize)]
pub struct NewTicket {
    /// Its title: 1 to [`MAX_TITLE_CHARS`] characters after trimming, one line.
    pub title: String,
    /// Its body: at most [`MAX_BODY_CHARS`] characters.
    #[serde(default)]
    pub body: String,
}

/// Why a request from outside was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// A required field is empty.
    #[error("{0} is empty")]
    Empty(&'static str),
    /// A field is longer than its limit.
    #[error("{field} is {len} characters long; at most {max} are allowed")]
    TooLong {
        /// Which field.
        field: &'static str,
        /// Its length, in characters (ids: bytes, which are ASCII).
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A field holds characters it may not (control characters, a line
    /// break in a title, an id outside `[A-Za-z0-9_-]`).
    #[error("{0} holds characters it may not")]
    BadCharacters(&'static str),
}

impl NewTicket {
    /// The ticket to store, trimmed and checked against the limits.
    pub fn validate(self) -> Result<NewTicket, ValidationError> {
        let title = self.title.trim().to_string();
        let body = self.body.trim_end().to_string();
        if title.is_empty() {
            return Err(ValidationError::Empty("title"));
        }
        bounded("title", &title, MAX_TITLE_CHARS)?;
        bounded("body", &body, MAX_BODY_CHARS)?;
        if title.chars().any(char::is_control) {
            return Err(ValidationError::BadCharacters("title"));
        }
        // A body may have line breaks and tabs, nothing else invisible.
        if body
            .chars()
            .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
        {
            return Err(ValidationError::BadCharacters("body"));
        }
        Ok(NewTicket { title, body })
    }
}

/// Checks a search text.
pub fn validate_query(query: &str) -> Result<String, ValidationError> {
    let query = query.trim();
    bounded("q", query, MAX_QUERY_CHARS)?;
    if query.chars().any(char::is_control) {
        return Err(ValidationError::BadCharacters("q"));
    }
    Ok(query.to_string())
}

/// Checks a ticket id: 1 to [`MAX_ID_BYTES`] of `[A-Za-z0-9_-]`.
pub fn validate_id(id: &str) -> Result<(), ValidationError> {
    if id.is_empty() {
        return Err(ValidationError::Empty("id"));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(ValidationError::BadCharacters("id"));
    }
    // ASCII by now: characters are bytes.
    bounded("id", id, MAX_ID_BYTES)?;
    Ok(())
}

/// `value` at most `max` characters long.
fn bounded(field: &'static str, value: &str, max: usize) -> Result<(), ValidationError> {
    // Counted only as far as needed: a huge value costs no more than `max`.
    let len = value.chars().take(max + 1).count();
    if len > max {
        return Err(ValidationError::TooLong {
            field,
            len: value.chars().count(),
            max,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(title: &str, body: &str) -> NewTicket {
        NewTicket {
            title: title.into(),
            body: body.into(),
        }
    }

    #[test]
    fn a_ticket_is_trimmed_and_accepted() {
        let ok = new("  Printer on fire \n", "It smokes.\n\n")
            .validate()
            .unwrap();
        assert_eq!(ok.title, "Printer on fire");
        assert_eq!(ok.body, "It smokes.");
    }

    #[test]
    fn an_oversize_title_or_body_is_refused() {
        let long = "x".repeat(MAX_TITLE_CHARS + 1);
        assert_eq!(
            new(&long, "").validate().unwrap_err(),
            ValidationError::TooLong {
                field: "title",
                len: MAX_TITLE_CHARS + 1,
                max: MAX_TITLE_CHARS
            }
        );
        assert!(new(&"x".repeat(MAX_TITLE_CHARS), "").validate().is_ok());
        let body = "y".repeat(MAX_BODY_CHARS + 1);
        assert!(matches!(
            new("t", &body).validate(),
            Err(ValidationError::TooLong { field: "body", .. })
        ));
    }

    #[test]
    fn limits_count_characters_not_bytes() {
        // 200 CJK characters: 600 bytes, as many as the page's maxlength allows.
        let cjk = "票".repeat(MAX_TITLE_CHARS);
        assert!(new(&cjk, &"é".repeat(MAX_BODY_CHARS)).validate().is_ok());
        let over = "票".repeat(MAX_TITLE_CHARS + 1);
        let err = new(&over, "").validate().unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "title is {} characters long; at most {MAX_TITLE_CHARS} are allowed",
                MAX_TITLE_CHARS + 1
            )
        );
        assert!(validate_query(&"ü".repeat(MAX_QUERY_CHARS)).is_ok());
    }

    #[test]
    fn an_empty_or_multiline_title_is_refused() {
        assert_eq!(
            new("   ", "b").validate().unwrap_err(),
            ValidationError::Empty("title")
        );
        assert_eq!(
            new("two\nlines", "").validate().unwrap_err(),
            ValidationError::BadCharacters("title")
        );
        assert_eq!(
            new("t", "bell \u{7}").validate().unwrap_err(),
            ValidationError::BadCharacters("body")
        );
        assert!(new("t", "line\nbreaks\tand tabs").validate().is_ok());
    }

    #[test]
    fn ids_and_queries_are_checked() {
        assert!(validate_id("seed-01").is_ok());
        assert!(validate_id("").is_err());
        assert!(validate_id("../etc").is_err());
        assert!(validate_id(&"a".repeat(MAX_ID_BYTES + 1)).is_err());
        assert_eq!(validate_query("  printer ").unwrap(), "printer");
        assert!(validate_query(&"q".repeat(MAX_QUERY_CHARS + 1)).is_err());
    }
}
