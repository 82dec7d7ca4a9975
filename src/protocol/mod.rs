//! The wire protocol: what clients send and what they get back. No I/O lives here.
//!
//! This module is the parsing surface the fuzz targets exercise: everything that turns untrusted bytes into
//! typed values (push bodies, query strings, cursors) is a pure function of its input.

pub mod changeset;
pub(crate) mod error;
pub mod query;
pub mod realtime;
pub mod time;
pub(crate) mod wire;

use std::fmt;

pub use changeset::{parse_changeset, Changeset, NewChange, Op};
pub(crate) use error::ErrorCode;
pub use query::parse_pull_query;
pub(crate) use query::PullQuery;
pub use wire::StoredChange;
pub(crate) use wire::{Conflict, SyncResponse, WireChange};

/// The newest `schemaVersion` this server understands.
pub const SUPPORTED_SCHEMA_VERSION: i32 = 1;

/// Input a client sent that this server will not accept. `code` is the stable API; `message` is for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    pub(crate) code: ErrorCode,
    pub(crate) message: String,
}

impl ProtocolError {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ProtocolError {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for ProtocolError {}

/// App ids, collections and table names: 1–64 characters of `[A-Za-z0-9_.-]`.
pub fn is_identifier(text: &str) -> bool {
    (1..=64).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        // `.` and `..` (and other all-dot names) read as path segments wherever an id meets a path.
        && !text.bytes().all(|b| b == b'.')
}

#[cfg(test)]
mod tests;
