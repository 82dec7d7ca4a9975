//! Snapshots: cursors in the snapshot range, and pages of merged record states in position (`seq`) order.

use serde_json::Value;
use tokio_postgres::GenericClient;

use super::{entry, RecordState};
use crate::protocol::time::Micros;
use crate::protocol::WireChange;
use crate::store::{Cause, StoreError};

/// Where snapshot cursors start: anything before is "no cursor", i.e. a fresh snapshot.
pub(crate) const SNAPSHOT_FLOOR: Micros = 86_400_000_000; // 1970-01-02T00:00:00Z
/// Where snapshot cursors end and log cursors begin.
pub(crate) const SNAPSHOT_CEIL: Micros = 946_684_800_000_000; // 2000-01-01T00:00:00Z
/// The first position `sync_records_seq` hands out (`START` in schema.sql; keep the two equal).
///
/// Older versions encoded a record's stamp at 2 µs resolution in the cursor range, so their cursors
/// decode to positions below (stamp − 2000-01-01) / 2, about 4.3e14 in 2026 and still below this until
/// 2031. Such a cursor therefore decodes to a position before every record, and the snapshot simply starts
/// again: duplicates, never a gap.
#[cfg(test)]
pub(super) const SEQ_START: i64 = 500_000_000_000_000;
/// The last position a snapshot cursor can carry (`SNAPSHOT_FLOOR + SEQ_MAX` is the last µs before
/// `SNAPSHOT_CEIL`). That leaves about 4.47e14 positions after `SEQ_START`: 14 years of one million record
/// writes per second, 140 years of 100,000. Should the sequence ever get there, a snapshot page that would
/// need a cursor past it is refused with an internal error (`snapshot_cursor` returns `None`) rather than
/// answered with a cursor outside the range; the remedy is to renumber `seq` and restart the sequence.
pub(crate) const SEQ_MAX: i64 = SNAPSHOT_CEIL - SNAPSHOT_FLOOR - 1;

/// How a `since` is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadMode {
    /// Log rows after this cursor.
    Log(Micros),
    /// Records whose position (`seq`) is after this one.
    Snapshot(i64),
}

/// A `since` before the snapshot range (the epoch, or nothing), or older than the retention horizon,
/// starts a snapshot; one inside the range continues one after the position it encodes; anything else
/// reads the log.
pub(crate) fn read_mode(since: Micros, horizon: Option<Micros>) -> ReadMode {
    if since < SNAPSHOT_FLOOR {
        ReadMode::Snapshot(0)
    } else if since < SNAPSHOT_CEIL {
        ReadMode::Snapshot(since - SNAPSHOT_FLOOR)
    } else if horizon.is_some_and(|h| since < h) {
        ReadMode::Snapshot(0)
    } else {
        ReadMode::Log(since)
    }
}

/// The cursor of a snapshot page that has more and ended at the record at `position`: the next page
/// starts after it. `None` when the position does not fit the range (see `SEQ_MAX`).
pub(crate) fn snapshot_cursor(position: i64) -> Option<Micros> {
    (0..=SEQ_MAX)
        .contains(&position)
        .then(|| SNAPSHOT_FLOOR + position)
}

/// A snapshot page: records of one app (optionally some tables) positioned after `from`, in position
/// order, each with its position; and whether more remain.
pub(crate) async fn snapshot_page(
    tx: &impl GenericClient,
    user: &str,
    app: &str,
    tables: Option<&[String]>,
    from: i64,
    (limit, budget): (usize, usize),
) -> Result<(Vec<(i64, WireChange)>, bool), StoreError> {
    let limit_plus_one = i64::try_from(limit).unwrap_or(i64::MAX - 1) + 1;
    let budget = i64::try_from(budget).unwrap_or(i64::MAX);
    // Bounded by rows and by bytes (`PAGE_MAX_BYTES`, by stored size, at least one record): the records
    // the row bound finds come back in order with whether the ones before them stayed under the budget,
    // and the state of those that did not is not even read (nor detoasted).
    let query = |filter: &str| {
        format!(
            "SELECT table_name, record_id, CASE WHEN fits THEN state END, deleted, seq, event_id::text, \
             CASE WHEN fits THEN actor END, origin, space_id, schema_version, fits FROM (\
             SELECT *, coalesce(sum(size) OVER (ORDER BY seq ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) \
             < $5 AS fits FROM (SELECT table_name, record_id, state, deleted, seq, event_id, actor, origin, \
             space_id, schema_version, pg_column_size(state) + coalesce(pg_column_size(actor), 0) AS size \
             FROM sync_records WHERE user_id = $1 AND app_id = $2 AND seq > $3{filter} ORDER BY seq LIMIT $4) \
             AS page) AS sized ORDER BY seq"
        )
    };
    let rows = match tables {
        Some(tables) => {
            tx.query(
                &query(" AND table_name = ANY($6)"),
                &[&user, &app, &from, &limit_plus_one, &budget, &tables],
            )
            .await?
        }
        None => {
            tx.query(&query(""), &[&user, &app, &from, &limit_plus_one, &budget])
                .await?
        }
    };
    let mut has_more = rows.len() > limit;
    let mut entries = Vec::with_capacity(rows.len().min(limit));
    for row in rows.iter().take(limit) {
        if !row.try_get::<_, bool>(10)? {
            has_more = true;
            break;
        }
        let state: Value = row.try_get(2)?;
        let state = RecordState::from_json(&state)
            .ok_or_else(|| StoreError::Internal(Cause::new("unreadable state in sync_records")))?;
        let position: i64 = row.try_get(4)?;
        entries.push((position, snapshot_entry(row, &state)?));
    }
    Ok((entries, has_more))
}

/// A snapshot entry read from `sync_records`.
fn snapshot_entry(
    row: &tokio_postgres::Row,
    state: &RecordState,
) -> Result<WireChange, tokio_postgres::Error> {
    Ok(entry(
        &row.try_get::<_, String>(0)?,
        &row.try_get::<_, String>(1)?,
        state,
        row.try_get(5)?,
        row.try_get(6)?,
        row.try_get(7)?,
        row.try_get(8)?,
        row.try_get(9)?,
    ))
}
