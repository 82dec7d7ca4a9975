//! The clock: the time now, in the units the rest of the server counts in, and the one fixed-width UTC
//! form times are written in (cursors on the wire, `ts` in log lines). Every "now" of the server comes
//! from here.

use std::time::{SystemTime, UNIX_EPOCH};

const MICROS_PER_SECOND: i64 = 1_000_000;
const SECONDS_PER_DAY: i64 = 86_400;

/// Microseconds since the Unix epoch; a clock before 1970 reads as 0.
pub fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Seconds since the Unix epoch; a clock before 1970 reads as 0 rather
/// than panicking, which makes every token look valid-from-the-future
/// (rejected by `nbf`) instead of crashing the server.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Formats a cursor in the one fixed-width form this server emits: `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
///
/// Years outside 0001–9999 cannot be written in fixed width; they are clamped, which keeps the string
/// order intact (PostgreSQL timestamps of real rows never get there).
pub fn format_cursor(micros: i64) -> String {
    const MIN: i64 = -62_135_596_800_000_000; // 0001-01-01T00:00:00Z
    const MAX: i64 = 253_402_300_799_999_999; // 9999-12-31T23:59:59.999999Z
    let micros = micros.clamp(MIN, MAX);
    let (date, time) = split(micros);
    let (year, month, day) = civil_from_days(date);
    let fraction = time % MICROS_PER_SECOND;
    let seconds = time / MICROS_PER_SECOND;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{fraction:06}Z",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

/// Splits into (days since epoch, microseconds into that day), flooring for times before 1970.
fn split(micros: i64) -> (i64, i64) {
    let per_day = SECONDS_PER_DAY * MICROS_PER_SECOND;
    (micros.div_euclid(per_day), micros.rem_euclid(per_day))
}

/// The proleptic Gregorian date of a day since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}
