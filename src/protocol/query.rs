//! Query strings: percent-decoding and the pull parameters.

use super::time::{self, Micros};
use super::{is_identifier, ErrorCode, ProtocolError};

/// Decodes an `application/x-www-form-urlencoded` query into (name, value) pairs, in order.
///
/// `+` means space, as in every form decoder (Go's `url.Query()` did the same); the cursor parser accepts a
/// space where a `+` offset sign was meant.
pub fn parse_query(query: &str) -> Result<Vec<(String, String)>, ProtocolError> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((decode(name)?, decode(value)?))
        })
        .collect()
}

fn decode(text: &str) -> Result<String, ProtocolError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| {
                        ProtocolError::new(
                            ErrorCode::InvalidQuery,
                            "malformed percent-encoding in query string",
                        )
                    })?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out)
        .map_err(|_| ProtocolError::new(ErrorCode::InvalidQuery, "query string is not valid UTF-8"))
}

/// Parameters of `GET /sync/{appId}/pull`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullQuery {
    pub collection: String,
    pub since: Micros,
    pub limit: usize,
}

/// Parses the pull query. `collection` and `since` are required; `limit` defaults to `default_limit` and is
/// clamped to `max_limit`.
pub fn parse_pull_query(
    query: Option<&str>,
    default_limit: usize,
    max_limit: usize,
) -> Result<PullQuery, ProtocolError> {
    let pairs = parse_query(query.unwrap_or(""))?;
    let first = |name: &str| {
        pairs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };

    let collection = match first("collection") {
        None | Some("") => {
            return Err(ProtocolError::new(
                ErrorCode::MissingParameter,
                "query parameter collection is required",
            ))
        }
        Some(c) if !is_identifier(c) => {
            return Err(ProtocolError::new(
                ErrorCode::InvalidCollection,
                "collection must be 1-64 characters of A-Z a-z 0-9 _ . -",
            ))
        }
        Some(c) => c.to_owned(),
    };
    let since = match first("since") {
        None | Some("") => {
            return Err(ProtocolError::new(
                ErrorCode::MissingParameter,
                "query parameter since is required",
            ))
        }
        Some(s) => time::parse_rfc3339(s).map_err(|e| {
            ProtocolError::new(
                ErrorCode::InvalidSince,
                format!("since {s:?} is not a valid cursor: {e}"),
            )
        })?,
    };
    let limit = match first("limit") {
        None | Some("") => default_limit,
        Some(l) => match l.parse::<u64>() {
            Ok(0) | Err(_) => {
                return Err(ProtocolError::new(
                    ErrorCode::InvalidLimit,
                    format!("limit must be a positive integer (at most {max_limit} are returned)"),
                ))
            }
            Ok(n) => usize::try_from(n).unwrap_or(usize::MAX).min(max_limit),
        },
    };
    Ok(PullQuery {
        collection,
        since,
        limit,
    })
}
