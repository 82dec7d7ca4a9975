use super::*;

#[test]
fn read_modes_and_snapshot_cursors() {
    assert_eq!(read_mode(0, None), ReadMode::Snapshot(0));
    assert_eq!(read_mode(-5, None), ReadMode::Snapshot(0));
    let now = 1_795_255_500_123_456;
    assert_eq!(read_mode(now, None), ReadMode::Log(now));
    assert_eq!(
        read_mode(now, Some(now + 1)),
        ReadMode::Snapshot(0),
        "behind the horizon"
    );
    assert_eq!(read_mode(SNAPSHOT_CEIL, None), ReadMode::Log(SNAPSHOT_CEIL));
    // A snapshot cursor continues right after the position it was made from.
    for position in [SEQ_START, SEQ_START + 1, SEQ_START + 12_345, SEQ_MAX] {
        let cursor = snapshot_cursor(position).unwrap();
        assert!((SNAPSHOT_FLOOR..SNAPSHOT_CEIL).contains(&cursor));
        assert_eq!(
            read_mode(cursor, Some(now * 2)),
            ReadMode::Snapshot(position)
        );
        assert_eq!(read_mode(cursor, None), ReadMode::Snapshot(position));
    }
    // Positions past the range get no cursor (the page is refused, never answered with a log cursor).
    assert_eq!(snapshot_cursor(SEQ_MAX + 1), None);
    assert_eq!(snapshot_cursor(-1), None);
}

#[test]
fn snapshot_cursors_keep_string_order_inside_the_range() {
    let epoch = "1970-01-01T00:00:00.000Z";
    let mut previous = time::format_cursor(snapshot_cursor(SEQ_START).unwrap());
    assert!(previous.as_str() > epoch);
    for position in [
        SEQ_START + 1,
        SEQ_START + 9,
        SEQ_START + 10,
        SEQ_START + 999_999,
        SEQ_START + 1_000_000,
        SEQ_START + 86_400_000_000,
        SEQ_MAX,
    ] {
        let cursor = time::format_cursor(snapshot_cursor(position).unwrap());
        assert_eq!(cursor.len(), previous.len(), "fixed width: {cursor}");
        assert!(previous < cursor, "{previous} < {cursor}");
        assert!(
            cursor.as_str() > "1970-01-02" && cursor.as_str() < "2000",
            "{cursor}"
        );
        let parsed = time::parse_rfc3339(&cursor).unwrap();
        assert_eq!(read_mode(parsed, None), ReadMode::Snapshot(position));
        previous = cursor;
    }
}

#[test]
fn old_cursors_restart_the_snapshot_and_positions_last() {
    // Older versions encoded a stamp at 2 µs: cursor = FLOOR + (stamp - CEIL) / 2. Even a stamp from
    // 2031 (after which their cursors could no longer be told apart) decodes below the first position.
    let old_cursor = |stamp: Micros| SNAPSHOT_FLOOR + (stamp - SNAPSHOT_CEIL) / 2;
    for stamp in [
        1_795_255_500_123_456, // 2026-11-21
        1_900_000_000_000_000, // 2030-03-17
        1_946_684_799_999_999, // 2031-09-09
    ] {
        let cursor = old_cursor(stamp);
        assert!((SNAPSHOT_FLOOR..SNAPSHOT_CEIL).contains(&cursor));
        let ReadMode::Snapshot(from) = read_mode(cursor, None) else {
            panic!("an old snapshot cursor stays a snapshot cursor")
        };
        assert!(from < SEQ_START, "{stamp}: starts again from {from}");
    }
    // Room after the sequence's start: a century of 100,000 record writes per second fits.
    const CENTURY: i64 = 100 * 365 * 86_400 * 100_000;
    const { assert!(SEQ_MAX - SEQ_START > CENTURY) };
    const { assert!(SEQ_MAX - SEQ_START > 440_000_000_000_000) };
    assert!(snapshot_cursor(SEQ_START + CENTURY).unwrap() < SNAPSHOT_CEIL);
}

#[test]
fn the_schema_starts_the_sequence_where_the_code_expects() {
    let schema = super::super::SCHEMA_SQL;
    assert!(
        schema.contains(&format!("START {SEQ_START}")),
        "schema.sql's sync_records_seq must START at SEQ_START"
    );
}
