//! Property tests: random changes, states and orders, from a deterministic generator.

use super::*;
use crate::test_rng::Rng;

const RECORDS: usize = 3;
const FIELDS: [&str; 4] = ["title", "done", "updatedAt", "deletedAt"];
const CLIENTS: [&str; 3] = ["alice", "bob", "carol"];
/// Few instants, several spellings of each, and strings that do not parse, to force ties.
const TIMES: [&str; 9] = [
    "2026-11-21T10:05:00Z",
    "2026-11-21T10:05:00.000Z",
    "2026-11-21T12:05:00+02:00",
    "2026-11-21T10:05:00.001Z",
    "2026-11-21T10:04:59.999Z",
    "2026-11-21T09:04:59.999-01:00",
    "2026-11-21T10:06:00Z",
    "not a time",
    "2026-11-21T10:05",
];
/// Receipts whose assigned second equals client times above, to force client-against-assigned ties.
const RECEIVED_TIMES: [&str; 4] = [
    "2026-11-21T10:05:00.000Z",
    "2026-11-21T10:05:00.731Z",
    "2026-11-21T10:06:00.999Z",
    "2026-11-21T10:07:00.000Z",
];

fn random_value(rng: &mut Rng, field: &str) -> Value {
    if field == DELETED_AT || field == UPDATED_AT {
        return match rng.index(3) {
            0 => Value::Null,
            _ => json!(rng.pick(&TIMES)),
        };
    }
    let texts = [
        "null",
        "true",
        "false",
        "1",
        "1.0",
        "1e0",
        "\"x\"",
        "\"y\"",
        r#"{"a":1,"b":[2]}"#,
        r#"{"b":[2],"a":1}"#,
        "[]",
    ];
    serde_json::from_str(rng.pick(&texts)).unwrap()
}

fn random_change(rng: &mut Rng) -> (usize, Change) {
    let record = rng.index(RECORDS);
    let kind = rng.pick(&[
        ChangeKind::Insert,
        ChangeKind::Update,
        ChangeKind::Update,
        ChangeKind::Delete,
    ]);
    let mut values = Map::new();
    let mut times = Map::new();
    for field in FIELDS {
        let wanted = match kind {
            ChangeKind::Insert => rng.chance(70),
            ChangeKind::Update => rng.chance(40),
            ChangeKind::Delete => rng.chance(15),
        };
        if wanted {
            values.insert(field.to_owned(), random_value(rng, field));
            if kind != ChangeKind::Insert && rng.chance(80) {
                times.insert(field.to_owned(), json!(rng.pick(&TIMES)));
            }
        }
    }
    let received = rng.pick(&RECEIVED_TIMES);
    let mut change = Change::new(
        kind,
        rng.pick(&CLIENTS),
        Value::Object(values),
        Value::Object(times),
    )
    .received(received);
    if kind == ChangeKind::Delete && rng.chance(90) {
        change.deleted_at = Some(rng.pick(&TIMES).to_string());
    }
    (record, change)
}

fn random_changes(rng: &mut Rng, max: usize) -> Vec<(usize, Change)> {
    let count = rng.index(max + 1);
    (0..count).map(|_| random_change(rng)).collect()
}

fn apply_all(changes: &[(usize, Change)]) -> Vec<RecordState> {
    let mut states = vec![RecordState::default(); RECORDS];
    for (record, change) in changes {
        apply_change(&mut states[*record], change);
    }
    states
}

fn random_state(rng: &mut Rng) -> RecordState {
    let mut state = RecordState::default();
    for _ in 0..rng.index(5) {
        state.merge(&versions_of(&random_change(rng).1.view()));
    }
    state
}

fn merged(a: &RecordState, b: &RecordState) -> RecordState {
    let mut out = a.clone();
    out.merge(b);
    out
}

const PERMUTATION_CASES: usize = 500;
const PERMUTATIONS_PER_CASE: usize = 20;
const MERGE_CASES: usize = 5_000;

#[test]
fn property_every_order_of_the_same_changes_converges() {
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    for case in 0..PERMUTATION_CASES {
        let mut changes = random_changes(&mut rng, 12);
        let expected = apply_all(&changes);
        for _ in 0..PERMUTATIONS_PER_CASE {
            rng.shuffle(&mut changes);
            // Replays are harmless too: repeat a random prefix at the end.
            let mut replayed = changes.clone();
            let repeat = rng.index(changes.len() + 1);
            replayed.extend_from_slice(&changes[..repeat]);
            assert_eq!(apply_all(&replayed), expected, "case {case}: {changes:#?}");
        }
    }
}

#[test]
fn property_merge_is_a_join() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for case in 0..MERGE_CASES {
        let (a, b, c) = (
            random_state(&mut rng),
            random_state(&mut rng),
            random_state(&mut rng),
        );
        assert_eq!(merged(&a, &b), merged(&b, &a), "commutative, case {case}");
        assert_eq!(
            merged(&merged(&a, &b), &c),
            merged(&a, &merged(&b, &c)),
            "associative, case {case}"
        );
        assert_eq!(merged(&a, &a), a, "idempotent, case {case}");
        // The join is an upper bound that contains nothing new.
        let ab = merged(&a, &b);
        assert_eq!(merged(&ab, &a), ab);
        for (name, version) in &ab.fields {
            assert!(a.fields.get(name) == Some(version) || b.fields.get(name) == Some(version));
        }
    }
}

#[test]
fn property_beats_is_a_strict_total_order() {
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    let mut pool: Vec<FieldVersion> = Vec::new();
    while pool.len() < 60 {
        pool.extend(
            versions_of(&random_change(&mut rng).1.view())
                .fields
                .into_values(),
        );
    }
    for a in &pool {
        assert!(!a.beats(a));
        for b in &pool {
            let identical = a == b;
            assert_eq!(
                u8::from(a.beats(b)) + u8::from(b.beats(a)) + u8::from(identical),
                1,
                "{a:?} {b:?}"
            );
            for c in &pool {
                if a.beats(b) && b.beats(c) {
                    assert!(a.beats(c), "transitive");
                }
            }
        }
    }
}

#[test]
fn property_apply_equals_merging_versions_and_reports_consistently() {
    let mut rng = Rng(0xBF58_476D_1CE4_E5B9);
    for case in 0..MERGE_CASES {
        let changes = random_changes(&mut rng, 8);
        let mut applied = RecordState::default();
        let mut joined = RecordState::default();
        for (_, change) in &changes {
            let before = applied.clone();
            let incoming = versions_of(&change.view());
            let (won, conflicts) = apply_change(&mut applied, change);
            joined.merge(&incoming);
            assert_eq!(applied, joined, "case {case}");

            for (name, theirs) in &incoming.fields {
                let is_winner = won.contains(name);
                let conflict = conflicts.iter().find(|c| &c.field == name);
                match before.fields.get(name) {
                    None => assert!(is_winner),
                    Some(ours) if theirs.beats(ours) => assert!(is_winner),
                    Some(ours) if ours == theirs => assert!(!is_winner && conflict.is_none()),
                    Some(ours) => {
                        assert!(!is_winner);
                        let conflict = conflict.expect("a loss is a conflict");
                        assert_eq!(
                            conflict,
                            &FieldConflict {
                                field: name.clone(),
                                client_value: theirs.value.clone(),
                                client_at: theirs.at.clone(),
                                server_value: ours.value.clone(),
                                server_at: ours.at.clone(),
                            }
                        );
                    }
                }
                assert_eq!(
                    applied.fields.get(name).is_some_and(|v| v == theirs),
                    is_winner || before.fields.get(name) == Some(theirs)
                );
            }
            assert!(won.len() + conflicts.len() <= incoming.fields.len());

            // Replaying the same change at once changes nothing and wins nothing; what lost still loses.
            let after = applied.clone();
            let again = apply_change(&mut applied, change);
            assert_eq!(again, (vec![], conflicts), "case {case}");
            assert_eq!(applied, after);
        }
    }
}

#[test]
fn property_field_map_merges_like_a_b_tree() {
    use std::collections::BTreeMap;
    let mut rng = Rng(0x5851_F42D_4C95_7F2D);
    for case in 0..MERGE_CASES {
        let (a, b) = (random_state(&mut rng), random_state(&mut rng));
        let mut reference: BTreeMap<String, FieldVersion> = a
            .fields
            .iter()
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        for (name, theirs) in &b.fields {
            let entry = reference
                .entry(name.clone())
                .or_insert_with(|| theirs.clone());
            if theirs.beats(entry) {
                *entry = theirs.clone();
            }
        }
        let joined = merged(&a, &b);
        assert!(joined.fields.keys().is_sorted(), "case {case}");
        let as_tree: BTreeMap<String, FieldVersion> = joined.fields.into_iter().collect();
        assert_eq!(as_tree, reference, "case {case}");
    }
}

#[test]
fn records_with_many_fields_merge_in_one_pass() {
    // Interleaved names: a per-field insert into a sorted vector would be quadratic here.
    let many = |parity: usize, client: &str| {
        let values: Map<String, Value> = (0..100_000)
            .filter(|i| i % 2 == parity)
            .map(|i| (format!("f{i:06}"), json!(i)))
            .collect();
        Change::new(ChangeKind::Update, client, Value::Object(values), json!({}))
    };
    let mut state = state_of(&[many(0, "a")]);
    let (won, conflicts) = apply_change(&mut state, &many(1, "b"));
    assert_eq!((won.len(), conflicts.len()), (50_000, 0));
    assert_eq!(state.fields.len(), 100_000);
    assert!(state.fields.keys().is_sorted());
    let mut joined = state_of(&[many(1, "c")]);
    joined.merge(&state);
    assert_eq!(joined.fields.len(), 100_000);
}

#[test]
fn property_storage_round_trip() {
    let mut rng = Rng(0x94D0_49BB_1331_11EB);
    for case in 0..MERGE_CASES {
        let state = random_state(&mut rng);
        let stored = state.to_json();
        assert_eq!(
            RecordState::from_json(&stored).as_ref(),
            Some(&state),
            "case {case}"
        );
        let text = serde_json::to_string(&stored).unwrap();
        let reread: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(RecordState::from_json(&reread), Some(state), "case {case}");
    }
}

#[test]
fn property_stored_at_always_parses_to_stored_instant_when_valid() {
    let mut rng = Rng(0x1234_5678_9ABC_DEF1);
    for _ in 0..MERGE_CASES {
        for version in random_state(&mut rng).fields.values() {
            // Every `at` is either a client time that parsed or a fallback time that did.
            assert_eq!(
                time::parse_rfc3339(&version.at),
                Ok(version.at_micros),
                "{version:?}"
            );
        }
    }
}
