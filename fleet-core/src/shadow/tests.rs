//! The shadow rules, one test per rule; property tests of the algebra; and a
//! deterministic simulation of `ShadowSync` against the service rules.

use std::string::{String, ToString};
use std::vec::Vec;

use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use crate::topic::{Role, ShadowOp, ShadowTopicKind};

const NOW: u64 = 1_700_000_000;

fn limits() -> ShadowLimits {
    ShadowLimits::default()
}

fn parse(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).expect("service output is JSON")
}

/// Applies `request` (which must be accepted) and returns the result.
fn up(shadow: &Shadow, request: Value) -> Updated {
    shadow
        .update(request.to_string().as_bytes(), NOW, &limits())
        .unwrap_or_else(|r| panic!("rejected: {r:?}"))
}

fn rejected(shadow: &Shadow, request: &[u8]) -> Rejection {
    let before = shadow.to_stored_json();
    let r = shadow.update(request, NOW, &limits()).unwrap_err();
    assert_eq!(shadow.to_stored_json(), before);
    r
}

fn state_of(shadow: &Shadow) -> Value {
    let doc = parse(&shadow.get(b"", NOW, &limits()).unwrap());
    doc["state"].clone()
}

#[test]
fn first_update_creates_the_shadow_at_version_1() {
    let u = up(
        &Shadow::new(),
        json!({"state": {"desired": {"color": "red"}}, "clientToken": "t1"}),
    );
    assert!(u.shadow.exists());
    assert_eq!(u.shadow.version(), 1);
    let accepted = parse(&u.accepted);
    assert_eq!(
        accepted,
        json!({
            "state": {"desired": {"color": "red"}},
            "metadata": {"desired": {"color": {"timestamp": NOW}}},
            "version": 1,
            "timestamp": NOW,
            "clientToken": "t1",
        })
    );
    let docs = parse(&u.documents);
    assert_eq!(docs["previous"], Value::Null);
    assert_eq!(
        docs["current"]["state"],
        json!({"desired": {"color": "red"}})
    );
    assert_eq!(docs["current"]["version"], 1);
    assert_eq!(docs["clientToken"], "t1");
}

#[test]
fn update_merges_recursively_and_null_deletes() {
    let s = up(
        &Shadow::new(),
        json!({"state": {"reported": {"led": {"color": "red", "on": true}, "fw": "1.0"}}}),
    )
    .shadow;
    let s = up(
        &s,
        json!({"state": {"reported": {"led": {"on": false, "color": null}}}}),
    )
    .shadow;
    assert_eq!(
        state_of(&s),
        json!({"reported": {"led": {"on": false}, "fw": "1.0"}})
    );
    let meta = parse(&s.get(b"{}", NOW, &limits()).unwrap())["metadata"].clone();
    assert_eq!(
        meta,
        json!({"reported": {"led": {"on": {"timestamp": NOW}}, "fw": {"timestamp": NOW}}})
    );
}

#[test]
fn null_section_removes_it_and_null_state_clears_all() {
    let s = up(
        &Shadow::new(),
        json!({"state": {"desired": {"a": 1}, "reported": {"a": 2}}}),
    )
    .shadow;
    let s = up(&s, json!({"state": {"desired": null}})).shadow;
    assert_eq!(state_of(&s), json!({"reported": {"a": 2}}));
    let s = up(&s, json!({"state": {"desired": {"b": 1}}})).shadow;
    let s = up(&s, json!({"state": null})).shadow;
    assert!(s.exists(), "{{\"state\": null}} keeps the shadow");
    assert_eq!(s.version(), 4);
    assert_eq!(state_of(&s), json!({}));
}

#[test]
fn arrays_are_replaced_whole_and_may_not_hold_null() {
    let s = up(
        &Shadow::new(),
        json!({"state": {"desired": {"c": ["r", "g", "b"]}}}),
    )
    .shadow;
    let s = up(&s, json!({"state": {"desired": {"c": ["r"]}}})).shadow;
    assert_eq!(state_of(&s)["desired"]["c"], json!(["r"]));
    let r = rejected(
        &s,
        br#"{"state":{"desired":{"c":["r",null]}},"clientToken":"x"}"#,
    );
    assert_eq!(r.error, ShadowError::NullInArray);
    assert_eq!(r.error.code(), 400);
    assert_eq!(r.client_token.as_deref(), Some("x"));
    let r = rejected(&s, br#"{"state":{"desired":{"c":[{"k":[1,null]}]}}}"#);
    assert_eq!(r.error, ShadowError::NullInArray);
    // Metadata of an array: one entry per element.
    let meta = parse(&s.get(b"", NOW, &limits()).unwrap())["metadata"].clone();
    assert_eq!(meta["desired"]["c"], json!([{"timestamp": NOW}]));
}

#[test]
fn other_top_level_fields_are_ignored() {
    let u = up(
        &Shadow::new(),
        json!({"state": {"reported": {"a": 1}}, "metadata": {"x": 1}, "extra": [1, 2]}),
    );
    assert_eq!(state_of(&u.shadow), json!({"reported": {"a": 1}}));
}

#[test]
fn delta_keeps_the_path_to_each_differing_leaf() {
    let s = up(
        &Shadow::new(),
        json!({"state": {
            "desired": {"led": {"color": "red", "on": true}, "mode": "eco", "list": [1, 2]},
            "reported": {"led": {"color": "red", "on": false}, "mode": "eco", "list": [1, 2, 3], "extra": 1}
        }}),
    );
    let delta = parse(&s.delta.expect("desired and reported differ"));
    assert_eq!(delta["state"], json!({"led": {"on": true}, "list": [1, 2]}));
    assert_eq!(
        delta["metadata"],
        json!({"led": {"on": {"timestamp": NOW}}, "list": [{"timestamp": NOW}, {"timestamp": NOW}]})
    );
    assert_eq!(delta["version"], 1);
}

#[test]
fn delta_carries_all_differing_keys_and_is_not_sent_when_equal() {
    let s = up(
        &Shadow::new(),
        json!({"state": {"desired": {"a": 1, "b": 2}}}),
    )
    .shadow;
    // This update touches only `b`; the delta still carries `a`.
    let u = up(&s, json!({"state": {"reported": {"b": 2}}}));
    assert_eq!(parse(u.delta.as_ref().unwrap())["state"], json!({"a": 1}));
    // Converged: no delta message, and desired stays as it was.
    let u = up(&u.shadow, json!({"state": {"reported": {"a": 1}}}));
    assert_eq!(u.delta, None);
    assert_eq!(state_of(&u.shadow)["desired"], json!({"a": 1, "b": 2}));
    assert!(state_of(&u.shadow).get("delta").is_none());
}

#[test]
fn delta_metadata_is_desired_metadata() {
    let s = up(&Shadow::new(), json!({"state": {"desired": {"a": 1}}})).shadow;
    let later = s
        .update(br#"{"state":{"reported":{"b":1}}}"#, NOW + 50, &limits())
        .unwrap();
    let delta = parse(&later.delta.unwrap());
    assert_eq!(delta["metadata"], json!({"a": {"timestamp": NOW}}));
    assert_eq!(delta["timestamp"], NOW + 50);
}

#[test]
fn documents_carry_previous_and_current_never_delta() {
    let s = up(&Shadow::new(), json!({"state": {"desired": {"a": 1}}})).shadow;
    let u = up(
        &s,
        json!({"state": {"reported": {"a": 0}}, "clientToken": "c"}),
    );
    let docs = parse(&u.documents);
    assert_eq!(docs["previous"]["state"], json!({"desired": {"a": 1}}));
    assert_eq!(docs["previous"]["version"], 1);
    assert_eq!(
        docs["current"]["state"],
        json!({"desired": {"a": 1}, "reported": {"a": 0}})
    );
    assert_eq!(docs["current"]["version"], 2);
    assert_eq!(docs["timestamp"], NOW);
    assert_eq!(docs["clientToken"], "c");
    assert!(!String::from_utf8_lossy(&u.documents).contains("delta"));
}

#[test]
fn get_returns_the_document_with_its_delta() {
    let s = up(
        &Shadow::new(),
        json!({"state": {"desired": {"a": 1}, "reported": {"a": 2}}}),
    )
    .shadow;
    let got = parse(
        &s.get(br#"{"clientToken":"g"}"#, NOW + 1, &limits())
            .unwrap(),
    );
    assert_eq!(got["state"]["delta"], json!({"a": 1}));
    assert_eq!(got["version"], 1);
    assert_eq!(got["timestamp"], NOW + 1);
    assert_eq!(got["clientToken"], "g");
    let missing = Shadow::new()
        .get(br#"{"clientToken":"g"}"#, NOW, &limits())
        .unwrap_err();
    assert_eq!(missing.error, ShadowError::NotFound);
    assert_eq!(parse(&missing.to_payload(NOW))["code"], 404);
    assert_eq!(parse(&missing.to_payload(NOW))["clientToken"], "g");
}

#[test]
fn delete_keeps_the_version() {
    let s = up(&Shadow::new(), json!({"state": {"desired": {"a": 1}}})).shadow;
    let s = up(&s, json!({"state": {"desired": {"a": 2}}})).shadow;
    let r = s.delete(br#"{"version":1}"#, NOW, &limits()).unwrap_err();
    assert_eq!(r.error, ShadowError::VersionConflict);
    let d = s.delete(br#"{"clientToken":"d"}"#, NOW, &limits()).unwrap();
    assert_eq!(
        parse(&d.accepted),
        json!({"version": 2, "timestamp": NOW, "clientToken": "d"})
    );
    assert!(!d.shadow.exists());
    assert_eq!(
        d.shadow.get(b"", NOW, &limits()).unwrap_err().error,
        ShadowError::NotFound
    );
    assert_eq!(
        d.shadow.delete(b"", NOW, &limits()).unwrap_err().error,
        ShadowError::NotFound
    );
    let again = up(&d.shadow, json!({"state": {"desired": {"b": 1}}}));
    assert_eq!(again.shadow.version(), 3);
    assert_eq!(parse(&again.documents)["previous"], Value::Null);
}

#[test]
fn versions_must_match() {
    let s = up(&Shadow::new(), json!({"state": {"desired": {"a": 1}}})).shadow;
    let r = rejected(
        &s,
        br#"{"state":{"desired":{"a":2}},"version":7,"clientToken":"v"}"#,
    );
    assert_eq!(r.error, ShadowError::VersionConflict);
    assert_eq!(
        parse(&r.to_payload(NOW)),
        json!({"code": 409, "message": "Version conflict", "timestamp": NOW, "clientToken": "v"})
    );
    let ok = up(&s, json!({"state": {"desired": {"a": 2}}, "version": 1}));
    assert_eq!(ok.shadow.version(), 2);
}

#[test]
fn bad_requests_get_aws_codes_and_change_nothing() {
    let s = up(&Shadow::new(), json!({"state": {"desired": {"a": 1}}})).shadow;
    let cases: &[(&[u8], ShadowError)] = &[
        (b"not json", ShadowError::InvalidJson),
        (b"[1,2]", ShadowError::InvalidJson),
        (b"", ShadowError::InvalidJson),
        (br#"{"desired":{"a":1}}"#, ShadowError::MissingState),
        (br#"{"state":5}"#, ShadowError::StateNotObject),
        (br#"{"state":[]}"#, ShadowError::StateNotObject),
        (
            br#"{"state":{"desired":"on"}}"#,
            ShadowError::DesiredNotObject,
        ),
        (
            br#"{"state":{"reported":[1]}}"#,
            ShadowError::ReportedNotObject,
        ),
        (br#"{"state":{},"version":-1}"#, ShadowError::InvalidVersion),
        (
            br#"{"state":{},"version":"1"}"#,
            ShadowError::InvalidVersion,
        ),
        (
            br#"{"state":{},"version":1.5}"#,
            ShadowError::InvalidVersion,
        ),
        (
            br#"{"state":{},"clientToken":5}"#,
            ShadowError::InvalidClientToken,
        ),
        (
            br#"{"state":{"desired":{"1":{"2":{"3":{"4":{"5":{"6":{"7":1}}}}}}}}}"#,
            ShadowError::TooDeep { max: 6 },
        ),
        (
            b"{\"state\":{\"desired\":{\"a\":\"\xff\"}}}",
            ShadowError::UnsupportedEncoding,
        ),
    ];
    for (request, error) in cases {
        let r = rejected(&s, request);
        assert_eq!(&r.error, error, "{}", String::from_utf8_lossy(request));
    }
    // Six levels are allowed.
    up(
        &s,
        json!({"state": {"desired": {"1":{"2":{"3":{"4":{"5":{"6":1}}}}}}}}),
    );
    // A token over 64 bytes is refused and not echoed.
    let long = format!(r#"{{"state":{{}},"clientToken":"{}"}}"#, "x".repeat(65));
    let r = rejected(&s, long.as_bytes());
    assert_eq!(
        (r.error, r.client_token),
        (ShadowError::InvalidClientToken, None)
    );
    let ok = format!(r#"{{"state":{{}},"clientToken":"{}"}}"#, "x".repeat(64));
    assert!(s.update(ok.as_bytes(), NOW, &limits()).is_ok());
    // The too-deep message names the limit, as AWS's does.
    let deep = rejected(
        &s,
        br#"{"state":{"desired":{"1":{"2":{"3":{"4":{"5":{"6":{"7":1}}}}}}}}}"#,
    );
    assert_eq!(
        parse(&deep.to_payload(NOW))["message"],
        "JSON contains too many levels of nesting; maximum is 6"
    );
}

#[test]
fn oversize_state_is_413() {
    let s = up(
        &Shadow::new(),
        json!({"state": {"desired": {"a": "x".repeat(4000)}}}),
    )
    .shadow;
    let s = up(&s, json!({"state": {"reported": {"a": "x".repeat(4000)}}})).shadow;
    // desired + reported would pass 8 KiB together.
    let r = rejected(
        &s,
        json!({"state": {"reported": {"b": "y".repeat(300)}}})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(r.error, ShadowError::PayloadTooLarge);
    assert_eq!(r.error.code(), 413);
    // A payload past the read limit is refused before parsing.
    let huge = vec![b' '; 70 * 1024];
    assert_eq!(rejected(&s, &huge).error, ShadowError::PayloadTooLarge);
    // Removing data from a shadow near the limit still works.
    up(&s, json!({"state": {"reported": {"a": null}}}));
}

#[test]
fn process_lists_every_message_in_order() {
    let out = process(
        &Shadow::new(),
        "thing",
        ShadowOp::Update,
        br#"{"state":{"reported":{"a":1}}}"#,
        NOW,
        &limits(),
    );
    let kinds: Vec<_> = out.messages.iter().map(|m| m.kind).collect();
    assert_eq!(
        kinds,
        [
            ShadowTopicKind::Op(ShadowOp::Update, Role::Accepted),
            ShadowTopicKind::Documents
        ]
    );
    let out = process(
        &Shadow::new(),
        "thing",
        ShadowOp::Delete,
        b"",
        NOW,
        &limits(),
    );
    assert_eq!(out.shadow, None);
    assert_eq!(
        out.messages[0].kind,
        ShadowTopicKind::Op(ShadowOp::Delete, Role::Rejected)
    );
    let out = process(&Shadow::new(), "thing", ShadowOp::Get, b"{", NOW, &limits());
    assert_eq!(parse(&out.messages[0].payload)["code"], 400);
}

#[test]
fn stored_form_round_trips() {
    let s = up(
        &Shadow::new(),
        json!({"state": {"desired": {"a": [1, {"b": 2}]}, "reported": {"c": "d"}}}),
    )
    .shadow;
    assert_eq!(Shadow::from_stored_json(&s.to_stored_json()).unwrap(), s);
    let deleted = s.delete(b"", NOW, &limits()).unwrap().shadow;
    assert_eq!(
        Shadow::from_stored_json(&deleted.to_stored_json()).unwrap(),
        deleted
    );
    assert_eq!(
        Shadow::from_stored_json(b"{").unwrap_err(),
        ShadowError::InvalidJson
    );
}

// ---- AWS IoT's documented answers, case by case ---------------------------
// (Device Shadow service documents; Device Shadow MQTT topics; shadow error
// messages in the AWS IoT Developer Guide.)

/// "metadata.delta": the timestamps of the desired leaves that make up the
/// delta, nested like the delta itself (flat case).
#[test]
fn get_accepted_has_the_delta_metadata_flat() {
    let s = up(
        &Shadow::new(),
        json!({"state": {"desired": {"color": "red", "on": true}}}),
    )
    .shadow;
    let s = s
        .update(
            json!({"state": {"reported": {"on": true}}})
                .to_string()
                .as_bytes(),
            NOW + 7,
            &limits(),
        )
        .unwrap()
        .shadow;
    let got = parse(&s.get(b"", NOW + 9, &limits()).unwrap());
    assert_eq!(got["state"]["delta"], json!({"color": "red"}));
    assert_eq!(
        got["metadata"]["delta"],
        json!({"color": {"timestamp": NOW}})
    );
    assert_eq!(
        got["metadata"]["reported"],
        json!({"on": {"timestamp": NOW + 7}})
    );
}

/// The nested case: only the differing leaves, under their parents.
#[test]
fn get_accepted_has_the_delta_metadata_nested() {
    let s = up(
        &Shadow::new(),
        json!({"state": {"desired": {"led": {"color": "red", "level": 3}, "fan": [1, 2]}}}),
    )
    .shadow;
    let s = s
        .update(
            json!({"state": {"desired": {"led": {"level": 5}}, "reported": {"led": {"color": "red", "level": 3}}}})
                .to_string()
                .as_bytes(),
            NOW + 4,
            &limits(),
        )
        .unwrap()
        .shadow;
    let got = parse(&s.get(b"", NOW + 5, &limits()).unwrap());
    assert_eq!(
        got["state"]["delta"],
        json!({"led": {"level": 5}, "fan": [1, 2]})
    );
    assert_eq!(
        got["metadata"]["delta"],
        json!({"led": {"level": {"timestamp": NOW + 4}}, "fan": [{"timestamp": NOW}, {"timestamp": NOW}]})
    );
    // In step: no delta, no delta metadata.
    let s = s
        .update(
            json!({"state": {"reported": {"led": {"level": 5}, "fan": [1, 2]}}})
                .to_string()
                .as_bytes(),
            NOW + 6,
            &limits(),
        )
        .unwrap()
        .shadow;
    let got = parse(&s.get(b"", NOW + 7, &limits()).unwrap());
    assert_eq!(got["state"].get("delta"), None);
    assert_eq!(got["metadata"].get("delta"), None);
}

/// `{"state": {"foo": {...}, "reported": {...}}}`: 400 "State contains an
/// invalid node: 'foo'", and nothing is stored (`rejected` checks that).
#[test]
fn a_state_node_other_than_desired_and_reported_is_rejected() {
    let s = up(&Shadow::new(), json!({"state": {"reported": {"x": 0}}})).shadow;
    for (request, node) in [
        (
            json!({"state": {"foo": {"y": 1}, "reported": {"x": 1}}, "clientToken": "c"}),
            "foo",
        ),
        (
            json!({"state": {"delta": {"x": 1}}, "clientToken": "c"}),
            "delta",
        ),
        (
            json!({"state": {"desired": {"x": 1}, "Reported": 1}, "clientToken": "c"}),
            "Reported",
        ),
    ] {
        let r = rejected(&s, request.to_string().as_bytes());
        assert_eq!(r.error, ShadowError::InvalidNode);
        let reply = parse(&r.to_payload(NOW));
        assert_eq!(reply["code"], 400);
        assert_eq!(
            reply["message"],
            format!("State contains an invalid node: '{node}'")
        );
        assert_eq!(reply["clientToken"], "c");
    }
    // Top-level fields other than state, clientToken and version are not
    // state nodes: still ignored.
    up(&s, json!({"state": {"reported": {"x": 2}}, "extra": 1}));
}

/// 404 "No shadow exists with name: '<thing>'" for the classic shadow, the
/// shadow's own name for a named one; for get and for delete.
#[test]
fn not_found_names_the_shadow() {
    for op in [ShadowOp::Get, ShadowOp::Delete] {
        for name in ["pump-7", "config"] {
            let out = process(
                &Shadow::new(),
                name,
                op,
                br#"{"clientToken":"n"}"#,
                NOW,
                &limits(),
            );
            assert_eq!(out.shadow, None);
            assert_eq!(out.messages.len(), 1);
            assert_eq!(
                out.messages[0].kind,
                ShadowTopicKind::Op(op, Role::Rejected)
            );
            let reply = parse(&out.messages[0].payload);
            assert_eq!(reply["code"], 404);
            assert_eq!(
                reply["message"],
                format!("No shadow exists with name: '{name}'")
            );
            assert_eq!(reply["clientToken"], "n");
        }
    }
}

/// `"desired": null` in an update: `/update/accepted` echoes it and carries
/// `metadata.desired` with the update's timestamp (and so for reported).
#[test]
fn removing_a_section_has_its_timestamp_in_the_accepted_metadata() {
    let s = up(
        &Shadow::new(),
        json!({"state": {"desired": {"a": 1}, "reported": {"b": 2}}}),
    )
    .shadow;
    let u = s
        .update(br#"{"state":{"desired":null}}"#, NOW + 3, &limits())
        .unwrap();
    let accepted = parse(&u.accepted);
    assert_eq!(accepted["state"], json!({"desired": null}));
    assert_eq!(
        accepted["metadata"],
        json!({"desired": {"timestamp": NOW + 3}})
    );
    let u = u
        .shadow
        .update(
            br#"{"state":{"reported":null,"desired":{"c":1}}}"#,
            NOW + 4,
            &limits(),
        )
        .unwrap();
    assert_eq!(
        parse(&u.accepted)["metadata"],
        json!({"reported": {"timestamp": NOW + 4}, "desired": {"c": {"timestamp": NOW + 4}}})
    );
}

// ---- property tests -------------------------------------------------------

fn arb_value(depth: u32) -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        (0i64..3).prop_map(Value::from),
        any::<bool>().prop_map(Value::from),
        "[xy]{0,2}".prop_map(Value::from),
        proptest::collection::vec((0i64..3).prop_map(Value::from), 0..3).prop_map(Value::Array),
    ];
    if depth == 0 {
        return leaf.boxed();
    }
    prop_oneof![
        4 => leaf,
        1 => Just(Value::Null),
        2 => arb_object(depth - 1).prop_map(Value::Object),
    ]
    .boxed()
}

fn arb_object(depth: u32) -> BoxedStrategy<Object> {
    proptest::collection::btree_map("[abc]", arb_value(depth), 0..4)
        .prop_map(|m| m.into_iter().collect())
        .boxed()
}

fn arb_update() -> impl Strategy<Value = Value> {
    let section = prop_oneof![
        1 => Just(None),
        1 => Just(Some(Value::Null)),
        6 => arb_object(2).prop_map(|o| Some(Value::Object(o))),
    ];
    (section.clone(), section, 0..20u8).prop_map(|(d, r, n)| {
        if n == 0 {
            return json!({"state": null});
        }
        let mut state = serde_json::Map::new();
        if let Some(d) = d {
            state.insert("desired".into(), d);
        }
        if let Some(r) = r {
            state.insert("reported".into(), r);
        }
        json!({ "state": state })
    })
}

/// The delta rule, written independently of the service: walk desired and
/// keep what reported lacks or holds differently.
fn reference_delta(desired: &Value, reported: &Value) -> Value {
    let mut out = serde_json::Map::new();
    if let Some(d) = desired.as_object() {
        for (k, dv) in d {
            let rv = reported.get(k);
            match (dv, rv) {
                (Value::Object(_), Some(rv @ Value::Object(_))) => {
                    let sub = reference_delta(dv, rv);
                    if sub.as_object().is_some_and(|o| !o.is_empty()) {
                        out.insert(k.clone(), sub);
                    }
                }
                (dv, Some(rv)) if dv == rv => {}
                (dv, _) => {
                    out.insert(k.clone(), dv.clone());
                }
            }
        }
    }
    Value::Object(out)
}

fn without_noise(mut doc: Value) -> Value {
    // Version, timestamps and metadata differ between runs by design.
    if let Some(o) = doc.as_object_mut() {
        o.remove("metadata");
        o.remove("version");
        o.remove("timestamp");
    }
    doc
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn delta_is_always_the_diff_of_desired_and_reported(updates in proptest::collection::vec(arb_update(), 1..12)) {
        let mut shadow = Shadow::new();
        for update in &updates {
            let bytes = update.to_string();
            if let Ok(u) = shadow.update(bytes.as_bytes(), NOW, &limits()) {
                shadow = u.shadow;
                let state = state_of(&shadow);
                let expected = reference_delta(&state["desired"], &state["reported"]);
                let got = state.get("delta").cloned().unwrap_or(json!({}));
                prop_assert_eq!(&got, &expected);
                // The delta message says the same, and is sent exactly when non-empty.
                match &u.delta {
                    Some(d) => prop_assert_eq!(&parse(d)["state"], &expected),
                    None => prop_assert_eq!(&expected, &json!({})),
                }
            }
        }
    }

    #[test]
    fn applying_an_update_twice_equals_once(updates in proptest::collection::vec(arb_update(), 1..6), last in arb_update()) {
        let mut shadow = Shadow::new();
        for update in &updates {
            if let Ok(u) = shadow.update(update.to_string().as_bytes(), NOW, &limits()) {
                shadow = u.shadow;
            }
        }
        let bytes = last.to_string();
        if let Ok(once) = shadow.update(bytes.as_bytes(), NOW, &limits()) {
            let twice = once.shadow.update(bytes.as_bytes(), NOW + 9, &limits()).unwrap();
            let a = without_noise(parse(&once.shadow.get(b"", NOW, &limits()).unwrap()));
            let b = without_noise(parse(&twice.shadow.get(b"", NOW, &limits()).unwrap()));
            prop_assert_eq!(a, b);
            prop_assert_eq!(twice.shadow.version(), once.shadow.version() + 1);
        }
    }

    #[test]
    fn rejected_requests_change_nothing(
        updates in proptest::collection::vec(arb_update(), 0..5),
        bytes in proptest::collection::vec(any::<u8>(), 0..200),
        version in 2u64..50,
    ) {
        let mut shadow = Shadow::new();
        for update in &updates {
            if let Ok(u) = shadow.update(update.to_string().as_bytes(), NOW, &limits()) {
                shadow = u.shadow;
            }
        }
        let before = shadow.to_stored_json();
        let conflict = json!({"state": {"desired": {"a": 1}}, "version": shadow.version() + version}).to_string();
        for op in [ShadowOp::Update, ShadowOp::Get, ShadowOp::Delete] {
            for request in [bytes.as_slice(), conflict.as_bytes()] {
                let out = process(&shadow, "thing", op, request, NOW, &limits());
                if out.messages.iter().any(|m| matches!(m.kind, ShadowTopicKind::Op(_, Role::Rejected))) {
                    prop_assert!(out.shadow.is_none());
                    prop_assert_eq!(out.messages.len(), 1);
                }
            }
        }
        prop_assert_eq!(shadow.to_stored_json(), before);
    }

    #[test]
    fn no_input_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let shadow = up(&Shadow::new(), json!({"state": {"desired": {"a": 1}}})).shadow;
        for op in [ShadowOp::Update, ShadowOp::Get, ShadowOp::Delete] {
            let _ = process(&shadow, "thing", op, &bytes, NOW, &limits());
        }
        let _ = Shadow::from_stored_json(&bytes);
    }
}

// ---- simulation of ShadowSync against the service --------------------------

mod sim {
    use std::collections::BTreeMap;
    use std::format;

    use super::*;
    use crate::identity::{ShadowName, ThingName};
    use crate::testutil::SimRng;
    use crate::time::Instant;
    use crate::topic::{ShadowTopic, Topic, TopicPrefix};
    use crate::transmit::Transmit;
    use core::time::Duration;

    #[derive(Clone, Copy)]
    struct Faults {
        loss: u64,
        duplication: u64,
        /// Largest extra delay in ms, which reorders messages.
        jitter: u64,
        /// Chance per second that the connection drops.
        drop: u64,
    }

    const CALM: Faults = Faults {
        loss: 0,
        duplication: 0,
        jitter: 0,
        drop: 0,
    };

    #[derive(Clone)]
    enum Wire {
        ToService { topic: String, payload: Vec<u8> },
        ToDevice { topic: String, payload: Vec<u8> },
    }

    struct World {
        now: Instant,
        rng: SimRng,
        faults: Faults,
        device: ShadowSync,
        service: BTreeMap<Option<String>, Shadow>,
        /// (delivery time, sequence) -> message; the sequence keeps equal
        /// times in send order.
        wire: BTreeMap<(Instant, u64), Wire>,
        seq: u64,
        connected: bool,
        reconnect_at: Option<Instant>,
        subscribed_at: Option<Instant>,
        prefix: TopicPrefix<'static>,
        thing: ThingName<'static>,
        accepted: Vec<RequestId>,
    }

    impl World {
        fn new(seed: u64, config: SyncConfig) -> Self {
            let thing = ThingName::new("dev-1").unwrap().into_owned();
            let shadows = [None, Some(ShadowName::from_static("cfg"))];
            let device = ShadowSync::new(thing.clone(), &shadows, config, seed);
            let mut w = Self {
                now: Instant::ZERO,
                rng: SimRng::new(seed),
                faults: CALM,
                device,
                service: BTreeMap::new(),
                wire: BTreeMap::new(),
                seq: 0,
                connected: false,
                reconnect_at: Some(Instant::ZERO),
                subscribed_at: None,
                prefix: TopicPrefix::AWS,
                thing,
                accepted: Vec::new(),
            };
            w.service.insert(None, Shadow::new());
            w.service.insert(Some("cfg".to_string()), Shadow::new());
            w
        }

        fn epoch(&self) -> u64 {
            NOW + self.now.as_millis() / 1000
        }

        fn send(&mut self, wire: Wire) {
            if !self.connected || self.rng.chance(self.faults.loss) {
                return;
            }
            let copies = if self.rng.chance(self.faults.duplication) {
                2
            } else {
                1
            };
            for _ in 0..copies {
                let delay = 5 + self.rng.below(self.faults.jitter + 1);
                let at = self.now + Duration::from_millis(delay);
                self.seq += 1;
                self.wire.insert((at, self.seq), wire.clone());
            }
        }

        /// The service: process a device request, publish what it causes.
        fn serve(&mut self, topic: &str, payload: &[u8]) {
            let Ok(Topic::Shadow(ShadowTopic {
                shadow,
                kind: ShadowTopicKind::Op(op, Role::Request),
                ..
            })) = Topic::parse(&self.prefix, topic)
            else {
                panic!("device published to {topic}");
            };
            let key = shadow.as_ref().map(|s| s.as_str().to_string());
            let out = process(
                &self.service[&key],
                "thing",
                op,
                payload,
                self.epoch(),
                &limits(),
            );
            self.publish_outcome(shadow.map(|s| s.into_owned()), out);
        }

        fn publish_outcome(&mut self, shadow: Option<ShadowName<'static>>, out: Processed) {
            let key = shadow.as_ref().map(|s| s.as_str().to_string());
            if let Some(new) = out.shadow {
                self.service.insert(key, new);
            }
            for m in out.messages {
                let topic = Topic::Shadow(ShadowTopic {
                    thing: self.thing.clone(),
                    shadow: shadow.clone(),
                    kind: m.kind,
                })
                .display(&self.prefix)
                .to_string();
                // The device subscribes to all but `/update/documents`.
                if m.kind != ShadowTopicKind::Documents {
                    self.send(Wire::ToDevice {
                        topic,
                        payload: m.payload,
                    });
                }
            }
        }

        /// An application backend changes desired (not through the device).
        fn cloud_sets_desired(&mut self) {
            let shadow = if self.rng.chance(50) {
                None
            } else {
                Some(ShadowName::from_static("cfg"))
            };
            let key = shadow.as_ref().map(|s| s.as_str().to_string());
            let n = self.rng.below(4);
            let value = self.rng.below(5);
            let desired = match n {
                0 => json!({ "speed": value }),
                1 => json!({ "mode": format!("m{value}") }),
                2 => json!({ "led": { "on": value.is_multiple_of(2), "level": value } }),
                _ => json!({ "speed": null }),
            };
            let request = UpdateRequest::desired(desired).to_payload();
            let out = process(
                &self.service[&key],
                "thing",
                ShadowOp::Update,
                &request,
                self.epoch(),
                &limits(),
            );
            self.publish_outcome(shadow, out);
        }

        /// The device application: do what the delta asks and report it.
        fn device_app(&mut self) {
            while let Some(event) = self.device.poll_event() {
                match event {
                    ShadowEvent::Delta { shadow, delta, .. } => {
                        self.device
                            .report(self.now, shadow.as_ref(), delta)
                            .unwrap();
                    }
                    ShadowEvent::Accepted { id, .. } => self.accepted.push(id),
                    _ => {}
                }
            }
        }

        fn pump(&mut self) {
            loop {
                self.device_app();
                let Some(t) = self.device.poll_transmit() else {
                    break;
                };
                match t {
                    Transmit::Subscribe { .. } => {
                        self.subscribed_at = Some(self.now + Duration::from_millis(10));
                    }
                    Transmit::Publish { topic, payload, .. } => {
                        self.send(Wire::ToService { topic, payload });
                    }
                }
            }
        }

        fn set_connected(&mut self, up: bool) {
            self.connected = up;
            if !up {
                // A clean session: what was on the wire is gone.
                self.wire.clear();
                self.subscribed_at = None;
                self.reconnect_at =
                    Some(self.now + Duration::from_millis(500 + self.rng.below(3000)));
            }
            self.device.handle_connection(self.now, up);
            self.pump();
        }

        /// Runs until `until`; the cloud changes desired about every
        /// `change_every` ms (never if 0).
        fn run(&mut self, until: Instant, change_every: u64) {
            let mut next_second = self.now + Duration::from_secs(1);
            while self.now < until {
                let candidates = [
                    self.wire.keys().next().map(|k| k.0),
                    self.device.poll_timeout(),
                    self.reconnect_at,
                    self.subscribed_at,
                    Some(next_second),
                ];
                let next = candidates
                    .into_iter()
                    .flatten()
                    .min()
                    .unwrap_or(until)
                    .min(until);
                self.now = next.max(self.now);
                if let Some(key) = self.wire.keys().next().copied().filter(|k| k.0 <= self.now) {
                    match self.wire.remove(&key) {
                        Some(Wire::ToService { topic, payload }) => self.serve(&topic, &payload),
                        Some(Wire::ToDevice { topic, payload }) => {
                            self.device
                                .handle_message(self.now, &topic, &payload)
                                .unwrap();
                        }
                        None => {}
                    }
                }
                if self.reconnect_at.is_some_and(|t| t <= self.now) {
                    self.reconnect_at = None;
                    self.set_connected(true);
                }
                if self.subscribed_at.is_some_and(|t| t <= self.now) {
                    self.subscribed_at = None;
                    self.device.handle_subscribed(self.now);
                }
                if self.device.poll_timeout().is_some_and(|t| t <= self.now) {
                    self.device.handle_timeout(self.now);
                }
                if next_second <= self.now {
                    next_second += Duration::from_secs(1);
                    if self.connected && self.rng.chance(self.faults.drop) {
                        self.set_connected(false);
                    }
                    if change_every > 0 && self.rng.below(change_every / 1000 + 1) == 0 {
                        self.cloud_sets_desired();
                    }
                }
                self.pump();
            }
        }

        fn assert_converged(&self, seed: u64) {
            for (key, shadow) in &self.service {
                let Some(state) = shadow.state() else {
                    continue;
                };
                let (delta, _) = state.delta();
                assert!(
                    delta.is_empty(),
                    "seed {seed}: shadow {key:?} still has delta {delta:?}"
                );
                let name = key.as_deref().map(|k| ShadowName::new(k).unwrap());
                let (desired, reported, version) = self
                    .device
                    .document(name.as_ref())
                    .unwrap_or_else(|| panic!("seed {seed}: device not in sync for {key:?}"));
                assert_eq!(
                    desired,
                    state.desired(),
                    "seed {seed}: desired replica of {key:?}"
                );
                assert_eq!(
                    reported,
                    state.reported(),
                    "seed {seed}: reported replica of {key:?}"
                );
                assert_eq!(version, shadow.version(), "seed {seed}: version of {key:?}");
            }
        }
    }

    fn sim_config(versioned: bool) -> SyncConfig {
        SyncConfig {
            request_timeout: Duration::from_secs(3),
            resync_interval: Some(Duration::from_secs(20)),
            versioned_updates: versioned,
            ..SyncConfig::default()
        }
    }

    fn converges(seed: u64, versioned: bool, faults: Faults) {
        let mut w = World::new(seed, sim_config(versioned));
        w.faults = faults;
        // Ten minutes of changes under faults...
        w.run(Instant::ZERO + Duration::from_secs(600), 7_000);
        // ...then the network heals and the cloud stops changing things.
        w.faults = CALM;
        if !w.connected && w.reconnect_at.is_none() {
            w.reconnect_at = Some(w.now);
        }
        let end = w.now + Duration::from_secs(120);
        w.run(end, 0);
        w.assert_converged(seed);
    }

    #[test]
    fn converges_on_a_clean_network() {
        for seed in 1..=5 {
            converges(seed, true, CALM);
        }
    }

    #[test]
    fn converges_despite_loss_duplication_reordering_and_drops() {
        let faults = Faults {
            loss: 10,
            duplication: 10,
            jitter: 400,
            drop: 2,
        };
        for seed in 1..=40 {
            converges(seed, true, faults);
            converges(seed, false, faults);
        }
    }

    #[test]
    fn converges_without_periodic_reads_when_updates_race_its_reads() {
        // No periodic re-read to hide a lost change: an update published
        // while the device's GET is out (reordered around its answer, or
        // applied after the service read the shadow for it) must still
        // reach the replica. Reconnections make the device read often.
        let faults = Faults {
            loss: 0,
            duplication: 0,
            jitter: 400,
            drop: 20,
        };
        for seed in 1..=40 {
            let mut w = World::new(
                seed,
                SyncConfig {
                    resync_interval: None,
                    ..sim_config(false)
                },
            );
            w.faults = faults;
            w.run(Instant::ZERO + Duration::from_secs(300), 2_000);
            w.faults = CALM;
            if !w.connected && w.reconnect_at.is_none() {
                w.reconnect_at = Some(w.now);
            }
            let end = w.now + Duration::from_secs(60);
            w.run(end, 0);
            w.assert_converged(seed);
        }
    }

    #[test]
    fn an_update_that_overtakes_the_read_is_not_lost() {
        // The service reads the shadow for the device's GET (version 1),
        // then an application sets desired (version 2); its accepted and
        // delta reach the device before the GET's answer. The device must
        // not settle on version 1 and miss the change for good.
        let thing = ThingName::new("dev-1").unwrap().into_owned();
        let config = SyncConfig {
            resync_interval: None,
            ..SyncConfig::default()
        };
        let mut dev = ShadowSync::new(thing, &[None], config, 1);
        let t = Instant::ZERO;
        dev.handle_connection(t, true);
        dev.handle_subscribed(t);
        let read = |dev: &mut ShadowSync| -> String {
            loop {
                match dev.poll_transmit().expect("a GET") {
                    Transmit::Publish { topic, payload, .. } if topic.ends_with("/shadow/get") => {
                        let body: Value = serde_json::from_slice(&payload).unwrap();
                        return body["clientToken"].as_str().unwrap().to_string();
                    }
                    _ => {}
                }
            }
        };
        let token = read(&mut dev);
        let base = "$aws/things/dev-1/shadow";
        let msg = |dev: &mut ShadowSync, suffix: &str, body: Value| {
            dev.handle_message(
                t,
                &format!("{base}/{suffix}"),
                &serde_json::to_vec(&body).unwrap(),
            )
            .unwrap();
        };
        msg(
            &mut dev,
            "update/accepted",
            json!({"state": {"desired": {"speed": 3}}, "version": 2}),
        );
        msg(
            &mut dev,
            "update/delta",
            json!({"state": {"speed": 3}, "version": 2}),
        );
        msg(
            &mut dev,
            "get/accepted",
            json!({"state": {"reported": {"speed": 1}}, "version": 1, "clientToken": token}),
        );
        // It reads again, and the second answer brings the change.
        let token = read(&mut dev);
        msg(
            &mut dev,
            "get/accepted",
            json!({"state": {"desired": {"speed": 3}, "reported": {"speed": 1}}, "version": 2, "clientToken": token}),
        );
        let mut deltas = Vec::new();
        while let Some(e) = dev.poll_event() {
            if let ShadowEvent::Delta { delta, .. } = e {
                deltas.push(delta);
            }
        }
        assert_eq!(
            deltas.last().and_then(|d| d.get("speed")),
            Some(&json!(3)),
            "{deltas:?}"
        );
    }

    #[test]
    fn a_report_applied_before_the_connection_dropped_is_applied_once() {
        for versioned in [true, false] {
            let mut w = World::new(11, sim_config(versioned));
            w.run(Instant::ZERO + Duration::from_secs(5), 0);
            let before = w.service[&None].version();
            let id = w
                .device
                .report(
                    w.now,
                    None,
                    json!({"temp": 21}).as_object().unwrap().clone(),
                )
                .unwrap();
            w.pump();
            // The service applies the report...
            let key = w
                .wire
                .iter()
                .find(|(_, m)| matches!(m, Wire::ToService { topic, .. } if topic.ends_with("/shadow/update")))
                .map(|(k, _)| *k)
                .expect("the report is on the wire");
            let Some(Wire::ToService { topic, payload }) = w.wire.remove(&key) else {
                unreachable!()
            };
            w.serve(&topic, &payload);
            assert_eq!(w.service[&None].version(), before + 1);
            // ...and the connection drops before its answer arrives.
            w.set_connected(false);
            w.run(w.now + Duration::from_secs(30), 0);
            assert!(w.accepted.contains(&id), "versioned {versioned}: accepted");
            assert_eq!(
                w.service[&None].version(),
                before + 1,
                "versioned {versioned}: applied once, answered again after the reconnection"
            );
        }
    }

    #[test]
    fn a_restarted_device_catches_up() {
        // The device process restarts: a new engine with a new session,
        // while the cloud changed desired in between.
        let mut w = World::new(7, sim_config(true));
        w.run(Instant::ZERO + Duration::from_secs(60), 5_000);
        w.set_connected(false);
        w.cloud_sets_desired();
        w.cloud_sets_desired();
        let thing = w.thing.clone();
        w.device = ShadowSync::new(
            thing,
            &[None, Some(ShadowName::from_static("cfg"))],
            sim_config(true),
            8,
        );
        w.reconnect_at = Some(w.now);
        let end = w.now + Duration::from_secs(60);
        w.run(end, 0);
        w.assert_converged(7);
    }

    #[test]
    fn conflicting_report_is_retried_after_a_read() {
        let mut w = World::new(3, sim_config(true));
        w.run(Instant::ZERO + Duration::from_secs(5), 0);
        // The cloud changes desired behind the device's back; the device's
        // next (versioned) report is refused with 409, re-read and resent.
        let request = UpdateRequest::desired(json!({"x": 1})).to_payload();
        let out = process(
            &w.service[&None],
            "thing",
            ShadowOp::Update,
            &request,
            w.epoch(),
            &limits(),
        );
        w.service.insert(None, out.shadow.unwrap());
        let id = w
            .device
            .report(
                w.now,
                None,
                json!({"temp": 20}).as_object().unwrap().clone(),
            )
            .unwrap();
        w.run(w.now + Duration::from_secs(10), 0);
        assert!(
            w.accepted.contains(&id),
            "the report must be accepted after the 409"
        );
        assert_eq!(w.service[&None].state().unwrap().reported()["temp"], 20);
    }

    #[test]
    fn bad_input_is_refused_and_changes_nothing() {
        let mut w = World::new(5, sim_config(true));
        w.run(Instant::ZERO + Duration::from_secs(5), 0);
        let before = format!("{:?}", w.device.document(None));
        let accepted = "$aws/things/dev-1/shadow/update/accepted";
        let delta = "$aws/things/dev-1/shadow/update/delta";
        let cases: [(&str, &[u8]); 6] = [
            ("$aws/things/dev-1/jobs/notify", b"{}"),
            ("$aws/things/dev-2/shadow/update/delta", b"{}"),
            ("$aws/things/dev-1/shadow/name/other/update/delta", b"{}"),
            (accepted, b"{not json"),
            (delta, br#"{"state":{}}"#),
            ("garbage", b""),
        ];
        for (topic, payload) in cases {
            assert!(
                w.device.handle_message(w.now, topic, payload).is_err(),
                "{topic}"
            );
        }
        assert_eq!(format!("{:?}", w.device.document(None)), before);
        assert!(w.device.poll_transmit().is_none());
        assert!(
            w.device
                .update(w.now, None, Some(json!([1])), None)
                .is_err()
        );
    }
}

#[test]
fn a_retry_is_answered_again_not_applied_twice() {
    let req = |body: Value| serde_json::to_vec(&body).unwrap();
    let first =
        req(json!({"state": {"reported": {"speed": 3}}, "clientToken": "t1", "version": 0}));
    let s1 = Shadow::new().update(&first, NOW, &limits()).unwrap();
    assert!(!s1.repeated);
    assert_eq!(s1.shadow.version(), 1);
    // The answer was lost; the device (or another service instance, after
    // a restart: through the stored form) sees the same request again.
    let stored = Shadow::from_stored_json(&s1.shadow.to_stored_json()).unwrap();
    assert_eq!(stored, s1.shadow);
    let retry = stored.update(&first, NOW + 5, &limits()).unwrap();
    assert!(retry.repeated);
    assert_eq!(retry.accepted, s1.accepted, "the same answer");
    assert_eq!(retry.shadow, stored, "nothing changed");
    let out = process(
        &stored,
        "thing",
        ShadowOp::Update,
        &first,
        NOW + 5,
        &limits(),
    );
    assert_eq!(out.shadow, None, "nothing to store");
    assert_eq!(
        out.messages.len(),
        1,
        "only the answer, no delta or documents"
    );
    assert_eq!(
        out.messages[0].kind,
        ShadowTopicKind::Op(ShadowOp::Update, Role::Accepted)
    );
    // The same token with another body is another request: applied.
    let other = req(json!({"state": {"reported": {"speed": 4}}, "clientToken": "t1"}));
    let s2 = stored.update(&other, NOW, &limits()).unwrap();
    assert!(!s2.repeated);
    assert_eq!(s2.shadow.version(), 2);
    // Only the last update is remembered: the first body again is applied
    // (its values may differ from the state now).
    let again = s2.shadow.update(&first[..first.len()], NOW, &limits());
    assert!(
        again.is_err(),
        "version 0 is stale now: a conflict, not a repeat"
    );
    // No token, nothing remembered.
    let untracked = req(json!({"state": {"reported": {"speed": 5}}}));
    let s3 = s2.shadow.update(&untracked, NOW, &limits()).unwrap();
    let s4 = s3.shadow.update(&untracked, NOW, &limits()).unwrap();
    assert_eq!(
        (s3.repeated, s4.repeated, s4.shadow.version()),
        (false, false, 4)
    );
    // A delete forgets it.
    let deleted = s1.shadow.delete(b"", NOW, &limits()).unwrap().shadow;
    assert!(
        !deleted
            .update(
                &req(json!({"state": {"reported": {"speed": 3}}, "clientToken": "t1"})),
                NOW,
                &limits()
            )
            .unwrap()
            .repeated
    );
}
