//! Timestamps and cursors.
//!
//! Two kinds of time strings cross the wire and they are treated very differently:
//!
//! * Field timestamps (`at`, `deletedAt`) are client data. They are validated as RFC 3339 so that the
//!   merge can compare them as instants, but the original string is what gets stored and echoed back,
//!   because clients compare them as strings.
//! * Cursors (`since`, `syncedUntil`) are ours. They are always emitted in one fixed-width UTC form
//!   (`2026-11-21T10:05:00.123456Z`) so that string order equals time order, which is what clients rely
//!   on when they take the lexicographic minimum of several cursors. On input we accept any RFC 3339
//!   timestamp a client may still hold (JavaScript's `toISOString()`, today's server's nanosecond form).
//!
//! Everything is microseconds since the Unix epoch (`i64`), PostgreSQL's own resolution. Finer input is
//! truncated towards the past, which can only cause a duplicate, never a gap.

use std::fmt;

use serde_json::{Map, Value};

/// The one fixed-width form this server writes times in (cursors, log lines) lives with the clock.
pub use crate::clock::format_cursor;

/// Microseconds since 1970-01-01T00:00:00Z.
pub type Micros = i64;

/// The cursor a client without any state starts from.
pub(crate) const EPOCH: Micros = 0;

/// Why a timestamp string was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeError(&'static str);

impl fmt::Display for TimeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for TimeError {}

const MICROS_PER_SECOND: i64 = 1_000_000;
const SECONDS_PER_DAY: i64 = 86_400;

/// Parses an RFC 3339 timestamp (`YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`).
///
/// Lenient where clients are known to differ: `t`/space for the `T` separator, lowercase `z`, any number
/// of fraction digits, and a space in place of `+` before the offset, because `+` in a query string that
/// was not percent-encoded arrives as a space.
pub fn parse_rfc3339(input: &str) -> Result<Micros, TimeError> {
    let b = input.as_bytes();
    if b.len() < 20 || b.len() > 64 {
        return Err(TimeError(
            "expected an RFC 3339 timestamp such as 2026-11-21T10:05:00.000Z",
        ));
    }
    let year = digits(b, 0, 4)?;
    expect(b, 4, b'-')?;
    let month = digits(b, 5, 2)?;
    expect(b, 7, b'-')?;
    let day = digits(b, 8, 2)?;
    if !matches!(b[10], b'T' | b't' | b' ') {
        return Err(TimeError("expected 'T' between date and time"));
    }
    let hour = digits(b, 11, 2)?;
    expect(b, 13, b':')?;
    let minute = digits(b, 14, 2)?;
    expect(b, 16, b':')?;
    let second = digits(b, 17, 2)?;

    if year < 1 || !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return Err(TimeError("date out of range"));
    }
    if hour > 23 || minute > 59 || second > 59 {
        return Err(TimeError("time of day out of range"));
    }

    let mut pos = 19;
    let mut fraction_micros = 0i64;
    if b[pos] == b'.' {
        pos += 1;
        let start = pos;
        while pos < b.len() && b[pos].is_ascii_digit() {
            if pos - start < 6 {
                fraction_micros = fraction_micros * 10 + i64::from(b[pos] - b'0');
            }
            pos += 1;
        }
        let count = pos - start;
        if count == 0 {
            return Err(TimeError("expected digits after '.'"));
        }
        for _ in count..6 {
            fraction_micros *= 10;
        }
    }

    let offset_seconds = match b.get(pos) {
        Some(b'Z' | b'z') if pos + 1 == b.len() => 0,
        Some(&sign @ (b'+' | b'-' | b' ')) if pos + 6 == b.len() => {
            let offset_hours = digits(b, pos + 1, 2)?;
            expect(b, pos + 3, b':')?;
            let offset_minutes = digits(b, pos + 4, 2)?;
            if offset_hours > 23 || offset_minutes > 59 {
                return Err(TimeError("UTC offset out of range"));
            }
            let magnitude = offset_hours * 3600 + offset_minutes * 60;
            if sign == b'-' {
                -magnitude
            } else {
                magnitude
            }
        }
        _ => {
            return Err(TimeError(
                "expected 'Z' or a UTC offset such as +02:00 at the end",
            ))
        }
    };

    let days = days_from_civil(year, month, day);
    let seconds = days * SECONDS_PER_DAY + hour * 3600 + minute * 60 + second - offset_seconds;
    Ok(seconds * MICROS_PER_SECOND + fraction_micros)
}

/// Formats a time the way JavaScript's `toISOString()` does (milliseconds), for server-assigned field
/// timestamps such as a missing `deletedAt`: clients compare those strings with their own.
pub fn format_millis(micros: Micros) -> String {
    let micros = micros.clamp(Micros::MIN / 2, Micros::MAX / 2);
    let cursor = format_cursor(micros - micros.rem_euclid(1000));
    format!("{}Z", &cursor[..23])
}

/// The time a change gives to those of its fields that carry no `at` of their own (SPEC §6): a delete's
/// `deletedAt`, else the record's `updatedAt`, else its `createdAt`, each only if it parses. `None` when
/// the change carries no time at all: then the server assigns one ([`assigned`]).
///
/// The merge orders fields by this rule and the emitted rows are dated by it, so both agree.
pub(crate) fn change_time<'a>(
    deleted_at: Option<&'a str>,
    values: &'a Map<String, Value>,
) -> Option<(Micros, &'a str)> {
    let parsed = |text: Option<&'a str>| {
        let text = text?;
        parse_rfc3339(text).ok().map(|micros| (micros, text))
    };
    parsed(deleted_at)
        .or_else(|| parsed(values.get("updatedAt").and_then(Value::as_str)))
        .or_else(|| parsed(values.get("createdAt").and_then(Value::as_str)))
}

/// A time the server assigns (SPEC §6): `micros` rounded down to the whole second, with its string in
/// `toISOString()` form (`2026-11-29T12:36:59.000Z`). Clients send times truncated to the second, so a
/// sub-second time the server invented would beat an edit made in the same second.
pub(crate) fn assigned(micros: Micros) -> (Micros, String) {
    let second = micros.clamp(Micros::MIN / 2, Micros::MAX / 2);
    let second = second - second.rem_euclid(MICROS_PER_SECOND);
    (second, format_millis(second))
}

fn digits(b: &[u8], at: usize, count: usize) -> Result<i64, TimeError> {
    let slice = b
        .get(at..at + count)
        .ok_or(TimeError("timestamp is truncated"))?;
    let mut value = 0i64;
    for &c in slice {
        if !c.is_ascii_digit() {
            return Err(TimeError("expected a digit"));
        }
        value = value * 10 + i64::from(c - b'0');
    }
    Ok(value)
}

fn expect(b: &[u8], at: usize, want: u8) -> Result<(), TimeError> {
    match b.get(at) {
        Some(&c) if c == want => Ok(()),
        _ => Err(TimeError("malformed timestamp")),
    }
}

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::Rng;

    #[test]
    fn assigned_times_are_whole_seconds_in_to_iso_string_form() {
        let cases = [
            ("2026-11-29T12:36:59.999999Z", "2026-11-29T12:36:59.000Z"),
            ("2026-11-29T12:36:59.000000Z", "2026-11-29T12:36:59.000Z"),
            ("1969-12-31T23:59:59.500000Z", "1969-12-31T23:59:59.000Z"),
        ];
        for (received, want) in cases {
            let (micros, text) = assigned(parse_rfc3339(received).unwrap());
            assert_eq!(text, want, "{received}");
            assert_eq!(
                parse_rfc3339(&text),
                Ok(micros),
                "the string names the instant"
            );
        }
    }

    #[test]
    fn parses_the_forms_clients_hold() {
        let cases = [
            ("1970-01-01T00:00:00.000Z", 0),
            ("1970-01-01T00:00:00Z", 0),
            ("1970-01-01T00:00:00.000001Z", 1),
            ("2026-11-21T10:05:00.123456Z", 1_795_255_500_123_456),
            ("2026-11-21T10:05:00.123456789Z", 1_795_255_500_123_456),
            ("2026-11-21T12:05:00.123+02:00", 1_795_255_500_123_000),
            ("2026-11-21T12:05:00.123 02:00", 1_795_255_500_123_000),
            ("2026-11-21T08:05:00.123-02:00", 1_795_255_500_123_000),
            ("2026-11-21t10:05:00.1z", 1_795_255_500_100_000),
            ("2026-11-21 10:05:00Z", 1_795_255_500_000_000),
            ("1969-12-31T23:59:59.999999Z", -1),
            ("2024-02-29T00:00:00Z", 1_709_164_800_000_000),
        ];
        for (input, want) in cases {
            assert_eq!(parse_rfc3339(input), Ok(want), "{input}");
        }
    }

    #[test]
    fn rejects_what_is_not_a_timestamp() {
        for input in [
            "",
            "now",
            "2026-11-21",
            "2026-11-21T10:05:00",
            "2026-11-21T10:05:00.Z",
            "2026-13-01T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "2026-11-31T00:00:00Z",
            "2026-11-21T24:00:00Z",
            "2026-11-21T10:60:00Z",
            "2026-11-21T10:05:60Z",
            "2026-11-21T10:05:00+2:00",
            "2026-11-21T10:05:00+02:00x",
            "2026-11-21T10:05:00ZZ",
            "0000-01-01T00:00:00Z",
            "２０２６-11-21T10:05:00Z",
            "2026-11-21T10:05:00.123456789012345678901234567890123456789012345Z",
        ] {
            assert!(
                parse_rfc3339(input).is_err(),
                "{input:?} should be rejected"
            );
        }
    }

    #[test]
    fn cursor_is_fixed_width_utc() {
        assert_eq!(format_cursor(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            format_cursor(1_795_255_500_123_456),
            "2026-11-21T10:05:00.123456Z"
        );
        assert_eq!(format_cursor(-1), "1969-12-31T23:59:59.999999Z");
        assert_eq!(format_cursor(i64::MAX), "9999-12-31T23:59:59.999999Z");
        assert_eq!(format_cursor(i64::MIN), "0001-01-01T00:00:00.000000Z");
        assert_eq!(
            format_millis(1_795_255_500_123_456),
            "2026-11-21T10:05:00.123Z"
        );
        assert_eq!(format_millis(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(format_millis(i64::MIN), "0001-01-01T00:00:00.000Z");
        assert_eq!(format_millis(i64::MAX), "9999-12-31T23:59:59.999Z");
    }

    #[test]
    fn property_format_then_parse_round_trips_and_preserves_order() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let range = 253_402_300_799_999_999i64 + 62_135_596_800_000_000;
        let mut previous: Option<(i64, String)> = None;
        for _ in 0..20_000 {
            let micros = rng.below(range as u64) as i64 - 62_135_596_800_000_000;
            let text = format_cursor(micros);
            assert_eq!(text.len(), 27);
            assert_eq!(parse_rfc3339(&text), Ok(micros), "{text}");
            if let Some((earlier, earlier_text)) = &previous {
                assert_eq!(
                    earlier.cmp(&micros),
                    earlier_text.as_str().cmp(text.as_str())
                );
            }
            previous = Some((micros, text));
        }
    }

    #[test]
    fn property_never_panics_on_arbitrary_bytes() {
        let mut rng = Rng(42);
        let alphabet = b"0123456789-:.TZz+ tx\xff";
        for _ in 0..50_000 {
            let len = rng.index(40);
            let bytes: Vec<u8> = (0..len).map(|_| rng.pick(alphabet)).collect();
            let text = String::from_utf8_lossy(&bytes);
            let _ = parse_rfc3339(&text);
        }
    }
}
