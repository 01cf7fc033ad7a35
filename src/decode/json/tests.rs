use proptest::prelude::*;
use serde_json::json;

use super::*;

fn json_of(text: &str) -> Result<Value, ValueError> {
    parse(text.as_bytes(), "json", 0)
}

/// What streamex did before this parser (serde_json, then numbers rewritten as `numeric`
/// writes them), for documents serde_json takes: the semantics to keep.
fn serde_oracle(text: &[u8]) -> Result<Value, ValueError> {
    fn normalize(value: &mut Value) -> Result<(), ValueError> {
        match value {
            Value::Number(n) => {
                let text = n.as_str().as_bytes().to_vec();
                let parts = NumberParts::scan(&text)
                    .ok_or(ValueError::new("json", "invalid json syntax"))?;
                *value = numeric_value(&text, &parts, "json")?;
            }
            Value::Array(items) => items.iter_mut().try_for_each(normalize)?,
            Value::Object(map) => map.values_mut().try_for_each(normalize)?,
            Value::Null | Value::Bool(_) | Value::String(_) => {}
        }
        Ok(())
    }
    let mut value: Value =
        serde_json::from_slice(text).map_err(|_| ValueError::new("json", "invalid json syntax"))?;
    normalize(&mut value)?;
    Ok(value)
}

fn nested(depth: usize) -> String {
    // Arrays and objects in turn, with a leaf that needs normalising.
    let mut text = String::new();
    for i in 0..depth {
        text.push_str(if i % 2 == 0 { "[" } else { "{\"k\":" });
    }
    text.push_str("1e2");
    for i in (0..depth).rev() {
        text.push(if i % 2 == 0 { ']' } else { '}' });
    }
    text
}

fn depth_of(value: &Value) -> usize {
    let mut deepest = 0;
    let mut todo = vec![(value, 0)];
    while let Some((v, d)) = todo.pop() {
        deepest = deepest.max(d);
        match v {
            Value::Array(items) => todo.extend(items.iter().map(|i| (i, d + 1))),
            Value::Object(map) => todo.extend(map.values().map(|i| (i, d + 1))),
            _ => {}
        }
    }
    deepest
}

#[test]
fn documents_parse_as_jsonb_stores_them() {
    let v = json_of(
        r#" {"a":1,"b":[true,false,null,"s"],"a":{"x":-0},"c":1.50,"d":1E-2,"e":{}, "f":[]} "#,
    )
    .unwrap();
    assert_eq!(
        v,
        serde_json::from_str::<Value>(
            r#"{"a":{"x":0},"b":[true,false,null,"s"],"c":1.50,"d":0.01,"e":{},"f":[]}"#
        )
        .unwrap()
    );
    // The last duplicate wins, at the place of the first.
    let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["a", "b", "c", "d", "e", "f"]);
    assert_eq!(json_of("\"\\u0000\"").unwrap(), json!("\u{0}"));
    assert_eq!(
        json_of(r#""\"\\\/\b\f\n\r\t\u00e9\u263A""#).unwrap(),
        json!("\"\\/\u{8}\u{c}\n\r\té☺")
    );
    assert_eq!(json_of("\"héllo 😀\"").unwrap(), json!("héllo 😀"));
    assert_eq!(json_of("  7  ").unwrap(), json!(7));
}

#[test]
fn lone_surrogates_become_the_replacement_character() {
    assert_eq!(json_of(r#"["\ud800"]"#).unwrap(), json!(["\u{FFFD}"]));
    assert_eq!(json_of(r#""\udc00""#).unwrap(), json!("\u{FFFD}"));
    assert_eq!(json_of(r#""\uDBFFx""#).unwrap(), json!("\u{FFFD}x"));
    assert_eq!(json_of(r#""\ud800\n""#).unwrap(), json!("\u{FFFD}\n"));
    // A high surrogate followed by a second high one that has its pair.
    assert_eq!(
        json_of(r#""\ud800\ud83d\ude00""#).unwrap(),
        json!("\u{FFFD}😀")
    );
    assert_eq!(json_of(r#""\ud83d\ude00""#).unwrap(), json!("😀"));
    assert_eq!(json_of(r#""\uDBFF\uDFFF""#).unwrap(), json!("\u{10FFFF}"));
    assert_eq!(json_of(r#"{"\udc00":1}"#).unwrap(), json!({"\u{FFFD}": 1}));
    // A `\u` after a high surrogate must still be a valid escape.
    assert!(json_of(r#""\ud800\u12""#).is_err());
}

#[test]
fn deep_documents_parse_up_to_the_limit() {
    // serde_json refuses more than 128 levels; PostgreSQL does not.
    for depth in [129, 200, MAX_VALUE_DEPTH] {
        let text = nested(depth);
        let v = parse(text.as_bytes(), "jsonb", 0).unwrap();
        assert_eq!(depth_of(&v), depth);
        let mut leaf = &v;
        while let Some(inner) = leaf.get(0).or_else(|| leaf.get("k")) {
            leaf = inner;
        }
        assert_eq!(leaf.to_string(), "100");
    }
    for (text, outer) in [
        (nested(MAX_VALUE_DEPTH + 1), 0),
        (nested(MAX_VALUE_DEPTH), 1),
        ("[]".to_owned(), MAX_VALUE_DEPTH),
        ("{}".to_owned(), MAX_VALUE_DEPTH),
        (nested(100_000), 0),
    ] {
        let e = parse(text.as_bytes(), "jsonb", outer).unwrap_err();
        assert_eq!(e.to_string(), format!("jsonb: {TOO_DEEP}"));
    }
    // Scalars take no level.
    assert_eq!(parse(b"1", "jsonb", MAX_VALUE_DEPTH).unwrap(), json!(1));
    assert!(TOO_DEEP.contains(&format!(" {MAX_VALUE_DEPTH} ")));
}

#[test]
fn malformed_documents_are_errors() {
    for bad in [
        "",
        " ",
        "{",
        "[",
        "]",
        "[1,]",
        "[,1]",
        "{\"a\"}",
        "{\"a\":}",
        "{\"a\" 1}",
        "{a:1}",
        "{\"a\":1,}",
        "[1 2]",
        "tru",
        "truex",
        "nul",
        "01",
        "1.",
        ".5",
        "+1",
        "1-2",
        "--1",
        "\"abc",
        "\"\\x\"",
        "\"\\u12\"",
        "\"\\u12G4\"",
        "\"tab\there\"",
        "[1]]",
        "{}{}",
        "\"a\"\"b\"",
        "[\"\\",
        "NaN",
        "[1e99999]",
    ] {
        assert!(json_of(bad).is_err(), "{bad:?} parsed");
    }
    assert_eq!(
        parse(b"\"\xff\"", "json", 0).unwrap_err().to_string(),
        "json: invalid utf-8"
    );
    assert_eq!(
        json_of("[1e2000]").unwrap_err().to_string(),
        "json: number exponent out of range"
    );
}

#[test]
fn errors_never_contain_the_document() {
    for text in [
        "{\"s3cr3t\": ",
        "[\"s3cr3t\" 1]",
        "s3cr3t",
        "[s3cr3t]",
        "\"s3cr3t\\q\"",
    ] {
        let e = json_of(text).unwrap_err();
        assert!(!e.to_string().contains("s3cr3t"), "{e}");
    }
}

/// Documents serde_json would write, with some white space, that serde_json reads back.
fn any_document() -> impl Strategy<Value = String> {
    let number = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        (any::<i32>(), 0u32..1_000_000).prop_map(|(i, f)| format!("{i}.{f}")),
        (any::<i16>(), -30i32..30).prop_map(|(m, e)| format!("{m}e{e}")),
        (0u8..10, "[eE]", "[+-]?", 0u16..1200).prop_map(|(m, e, s, x)| format!("{m}.5{e}{s}{x}")),
        Just("-0".to_owned()),
        Just("-0.000".to_owned()),
    ];
    let string = prop_oneof![
        "[a-z é😀\"\\\\/\u{1}\u{7f}]{0,6}".prop_map(|s| serde_json::to_string(&s).unwrap()),
        Just(r#""\u0041\ud83d\ude00\u00E9""#.to_owned()),
        Just(r#""\b\f\n\r\t\/""#.to_owned()),
    ];
    let leaf = prop_oneof![
        number,
        string.clone(),
        Just("true".to_owned()),
        Just("false".to_owned()),
        Just("null".to_owned()),
    ];
    let space = prop::sample::select(vec!["", "", " ", "\n\t", "\r "]);
    leaf.prop_recursive(6, 48, 5, move |inner| {
        prop_oneof![
            (prop::collection::vec(inner.clone(), 0..5), space.clone())
                .prop_map(|(items, s)| { format!("[{s}{}{s}]", items.join(&format!("{s},{s}"))) }),
            (
                prop::collection::vec((prop::sample::select(vec!["a", "b", "", "ü"]), inner), 0..5),
                space.clone()
            )
                .prop_map(|(members, s)| {
                    let members: Vec<String> = members
                        .into_iter()
                        .map(|(k, v)| format!("{s}\"{k}\"{s}:{s}{v}"))
                        .collect();
                    format!("{{{}{s}}}", members.join(","))
                }),
        ]
    })
}

/// A document, then maybe cut short or with a few bytes replaced by JSON-ish ones.
fn any_input() -> impl Strategy<Value = Vec<u8>> {
    let edits = prop::collection::vec(
        (
            any::<prop::sample::Index>(),
            prop::sample::select(b"{}[]:,\"\\ u0-e.19tfnx\xff\xc3d8Dc".to_vec()),
        ),
        0..4,
    );
    prop_oneof![
        any_document().prop_map(String::into_bytes),
        (any_document(), edits, any::<Option<prop::sample::Index>>()).prop_map(
            |(doc, edits, cut)| {
                let mut bytes = doc.into_bytes();
                if !bytes.is_empty() {
                    for (at, b) in edits {
                        let at = at.index(bytes.len());
                        bytes[at] = b;
                    }
                }
                if let Some(cut) = cut {
                    bytes.truncate(cut.index(bytes.len() + 1));
                }
                bytes
            }
        ),
        prop::collection::vec(any::<u8>(), 0..64),
    ]
}

/// Never panics; agrees with the serde_json-based conversion wherever that one takes the
/// document, and refuses only what it refuses too, apart from lone surrogates.
fn check(bytes: &[u8]) -> Result<(), TestCaseError> {
    let ours = parse(bytes, "json", 0);
    match serde_oracle(bytes) {
        // Every number is checked, also one that a later duplicate key replaces.
        Ok(_) if matches!(&ours, Err(e) if e.problem() == "number exponent out of range") => {}
        Ok(expected) => prop_assert_eq!(ours, Ok(expected)),
        Err(e) if e.problem() == "number exponent out of range" => {
            prop_assert!(ours.is_err());
        }
        Err(_) => {
            if let Ok(v) = ours {
                // serde_json refuses lone surrogates; we read them as U+FFFD (which a later
                // duplicate key may have replaced since).
                prop_assert!(bytes.windows(2).any(|w| w == b"\\u"), "{}", v);
            }
        }
    }
    Ok(())
}

proptest! {
    #[test]
    fn documents_agree_with_serde_json(text in any_document()) {
        check(text.as_bytes())?;
        // As jsonb: the same, for documents already in normal form (all but those with a
        // number `numeric` refuses).
        if let Ok(normal) = serde_oracle(text.as_bytes()) {
            let normal = normal.to_string();
            prop_assert_eq!(parse(normal.as_bytes(), "jsonb", 0), serde_oracle(normal.as_bytes()));
        }
    }

    #[test]
    fn any_input_is_taken_or_refused_without_panic(bytes in any_input()) {
        check(&bytes)?;
    }
}

fn fuzz_cases() -> u32 {
    std::env::var("STREAMEX_FUZZ_CASES")
        .ok()
        .and_then(|v| v.trim().replace('_', "").parse().ok())
        .unwrap_or(1_000_000)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: fuzz_cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Long-running fuzzing on demand:
    /// `STREAMEX_FUZZ_CASES=5000000 cargo test --lib fuzz_json_long -- --ignored`.
    #[test]
    #[ignore = "long-running fuzzing; run on demand with --ignored"]
    fn fuzz_json_long(bytes in any_input()) {
        check(&bytes)?;
    }
}
