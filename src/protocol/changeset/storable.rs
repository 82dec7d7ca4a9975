//! What PostgreSQL cannot store: U+0000 in JSONB and TEXT, and numbers beyond `numeric`'s range. A change
//! holding either is refused while the push is validated, naming the change, instead of failing inside
//! the transaction.

use serde_json::{Map, Value};

use super::{ChangeError, FieldEntry};
use crate::protocol::ErrorCode;

/// PostgreSQL's JSONB and TEXT cannot hold U+0000; reject it here rather than fail inside the transaction.
/// Nor can it hold every number JSON can write: reject those here too, naming the change.
pub(super) fn check_storable(
    data: Option<&Map<String, Value>>,
    actor: Option<&Value>,
    fields: Option<&[FieldEntry]>,
    space_id: Option<&str>,
    origin: Option<&str>,
) -> Result<(), ChangeError> {
    let fields = fields.unwrap_or_default();
    let nul_in = [
        ("data", data.is_some_and(map_has_nul)),
        ("actor", actor.is_some_and(value_has_nul)),
        (
            "fields",
            fields
                .iter()
                .any(|f| f.name.contains('\0') || value_has_nul(&f.value)),
        ),
        ("spaceId", space_id.is_some_and(|t| t.contains('\0'))),
        ("origin", origin.is_some_and(|t| t.contains('\0'))),
    ];
    if let Some((name, _)) = nul_in.iter().find(|(_, found)| *found) {
        return Err(format!("{name} contains the character U+0000, which cannot be stored").into());
    }
    let unstorable = [
        ("data", data.and_then(map_unstorable_number)),
        ("actor", actor.and_then(unstorable_number)),
        (
            "fields",
            fields.iter().find_map(|f| unstorable_number(&f.value)),
        ),
    ];
    if let Some((name, Some(number))) = unstorable.iter().find(|(_, found)| found.is_some()) {
        let shown: String = number.chars().take(40).collect();
        let more = if number.len() > 40 { "…" } else { "" };
        return Err(ChangeError(
            ErrorCode::InvalidNumber,
            format!("{name} holds the number {shown}{more}, which PostgreSQL cannot store"),
        ));
    }
    Ok(())
}

fn value_has_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(value_has_nul),
        Value::Object(map) => map_has_nul(map),
        _ => false,
    }
}

/// The first number in `value` that PostgreSQL's `numeric` (the number type of `jsonb`) refuses.
fn unstorable_number(value: &Value) -> Option<&str> {
    match value {
        Value::Number(number) => {
            let text = number.as_str();
            (!storable_number(text)).then_some(text)
        }
        Value::Array(items) => items.iter().find_map(unstorable_number),
        Value::Object(map) => map_unstorable_number(map),
        _ => None,
    }
}

fn map_unstorable_number(map: &Map<String, Value>) -> Option<&str> {
    map.values().find_map(unstorable_number)
}

/// PostgreSQL's `numeric` input (`set_var_from_str`): an exponent of at most ±1000, at most 131,072
/// digits before the decimal point and 16,383 after it, once the exponent is applied.
pub(crate) fn storable_number(text: &str) -> bool {
    const MAX_EXPONENT: i64 = 1000;
    const MAX_BEFORE_POINT: i64 = 131_072;
    const MAX_AFTER_POINT: i64 = 16_383;
    let unsigned = text.strip_prefix('-').unwrap_or(text);
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(at) => (&unsigned[..at], &unsigned[at + 1..]),
        None => (unsigned, "0"),
    };
    let exponent: i64 = match exponent.strip_prefix('+').unwrap_or(exponent).parse() {
        Ok(exponent) if (-MAX_EXPONENT..=MAX_EXPONENT).contains(&exponent) => exponent,
        _ => return false,
    };
    let (integer, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let integer = integer.trim_start_matches('0');
    // Leading zeros of the fraction do not count before the point; trailing ones do count after it.
    let before = if integer.is_empty() {
        let significant = fraction.trim_start_matches('0');
        if significant.is_empty() {
            0 // zero
        } else {
            exponent - (fraction.len() - significant.len()) as i64
        }
    } else {
        integer.len() as i64 + exponent
    };
    let after = fraction.len() as i64 - exponent;
    before <= MAX_BEFORE_POINT && after <= MAX_AFTER_POINT
}

fn map_has_nul(map: &Map<String, Value>) -> bool {
    map.iter()
        .any(|(k, v)| k.contains('\0') || value_has_nul(v))
}
