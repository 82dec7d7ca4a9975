//! `timestamptz` as microseconds since the Unix epoch, without a date-time crate.
//!
//! PostgreSQL's binary format is an `i64` of microseconds since 2000-01-01, exactly the resolution of the
//! cursor, so the conversion is a constant offset and nothing is lost on the way.

use std::error::Error;

use bytes::BytesMut;
use tokio_postgres::types::{accepts, to_sql_checked, FromSql, IsNull, ToSql, Type};

use crate::protocol::time::Micros;

/// Microseconds between 1970-01-01 and 2000-01-01.
const POSTGRES_EPOCH_OFFSET: i64 = 946_684_800_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct PgTimestamp(pub(crate) Micros);

impl ToSql for PgTimestamp {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        out.extend_from_slice(&self.0.saturating_sub(POSTGRES_EPOCH_OFFSET).to_be_bytes());
        Ok(IsNull::No)
    }

    accepts!(TIMESTAMPTZ, TIMESTAMP);
    to_sql_checked!();
}

impl<'a> FromSql<'a> for PgTimestamp {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn Error + Sync + Send>> {
        let bytes: [u8; 8] = raw.try_into().map_err(|_| "timestamptz must be 8 bytes")?;
        // ±infinity are i64::MAX/MIN; saturate instead of overflowing.
        Ok(PgTimestamp(
            i64::from_be_bytes(bytes).saturating_add(POSTGRES_EPOCH_OFFSET),
        ))
    }

    accepts!(TIMESTAMPTZ, TIMESTAMP);
}
