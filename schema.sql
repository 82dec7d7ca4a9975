-- mana-sync schema.
--
-- Applied at every start-up (and by `mana-sync migrate`) inside one transaction that first takes a
-- transaction-level advisory lock, so two instances starting at once apply it one after the other.
-- Every statement is additive and idempotent: it creates what is missing and never drops data. It also
-- upgrades a database that today's (Go) server created, including the old `field_timestamps` column.

CREATE TABLE IF NOT EXISTS sync_changes (
    id             UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    app_id         TEXT NOT NULL,
    table_name     TEXT NOT NULL,
    record_id      TEXT NOT NULL,
    user_id        TEXT NOT NULL,
    op             TEXT NOT NULL CHECK (op IN ('insert', 'update', 'delete')),
    data           JSONB,
    field_meta     JSONB DEFAULT '{}',
    client_id      TEXT NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    schema_version INT NOT NULL DEFAULT 1,
    actor          JSONB,
    origin         TEXT,
    space_id       TEXT
);

-- Columns that older databases lack.
ALTER TABLE sync_changes ADD COLUMN IF NOT EXISTS field_meta JSONB DEFAULT '{}';
ALTER TABLE sync_changes ADD COLUMN IF NOT EXISTS schema_version INT NOT NULL DEFAULT 1;
ALTER TABLE sync_changes ADD COLUMN IF NOT EXISTS actor JSONB;
ALTER TABLE sync_changes ADD COLUMN IF NOT EXISTS origin TEXT;
ALTER TABLE sync_changes ADD COLUMN IF NOT EXISTS space_id TEXT;

CREATE INDEX IF NOT EXISTS idx_sync_changes_user_app_created
    ON sync_changes (user_id, app_id, created_at);
CREATE INDEX IF NOT EXISTS idx_sync_changes_record
    ON sync_changes (table_name, record_id, created_at);
CREATE INDEX IF NOT EXISTS idx_sync_changes_user_app_table_created
    ON sync_changes (user_id, app_id, table_name, created_at);

-- Row-level security: a transaction sees and writes only the rows of the user it declared with
-- set_config('app.current_user_id', ..., true). FORCE makes it bind the table owner too; superusers and
-- BYPASSRLS roles are never bound, which is why the server must connect as an ordinary role.
ALTER TABLE sync_changes ENABLE ROW LEVEL SECURITY;
-- The backfill below must see every row, so RLS is lifted for the rest of this transaction only (DDL is
-- transactional; other sessions wait on the table lock and never see it lifted).
ALTER TABLE sync_changes NO FORCE ROW LEVEL SECURITY;

-- Databases written by older servers keep per-field timestamps in `field_timestamps`.
DO $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM information_schema.columns
        WHERE table_schema = current_schema() AND table_name = 'sync_changes'
          AND column_name = 'field_timestamps'
    ) THEN
        EXECUTE $sql$
            UPDATE sync_changes SET field_meta = field_timestamps::jsonb
            WHERE (field_meta IS NULL OR field_meta = '{}'::jsonb)
              AND field_timestamps IS NOT NULL AND field_timestamps::jsonb <> '{}'::jsonb
        $sql$;
    END IF;
END
$$;

ALTER TABLE sync_changes FORCE ROW LEVEL SECURITY;
-- A transaction sees and writes the rows of the user it declared (`app.current_user_id`), or of the users it
-- declared as a group (`mana_sync.users`, a text array literal): mana-sync runs small pushes of different
-- users in one transaction (src/store/group.rs), every statement still naming its user(s) explicitly.
DROP POLICY IF EXISTS sync_changes_owner ON sync_changes;
CREATE POLICY sync_changes_owner ON sync_changes
    USING (user_id = current_setting('app.current_user_id', true)
           OR user_id = ANY (coalesce(nullif(current_setting('mana_sync.users', true), ''), '{}')::text[]))
    WITH CHECK (user_id = current_setting('app.current_user_id', true)
           OR user_id = ANY (coalesce(nullif(current_setting('mana_sync.users', true), ''), '{}')::text[]));

-- The per-user clock behind the cursor guarantee (SPEC §5).
--
-- Every row inserted into sync_changes, by this server or by any direct writer, is stamped by the trigger
-- below while holding an exclusive per-user advisory lock until its transaction ends; stamps of one user
-- are strictly increasing. Readers take the shared form of the same lock before they read, so they never
-- read while a write of that user is in flight, and every later write is stamped after everything they saw.
-- `last_at` is the newest stamp handed out to the user (or the newest cursor vouched for).
CREATE TABLE IF NOT EXISTS sync_user_clock (
    user_id TEXT PRIMARY KEY,
    last_at TIMESTAMPTZ NOT NULL
);
REVOKE ALL ON sync_user_clock FROM PUBLIC;

-- Stamps one row. Within a transaction the last stamp of a user is kept in a transaction-local setting, so
-- only the first row of a user per transaction takes the lock and reads the clock table; the statement
-- trigger further down writes the clock once per statement.
-- SECURITY DEFINER: direct writers need no privileges on sync_user_clock.
CREATE OR REPLACE FUNCTION sync_changes_stamp() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    setting_name text := 'mana_sync.clock_' || replace(hashtext(NEW.user_id)::text, '-', 'm');
    remembered text := current_setting(setting_name, true);
    previous timestamptz;
    stamped timestamptz;
BEGIN
    IF remembered IS NOT NULL AND remembered <> ''
       AND substr(remembered, position('|' in remembered) + 1) = NEW.user_id THEN
        stamped := split_part(remembered, '|', 1)::timestamptz + interval '1 microsecond';
    ELSE
        PERFORM pg_advisory_xact_lock(1398361667, hashtext(NEW.user_id));
        SELECT last_at INTO previous FROM sync_user_clock WHERE user_id = NEW.user_id;
        IF previous IS NULL THEN
            -- First write through this clock: continue after whatever an older server wrote.
            SELECT max(created_at) INTO previous FROM sync_changes WHERE user_id = NEW.user_id;
        END IF;
        stamped := greatest(clock_timestamp(), previous + interval '1 microsecond');
    END IF;
    PERFORM set_config(setting_name, stamped::text || '|' || NEW.user_id, true);
    NEW.created_at := stamped;
    RETURN NEW;
END
$$;

-- Once per statement: advance the clock, and tell every listening server instance which users, apps and
-- tables changed and the user's newest stamp ("s", in the cursor's form; channel mana_sync_changes,
-- delivered at commit). The trigger covers the programs that write the table directly; mana-sync's own
-- pushes stamp their rows, advance the clock and send the hint themselves (see the triggers' WHEN below).
CREATE OR REPLACE FUNCTION sync_changes_advance_clock() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO sync_user_clock AS clock (user_id, last_at)
    SELECT user_id, max(created_at) FROM stamped_rows GROUP BY user_id
    ON CONFLICT (user_id) DO UPDATE SET last_at = greatest(clock.last_at, excluded.last_at);
    IF coalesce(current_setting('mana_sync.notified', true), '') = '' THEN
        PERFORM pg_notify('mana_sync_changes', CASE WHEN length(hint) <= 7900 THEN hint
                          ELSE json_build_object('u', u, 'a', a, 'c', c, 's', s)::text END)
        FROM (SELECT user_id AS u, app_id AS a, client_id AS c, stamp AS s,
                     json_build_object('u', user_id, 'a', app_id, 'c', client_id,
                                       't', tables, 's', stamp)::text AS hint
              FROM (SELECT user_id, app_id, client_id, array_agg(DISTINCT table_name) AS tables,
                           to_char(max(created_at) AT TIME ZONE 'UTC',
                                   'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS stamp
                    FROM stamped_rows GROUP BY user_id, app_id, client_id) AS grouped) AS hints;
    END IF;
    RETURN NULL;
END
$$;

-- mana-sync's pushes set mana_sync.stamped for their transaction: they hold the exclusive lock from their
-- first statement, stamp their rows after the clock they read under it, advance the clock and notify in
-- the same statement as the insert. The WHEN conditions are evaluated by PostgreSQL itself, so those
-- inserts run no PL/pgSQL at all. (A direct writer that sets this setting takes over those duties.)
DROP TRIGGER IF EXISTS sync_changes_stamp ON sync_changes;
CREATE TRIGGER sync_changes_stamp BEFORE INSERT ON sync_changes
    FOR EACH ROW WHEN (current_setting('mana_sync.stamped', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION sync_changes_stamp();
DROP TRIGGER IF EXISTS sync_changes_advance_clock ON sync_changes;
CREATE TRIGGER sync_changes_advance_clock AFTER INSERT ON sync_changes
    REFERENCING NEW TABLE AS stamped_rows
    FOR EACH STATEMENT WHEN (current_setting('mana_sync.stamped', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION sync_changes_advance_clock();

-- Snapshot positions (see src/store/records.rs). Every write of a sync_records row takes the next value,
-- so a record that changes moves past every position handed out before. A snapshot cursor encodes a
-- position as microseconds after 1970-01-02, so positions must stay below 2000-01-01 minus that (about
-- 9.47e14); START is above every position older versions encoded into their cursors (a stamp at 2 µs:
-- below 5e14 until 2031), so such a cursor simply restarts the snapshot. CACHE must stay 1: cached
-- values would let one session hand out positions below another's already-committed ones, and a record
-- changed after its snapshot page could then land behind a cursor already handed out.
CREATE SEQUENCE IF NOT EXISTS sync_records_seq AS bigint START 500000000000000 CACHE 1;

-- The merged current state of every record (SPEC §6), maintained beside the log in the same transaction as
-- the push that changes it. `state` is the field-level LWW map (see src/merge.rs): per field the winning
-- value, its original `at` string, its instant and its writer. `updated_at` is the stamp of the newest log
-- row folded into the record. `seq` is the record's snapshot position, renewed at every write of the row
-- (by the statement that writes it); snapshots page through records in that order.
CREATE TABLE IF NOT EXISTS sync_records (
    user_id        TEXT NOT NULL,
    app_id         TEXT NOT NULL,
    table_name     TEXT NOT NULL,
    record_id      TEXT NOT NULL,
    state          JSONB NOT NULL,
    deleted        BOOLEAN NOT NULL DEFAULT false,
    updated_at     TIMESTAMPTZ NOT NULL,
    event_id       UUID,
    actor          JSONB,
    origin         TEXT,
    space_id       TEXT,
    schema_version INT NOT NULL DEFAULT 1,
    seq            BIGINT NOT NULL DEFAULT nextval('sync_records_seq'),
    PRIMARY KEY (user_id, app_id, table_name, record_id)
);

-- Older versions paged snapshots by updated_at and had no `seq`: add it and give every existing row a
-- distinct position, in the order those versions paged (per user and app by updated_at). The CTE is
-- materialised and numbers rows from an ordered subquery, so positions follow that order. Row-level
-- security is lifted for the rest of this transaction only, so the backfill sees every user's rows (as
-- for sync_changes above; FORCE is restored below).
ALTER TABLE sync_records ADD COLUMN IF NOT EXISTS seq BIGINT;
ALTER TABLE sync_records NO FORCE ROW LEVEL SECURITY;
WITH numbered AS MATERIALIZED (
    SELECT user_id, app_id, table_name, record_id, nextval('sync_records_seq') AS seq
    FROM (SELECT user_id, app_id, table_name, record_id FROM sync_records WHERE seq IS NULL
          ORDER BY user_id, app_id, updated_at, table_name, record_id) AS ordered
)
UPDATE sync_records r SET seq = n.seq FROM numbered n
WHERE r.user_id = n.user_id AND r.app_id = n.app_id AND r.table_name = n.table_name
  AND r.record_id = n.record_id;
ALTER TABLE sync_records ALTER COLUMN seq SET DEFAULT nextval('sync_records_seq'),
    ALTER COLUMN seq SET NOT NULL;

-- Snapshots page through an app's records by seq, optionally only some tables (table_name is the last
-- column so the filter is checked in the index). No index but the primary key starts with
-- (user_id, app_id, table_name): a push loads its records by primary key, and without statistics (a young
-- table) the planner picked a (user_id, app_id, table_name, updated_at) index and filtered a whole table's
-- records instead. (Replaces that index, (user_id, app_id, updated_at) and
-- (user_id, app_id, updated_at, table_name), which older versions created; nothing reads records by
-- updated_at any more.)
CREATE INDEX IF NOT EXISTS idx_sync_records_user_app_seq_table
    ON sync_records (user_id, app_id, seq, table_name);
DROP INDEX IF EXISTS idx_sync_records_user_app_updated_table;
DROP INDEX IF EXISTS idx_sync_records_user_app_updated;
DROP INDEX IF EXISTS idx_sync_records_user_app_table_updated;
ALTER TABLE sync_records ENABLE ROW LEVEL SECURITY;
ALTER TABLE sync_records FORCE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS sync_records_owner ON sync_records;
CREATE POLICY sync_records_owner ON sync_records
    USING (user_id = current_setting('app.current_user_id', true)
           OR user_id = ANY (coalesce(nullif(current_setting('mana_sync.users', true), ''), '{}')::text[]))
    WITH CHECK (user_id = current_setting('app.current_user_id', true)
           OR user_id = ANY (coalesce(nullif(current_setting('mana_sync.users', true), ''), '{}')::text[]));

-- Up to which stamp a user's log rows are folded into sync_records. Rows written directly into
-- sync_changes by other programs (and every row of a database today's server filled) are folded lazily,
-- under the user's exclusive lock, before the state is next read or written.
ALTER TABLE sync_user_clock ADD COLUMN IF NOT EXISTS folded_at TIMESTAMPTZ;
