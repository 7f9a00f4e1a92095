//! The JSON algebra of shadows: merge with metadata, delta, measures.
//!
//! Metadata mirrors the state: an object for an object, an array of element
//! metadata for an array, and `{"timestamp": t}` for any other value.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write as _;

use serde_json::{Map, Value};

/// A JSON object: the state sections and their metadata.
pub type Object = Map<String, Value>;

/// `{"timestamp": now}`.
pub(crate) fn stamp(now: u64) -> Value {
    let mut m = Map::new();
    m.insert(String::from("timestamp"), Value::from(now));
    Value::Object(m)
}

/// The metadata of a value written whole at `now`.
pub(crate) fn value_metadata(v: &Value, now: u64) -> Value {
    match v {
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| (k.clone(), value_metadata(v, now)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(|v| value_metadata(v, now)).collect()),
        _ => stamp(now),
    }
}

/// Merges an update's `patch` into `target`, keeping `meta` in step:
/// `null` deletes, objects merge recursively, anything else (arrays too)
/// replaces. Objects left empty are removed, so a state never holds `{}`.
pub(crate) fn merge(target: &mut Object, meta: &mut Object, patch: &Object, now: u64) {
    for (key, value) in patch {
        match value {
            Value::Null => {
                target.remove(key);
                meta.remove(key);
            }
            Value::Object(sub_patch) => {
                // Decided by the state alone, so a caller without metadata
                // (the device's replica) can pass a scratch map.
                if !matches!(target.get(key), Some(Value::Object(_))) {
                    // Absent, or a value of another kind: start afresh.
                    target.insert(key.clone(), Value::Object(Map::new()));
                    meta.insert(key.clone(), Value::Object(Map::new()));
                } else if !matches!(meta.get(key), Some(Value::Object(_))) {
                    meta.insert(key.clone(), Value::Object(Map::new()));
                }
                let (Some(Value::Object(sub_target)), Some(Value::Object(sub_meta))) =
                    (target.get_mut(key), meta.get_mut(key))
                else {
                    continue; // both were made objects just above
                };
                merge(sub_target, sub_meta, sub_patch, now);
                if sub_target.is_empty() {
                    target.remove(key);
                    meta.remove(key);
                }
            }
            other => {
                target.insert(key.clone(), other.clone());
                meta.insert(key.clone(), value_metadata(other, now));
            }
        }
    }
}

/// The metadata an `/update/accepted` reply carries for `patch`: a
/// timestamp for every leaf the update wrote or deleted.
pub(crate) fn patch_metadata(patch: &Object, now: u64) -> Object {
    patch
        .iter()
        .map(|(k, v)| {
            let m = match v {
                Value::Object(o) => Value::Object(patch_metadata(o, now)),
                Value::Null => stamp(now),
                other => value_metadata(other, now),
            };
            (k.clone(), m)
        })
        .collect()
}

/// Every key of `desired` whose value is absent from, or different to,
/// `reported`, with the full path to a differing nested leaf; arrays compare
/// as whole values. Returns the delta and its metadata (taken from the
/// desired metadata).
pub(crate) fn delta(
    desired: &Object,
    desired_meta: &Object,
    reported: &Object,
) -> (Object, Object) {
    let mut state = Map::new();
    let mut meta = Map::new();
    for (key, want) in desired {
        let key_meta = desired_meta.get(key);
        match (want, reported.get(key)) {
            (Value::Object(w), Some(Value::Object(have))) => {
                let empty = Map::new();
                let sub_meta = match key_meta {
                    Some(Value::Object(m)) => m,
                    _ => &empty,
                };
                let (s, m) = delta(w, sub_meta, have);
                if !s.is_empty() {
                    state.insert(key.clone(), Value::Object(s));
                    meta.insert(key.clone(), Value::Object(m));
                }
            }
            (w, Some(have)) if w == have => {}
            (w, _) => {
                state.insert(key.clone(), w.clone());
                if let Some(m) = key_meta {
                    meta.insert(key.clone(), m.clone());
                }
            }
        }
    }
    (state, meta)
}

/// How deeply `v` nests objects and arrays (a scalar is 0, `{"a": 1}` is 1).
/// Stops counting at `limit + 1`.
pub(crate) fn depth(v: &Value, limit: usize) -> usize {
    if limit == 0 {
        return usize::from(v.is_object() || v.is_array());
    }
    match v {
        Value::Object(o) => 1 + o.values().map(|v| depth(v, limit - 1)).max().unwrap_or(0),
        Value::Array(a) => 1 + a.iter().map(|v| depth(v, limit - 1)).max().unwrap_or(0),
        _ => 0,
    }
}

/// Whether an array anywhere in `v` contains `null`.
pub(crate) fn has_null_in_array(v: &Value) -> bool {
    match v {
        Value::Object(o) => o.values().any(has_null_in_array),
        Value::Array(a) => a.iter().any(|e| e.is_null() || has_null_in_array(e)),
        _ => false,
    }
}

/// The length of `v` as compact JSON, without serializing it.
pub(crate) fn json_len(v: &Value) -> usize {
    match v {
        Value::Null => 4,
        Value::Bool(b) => {
            if *b {
                4
            } else {
                5
            }
        }
        Value::Number(n) => {
            let mut counter = Counter(0);
            let _ = write!(counter, "{n}");
            counter.0
        }
        Value::String(s) => string_len(s),
        Value::Array(a) => 2 + a.iter().map(json_len).sum::<usize>() + a.len().saturating_sub(1),
        Value::Object(o) => object_len(o),
    }
}

/// [`json_len`] of an object.
pub(crate) fn object_len(o: &Object) -> usize {
    2 + o
        .iter()
        .map(|(k, v)| string_len(k) + 1 + json_len(v))
        .sum::<usize>()
        + o.len().saturating_sub(1)
}

fn string_len(s: &str) -> usize {
    2 + s
        .chars()
        .map(|c| match c {
            '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
            c if (c as u32) < 0x20 => 6,
            c => c.len_utf8(),
        })
        .sum::<usize>()
}

struct Counter(usize);

impl core::fmt::Write for Counter {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.0 += s.len();
        Ok(())
    }
}

/// Serializes a value that holds only JSON-safe data (no map with non-string
/// keys, no custom `Serialize` that fails): serde_json cannot fail on it.
pub(crate) fn to_vec<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn obj(v: Value) -> Object {
        match v {
            Value::Object(o) => o,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn json_len_matches_serde_json() {
        let samples = [
            json!({}),
            json!({"a": [1, 2.5, -3, true, false, null], "b": {"c": "x\"y\\z\n\u{1}é😀"}}),
            json!([[], {}, "", 1e300, u64::MAX, i64::MIN]),
        ];
        for v in samples {
            assert_eq!(json_len(&v), serde_json::to_vec(&v).unwrap().len(), "{v}");
        }
    }

    #[test]
    fn metadata_mirrors_arrays_and_objects() {
        let v = json!({"a": [1, {"b": 2}], "c": "x"});
        assert_eq!(
            value_metadata(&v, 7),
            json!({"a": [{"timestamp": 7}, {"b": {"timestamp": 7}}], "c": {"timestamp": 7}})
        );
    }

    #[test]
    fn depth_counts_levels() {
        assert_eq!(depth(&json!(1), 6), 0);
        assert_eq!(depth(&json!({"a": 1}), 6), 1);
        assert_eq!(depth(&json!({"a": {"b": [1]}}), 6), 3);
        let deep = json!({"1":{"2":{"3":{"4":{"5":{"6":{"7":{"8":1}}}}}}}});
        assert_eq!(depth(&deep, 6), 7);
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            "\\PC{0,8}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map("[a-c]{1,2}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn json_len_is_exact(v in arb_json()) {
            prop_assert_eq!(json_len(&v), serde_json::to_vec(&v).unwrap().len());
        }

        #[test]
        fn merge_then_delta_against_self_is_empty(v in arb_json()) {
            if let Value::Object(patch) = v {
                let (mut t, mut m) = (Map::new(), Map::new());
                merge(&mut t, &mut m, &patch, 1);
                prop_assert!(delta(&t, &m, &t).0.is_empty());
                // Metadata has exactly the keys of the state.
                prop_assert_eq!(t.keys().collect::<Vec<_>>(), m.keys().collect::<Vec<_>>());
                prop_assert!(!t.values().any(|v| v.as_object().is_some_and(|o| o.is_empty())));
            }
        }
    }

    #[test]
    fn merge_prunes_objects_left_empty() {
        let (mut t, mut m) = (Map::new(), Map::new());
        merge(&mut t, &mut m, &obj(json!({"a": {"b": 1}, "c": 2})), 1);
        merge(&mut t, &mut m, &obj(json!({"a": {"b": null}})), 2);
        assert_eq!(Value::Object(t), json!({"c": 2}));
        assert_eq!(Value::Object(m), json!({"c": {"timestamp": 1}}));
    }
}
