//! Step 2 of a push: its changes in chunks, merged into the loaded record states, stamped after the clock.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::ops::Range;

use super::records::{self, Batch};
use super::{Cause, StoreError};
use crate::protocol::time::Micros;
use crate::protocol::{Changeset, Conflict, NewChange, WireChange};

/// What merging a batch leaves to write and to answer.
/// The chunks of one push as it works through them, and what merging them leaves to answer.
pub(super) struct Chunks<'c> {
    pub(super) changeset: &'c Changeset,
    /// Chunk 0, parsed (and its records loaded) for step 1.
    pub(super) first: Option<Cow<'c, [NewChange]>>,
    /// The records the batch touches, kept only when the page has entries to answer with merged state.
    pub(super) touched: Option<BTreeSet<(String, String)>>,
    pub(super) conflicts: Vec<Conflict>,
    /// Records where a pushed field lost: answered with their whole merged state.
    pub(super) lost: BTreeSet<(String, String)>,
    /// Changes with a time beyond the future-skew bound.
    pub(super) beyond_skew: u64,
}

/// A log row and its stamp (an insert that won everywhere is the pushed change itself).
pub(super) type LogRow<'c> = (Cow<'c, NewChange>, Micros);

impl<'c> Chunks<'c> {
    /// `first`: chunk 0, parsed for step 1; `page_has_entries`: keep the touched records, to answer page
    /// entries of records the batch touched with their merged state.
    pub(super) fn new(
        changeset: &'c Changeset,
        first: Cow<'c, [NewChange]>,
        page_has_entries: bool,
    ) -> Chunks<'c> {
        Chunks {
            changeset,
            first: Some(first),
            touched: page_has_entries.then(BTreeSet::new),
            conflicts: Vec::new(),
            lost: BTreeSet::new(),
            beyond_skew: 0,
        }
    }

    /// The changes of `range`, with their records' states loaded into `batch` (the states earlier chunks
    /// wrote included; chunk 0's were loaded in step 1).
    pub(super) async fn open(
        &mut self,
        client: &tokio_postgres::Client,
        range: &Range<usize>,
        batch: &mut Batch,
        (user, app, future_skew): (&str, &str, Micros),
    ) -> Result<Cow<'c, [NewChange]>, StoreError> {
        let changes = match self.first.take() {
            Some(changes) => changes,
            None => {
                let changes = parse_chunk(self.changeset, range)?;
                *batch = Batch::load(client, user, keys_of(app, &changes), future_skew).await?;
                changes
            }
        };
        if let Some(touched) = &mut self.touched {
            touched.extend(
                changes
                    .iter()
                    .map(|c| (c.table.clone(), c.record_id.clone())),
            );
        }
        Ok(changes)
    }

    /// Merges `changes` into the record states, change `i` stamped `first_stamp + i`; returns the log rows
    /// (only what won goes to the log, so stamps of log rows may leave gaps, and stay strictly increasing)
    /// and keeps the conflicts.
    pub(super) fn merge<'d>(
        &mut self,
        batch: &mut Batch,
        (app, device): (&str, &str),
        changes: &'d [NewChange],
        first_stamp: Micros,
    ) -> Vec<LogRow<'d>> {
        let mut log_rows = Vec::new();
        for (change, stamp) in changes.iter().zip(first_stamp..) {
            let (winners, losers) = batch.apply(app, change, device, stamp);
            let state = batch
                .state(app, &change.table, &change.record_id)
                .expect("applied above");
            if let Some(row) = records::winning_row(change, &winners, state) {
                batch.stamped(app, &change.table, &change.record_id, None, stamp);
                log_rows.push((row, stamp));
            }
            for conflict in losers {
                self.conflicts.push(records::conflict(
                    &change.table,
                    &change.record_id,
                    conflict,
                ));
                self.lost
                    .insert((change.table.clone(), change.record_id.clone()));
            }
        }
        self.beyond_skew += batch.beyond_skew();
        log_rows
    }
}

/// The ranges of a batch's chunks (one, empty, for an empty batch).
pub(super) fn chunk_ranges(count: usize) -> Vec<Range<usize>> {
    (0..count.max(1))
        .step_by(CHUNK)
        .map(|start| start..(start + CHUNK).min(count))
        .collect()
}

/// Changes `range` of the push, parsed (they were validated before the transaction began).
pub(super) fn parse_chunk<'c>(
    changeset: &'c Changeset,
    range: &Range<usize>,
) -> Result<Cow<'c, [NewChange]>, StoreError> {
    changeset.changes.slice(range.clone()).map_err(|e| {
        StoreError::Internal(Cause::new(format!("a validated change did not parse: {e}")))
    })
}

/// Changes merged and written per statement (and parsed at once, `protocol::changeset::CHUNK`).
const CHUNK: usize = crate::protocol::changeset::CHUNK;

/// The distinct record keys of `changes`, for loading their states.
pub(super) fn keys_of(app: &str, changes: &[NewChange]) -> Vec<(String, String, String)> {
    changes
        .iter()
        .map(|c| (app.to_owned(), c.table.clone(), c.record_id.clone()))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Never hand the pushing device a value older than the one the server now holds: a page entry for a
/// record this batch touched (read before the merge) and every record where a pushed field lost are
/// answered with the record's whole merged state instead. That also lets a device converge whose cursor is
/// already past the change that beat it. Returns the page without those entries, and the records to answer
/// with their merged state.
pub(super) fn split_page(
    touched: Option<BTreeSet<(String, String)>>,
    page: Vec<WireChange>,
    lost: BTreeSet<(String, String)>,
) -> (Vec<WireChange>, BTreeSet<(String, String)>) {
    let mut refreshed = lost;
    let Some(touched) = touched else {
        return (page, refreshed);
    };
    let mut kept: Vec<WireChange> = Vec::with_capacity(page.len());
    for change in page {
        let key = (change.table.clone(), change.id.clone());
        if touched.contains(&key) {
            refreshed.insert(key);
        } else {
            kept.push(change);
        }
    }
    (kept, refreshed)
}
