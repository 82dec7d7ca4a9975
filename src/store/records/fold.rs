//! Folding: log rows other programs wrote (direct writers, older servers) merged into the record states.

use super::*;

/// The user's log rows after a stamp, in order, a slice at a time.
const PENDING: &str = concat!(
    "SELECT id::text, app_id, table_name, record_id, op, data, field_meta, client_id, created_at, ",
    "schema_version, actor, origin, space_id FROM sync_changes WHERE user_id = $1 AND created_at > $2 ",
    "ORDER BY created_at, id LIMIT 2000"
);
/// The user's clock and how far its log is folded.
const FOLD_STATE: &str = "SELECT last_at, folded_at FROM sync_user_clock WHERE user_id = $1";
/// Records how far the user's log is folded.
const MARK_FOLDED: &str = concat!(
    "INSERT INTO sync_user_clock AS clock (user_id, last_at, folded_at) VALUES ($1, $2, $2) ",
    clock_conflict!()
);

/// Brings the user's record states up to date with log rows not folded yet. Needs the exclusive lock.
pub(crate) async fn fold_pending(
    tx: &impl GenericClient,
    user: &str,
    future_skew: Micros,
) -> Result<(), StoreError> {
    if let Some(from) = fold_start(tx, user).await? {
        fold_from(tx, user, from, future_skew).await?;
    }
    Ok(())
}

/// Where folding must start, or `None` when the state already covers every log row of the user.
pub(crate) async fn fold_start(
    tx: &impl GenericClient,
    user: &str,
) -> Result<Option<Micros>, StoreError> {
    let state = tx.query_opt(FOLD_STATE, &[&user]).await?;
    Ok(match state {
        Some(row) => pending_from(Some(row.get::<_, PgTimestamp>(0).0), row.get(1)),
        None => pending_from(None, None),
    })
}

/// Where folding must start given the user's clock and how far its log is folded (`None`: nothing to
/// fold). A user without a clock may have rows an older server wrote.
pub(crate) fn pending_from(
    last_at: Option<Micros>,
    folded_at: Option<PgTimestamp>,
) -> Option<Micros> {
    match (last_at, folded_at) {
        (Some(last), Some(folded)) if folded.0 >= last => None,
        (Some(_), Some(folded)) => Some(folded.0),
        _ => Some(Micros::MIN),
    }
}

/// Folds the user's log rows after `from` into the state. True when there were any.
pub(crate) async fn fold_from(
    tx: &impl GenericClient,
    user: &str,
    from: Micros,
    future_skew: Micros,
) -> Result<bool, StoreError> {
    let mut folded = from;
    let mut any = false;
    loop {
        let rows = tx.query(PENDING, &[&user, &PgTimestamp(folded)]).await?;
        if rows.is_empty() {
            return Ok(any);
        }
        any = true;
        let full = rows.len() == 2000;
        let mut changes = Vec::with_capacity(rows.len());
        for row in &rows {
            changes.push(PendingRow::read(row).map_err(|e| {
                StoreError::Internal(Cause::new(format!("unreadable log row: {e}")))
            })?);
        }
        let keys = changes
            .iter()
            .map(|c| {
                (
                    c.app.clone(),
                    c.change.table.clone(),
                    c.change.record_id.clone(),
                )
            })
            .collect();
        let mut batch = Batch::load(tx, user, dedup(keys), future_skew).await?;
        for pending in &changes {
            let (winners, _) = batch.apply(
                &pending.app,
                &pending.change,
                &pending.client_id,
                pending.created_at,
            );
            if !winners.is_empty() {
                batch.stamped(
                    &pending.app,
                    &pending.change.table,
                    &pending.change.record_id,
                    Some(pending.event_id.clone()),
                    pending.created_at,
                );
            }
        }
        batch.save(tx, user).await?;
        folded = changes.last().map(|c| c.created_at).unwrap_or(folded);
        tx.execute(MARK_FOLDED, &[&user, &PgTimestamp(folded)])
            .await?;
        if !full {
            return Ok(any);
        }
    }
}

fn dedup(mut keys: Vec<Key>) -> Vec<Key> {
    keys.sort();
    keys.dedup();
    keys
}

/// A log row read back for folding, in the shape a push has.
struct PendingRow {
    event_id: String,
    app: String,
    client_id: String,
    created_at: Micros,
    change: NewChange,
}

impl PendingRow {
    fn read(row: &tokio_postgres::Row) -> Result<PendingRow, tokio_postgres::Error> {
        let created_at = row.try_get::<_, PgTimestamp>(8)?.0;
        let op = Op::parse(&row.try_get::<_, String>(4)?).unwrap_or(Op::Update);
        let object = |value: Option<Value>| match value {
            Some(Value::Object(map)) => map,
            _ => Map::new(),
        };
        let mut data = object(row.try_get(5)?);
        // Direct writers may give timestamps as {"at": …}; the merge wants the string.
        let field_meta: Map<String, Value> = object(row.try_get(6)?)
            .into_iter()
            .filter_map(|(field, meta)| match meta {
                Value::String(at) => Some((field, Value::String(at))),
                Value::Object(meta) => meta
                    .get("at")
                    .or_else(|| meta.get("updatedAt"))
                    .cloned()
                    .map(|at| (field, at)),
                _ => None,
            })
            .collect();
        // A delete without deletedAt in data takes its field time; without either, the merge assigns one
        // from the row's stamp (as emitting the row does).
        if op == Op::Delete && !data.get(merge::DELETED_AT).is_some_and(Value::is_string) {
            if let Some(at) = field_meta.get(merge::DELETED_AT).and_then(Value::as_str) {
                data.insert(merge::DELETED_AT.into(), Value::String(at.to_owned()));
            }
        }
        Ok(PendingRow {
            event_id: row.try_get(0)?,
            app: row.try_get(1)?,
            client_id: row.try_get(7)?,
            created_at,
            change: NewChange {
                table: row.try_get(2)?,
                record_id: row.try_get(3)?,
                op,
                data,
                field_meta,
                space_id: row.try_get(12)?,
                actor: row.try_get(10)?,
                origin: row.try_get(11)?,
                schema_version: row.try_get(9)?,
            },
        })
    }
}
