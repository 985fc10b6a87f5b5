//! Subjects and filters: dot-separated tokens.
//!
//! A *subject* names what a message is about: `orders.eu.created`. A
//! *filter* selects subjects, and may use two wildcards as whole tokens:
//! `*` matches exactly one token, `>` matches one or more trailing tokens
//! and must be last. `orders.*.created` matches `orders.eu.created`;
//! `orders.>` matches `orders.eu` and `orders.eu.created`, not `orders`.

use std::fmt;
use std::sync::Arc;

/// Longest subject or filter, in bytes.
pub const MAX_LEN: usize = 256;
/// Most tokens in a subject or filter.
pub const MAX_TOKENS: usize = 32;

/// Why a subject or filter is invalid. Each variant points at the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SubjectError {
    /// Nothing at all.
    #[error("empty subject")]
    Empty,
    /// Over [`MAX_LEN`] bytes or [`MAX_TOKENS`] tokens.
    #[error("subject {input:?} is too long ({reason})")]
    TooLong {
        /// The input.
        input: String,
        /// Which limit.
        reason: String,
    },
    /// A token is wrong; `position` counts from 0.
    #[error("invalid token {token:?} at position {position} of {input:?}: {reason}")]
    InvalidToken {
        /// The input.
        input: String,
        /// Which token, from 0.
        position: usize,
        /// The token.
        token: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl SubjectError {
    /// [`ErrorKind::InvalidInput`](courier_wire::ErrorKind::InvalidInput),
    /// always: the text is not a subject or filter.
    pub fn kind(&self) -> courier_wire::ErrorKind {
        match self {
            SubjectError::Empty
            | SubjectError::TooLong { .. }
            | SubjectError::InvalidToken { .. } => courier_wire::ErrorKind::InvalidInput,
        }
    }
}

fn split(input: &str, wildcards: bool) -> Result<Vec<Arc<str>>, SubjectError> {
    check(input, wildcards)?;
    Ok(input.split('.').map(Arc::from).collect())
}

/// Checks a queue group's name: what a subject allows (so at most
/// [`MAX_LEN`] bytes, no whitespace), since it travels and is stored like one.
pub(crate) fn check_group(group: &str) -> Result<(), SubjectError> {
    check(group, false)
}

/// Checks a subject (or, with `wildcards`, a filter) without allocating:
/// publishers validate every message's subject before it is queued.
pub(crate) fn check(input: &str, wildcards: bool) -> Result<(), SubjectError> {
    if input.is_empty() {
        return Err(SubjectError::Empty);
    }
    if input.len() > MAX_LEN {
        return Err(SubjectError::TooLong {
            input: input.to_string(),
            reason: format!("{} bytes, at most {MAX_LEN}", input.len()),
        });
    }
    let count = input.split('.').count();
    if count > MAX_TOKENS {
        return Err(SubjectError::TooLong {
            input: input.to_string(),
            reason: format!("{count} tokens, at most {MAX_TOKENS}"),
        });
    }
    let invalid = |position: usize, token: &str, reason| SubjectError::InvalidToken {
        input: input.to_string(),
        position,
        token: token.to_string(),
        reason,
    };
    for (position, token) in input.split('.').enumerate() {
        if token.is_empty() {
            return Err(invalid(position, token, "empty token"));
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid(position, token, "whitespace or control character"));
        }
        let is_wildcard = token == "*" || token == ">";
        if is_wildcard && !wildcards {
            return Err(invalid(
                position,
                token,
                "wildcards are for filters, not subjects",
            ));
        }
        if !is_wildcard && (token.contains('*') || token.contains('>')) {
            return Err(invalid(position, token, "a wildcard must be a whole token"));
        }
        if token == ">" && position + 1 != count {
            return Err(invalid(position, token, "'>' must be the last token"));
        }
    }
    Ok(())
}

/// A valid subject (no wildcards).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Subject {
    text: Arc<str>,
    tokens: Arc<[Arc<str>]>,
}

impl Subject {
    /// Parses and validates a subject.
    pub fn new(input: &str) -> Result<Subject, SubjectError> {
        let tokens = split(input, false)?;
        Ok(Subject {
            text: input.into(),
            tokens: tokens.into(),
        })
    }

    /// Whether `input` is a valid subject, without making one.
    pub fn validate(input: &str) -> Result<(), SubjectError> {
        check(input, false)
    }

    /// The tokens.
    pub fn tokens(&self) -> &[Arc<str>] {
        &self.tokens
    }

    /// The subject as text.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The text, shared (no copy).
    pub(crate) fn shared_text(&self) -> Arc<str> {
        self.text.clone()
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Subject({})", self.text)
    }
}

/// One token of a filter.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Token {
    /// Matches itself.
    Literal(Arc<str>),
    /// `*`: any one token.
    One,
    /// `>`: one or more trailing tokens.
    Rest,
}

/// A valid filter.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Filter {
    text: Arc<str>,
    tokens: Arc<[Token]>,
}

impl Filter {
    /// Parses and validates a filter.
    pub fn new(input: &str) -> Result<Filter, SubjectError> {
        let tokens = split(input, true)?
            .into_iter()
            .map(|t| match &*t {
                "*" => Token::One,
                ">" => Token::Rest,
                _ => Token::Literal(t),
            })
            .collect::<Vec<_>>();
        Ok(Filter {
            text: input.into(),
            tokens: tokens.into(),
        })
    }

    /// The tokens.
    pub fn tokens(&self) -> &[Token] {
        &self.tokens
    }

    /// Whether `subject` matches, by walking both token lists: the
    /// reference the router is tested against.
    pub fn matches(&self, subject: &Subject) -> bool {
        let subject = subject.tokens();
        for (i, token) in self.tokens.iter().enumerate() {
            match token {
                Token::Rest => return subject.len() > i,
                Token::One => {
                    if i >= subject.len() {
                        return false;
                    }
                }
                Token::Literal(literal) => {
                    if subject.get(i) != Some(literal) {
                        return false;
                    }
                }
            }
        }
        self.tokens.len() == subject.len()
    }

    /// Whether every subject this filter matches is also matched by
    /// `other`: for permissions, where a subscription must stay within what
    /// an identity may see.
    pub fn is_within(&self, other: &Filter) -> bool {
        let (mine, theirs) = (&self.tokens[..], &other.tokens[..]);
        for (i, token) in theirs.iter().enumerate() {
            match (token, mine.get(i)) {
                // `>` covers one or more tokens: anything from here on, as
                // long as this filter has at least one more token.
                (Token::Rest, Some(_)) => return true,
                (Token::Rest, None) => return false,
                (_, None) | (_, Some(Token::Rest)) => return false,
                (Token::One, Some(_)) => {}
                (Token::Literal(a), Some(Token::Literal(b))) if a == b => {}
                (Token::Literal(_), Some(_)) => return false,
            }
        }
        mine.len() == theirs.len()
    }

    /// The filter as text.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Filter({})", self.text)
    }
}
