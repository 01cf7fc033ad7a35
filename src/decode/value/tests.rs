use std::sync::Arc;

use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::decode::value_error::{MAX_VALUE_DEPTH, TOO_DEEP};

/// Parses the expected JSON text (numbers keep their exact text).
fn j(text: &str) -> Value {
    serde_json::from_str(text).unwrap()
}

fn conv(ty: &PgType, text: &str) -> Value {
    text_to_json(ty, text.as_bytes()).unwrap_or_else(|e| panic!("{text:?}: {e}"))
}

fn err(ty: &PgType, text: &[u8]) -> ValueError {
    match text_to_json(ty, text) {
        Ok(v) => panic!("{:?} converted to {v}", String::from_utf8_lossy(text)),
        Err(e) => e,
    }
}

fn array_of(element: PgType) -> PgType {
    PgType::Array {
        element: Arc::new(element),
        delimiter: b',',
    }
}

fn composite_of(fields: &[(&str, PgType)]) -> PgType {
    PgType::Composite {
        fields: fields
            .iter()
            .map(|(n, t)| ((*n).to_owned(), Arc::new(t.clone())))
            .collect(),
    }
}

/// Number text must compare exactly, not as floats.
fn number_text(v: &Value) -> &str {
    match v {
        Value::Number(n) => n.as_str(),
        other => panic!("not a number: {other}"),
    }
}

#[test]
fn bool_is_t_or_f() {
    assert_eq!(conv(&PgType::Bool, "t"), json!(true));
    assert_eq!(conv(&PgType::Bool, "f"), json!(false));
    for bad in ["true", "", "T", "1"] {
        assert_eq!(
            err(&PgType::Bool, bad.as_bytes()).to_string(),
            "bool: expected t or f"
        );
    }
}

#[test]
fn integers_and_numerics_keep_their_digits() {
    for (text, expected) in [
        ("0", "0"),
        ("-42", "-42"),
        ("9223372036854775807", "9223372036854775807"),
        ("1.50", "1.50"),
        ("-0.001", "-0.001"),
        (
            "12345678901234567890.123456789012345678901234567890",
            "12345678901234567890.123456789012345678901234567890",
        ),
    ] {
        assert_eq!(
            number_text(&conv(&PgType::Number, text)),
            expected,
            "{text}"
        );
    }
}

#[test]
fn floats_are_written_as_numeric_writes_them() {
    for (text, expected) in [
        ("1.5e+20", "150000000000000000000"),
        ("1e-07", "0.0000001"),
        ("1e+16", "10000000000000000"),
        ("-1.25e-05", "-0.0000125"),
        (
            "1.7976931348623157e+308",
            &format!("17976931348623157{}", "0".repeat(292)),
        ),
        ("-0", "0"),
        ("0.1", "0.1"),
        ("123.456", "123.456"),
        ("1.23456e+3", "1234.56"),
        ("1.5E2", "150"),
        ("5e-0", "5"),
    ] {
        assert_eq!(
            number_text(&conv(&PgType::Number, text)),
            expected,
            "{text}"
        );
    }
}

#[test]
fn numeric_negative_zero_loses_its_sign() {
    assert_eq!(number_text(&conv(&PgType::Number, "-0.00")), "0.00");
}

#[test]
fn integers_either_side_of_the_fast_path_keep_their_text() {
    for text in [
        "0",
        "-0",
        "7",
        "-7",
        "999999999999999999",
        "-999999999999999999",
        "1000000000000000000",
        "9223372036854775807",
        "-9223372036854775808",
        "9223372036854775808",
        "123456789012345678901234567890",
    ] {
        let expected = if text == "-0" { "0" } else { text };
        assert_eq!(
            number_text(&conv(&PgType::Number, text)),
            expected,
            "{text}"
        );
    }
}

#[test]
fn the_common_shapes_are_kept_as_text_and_the_others_converted_at_once() {
    for (ty, text, kind) in [
        (PgType::Number, "42", Some(Raw::Number)),
        (PgType::Number, "-7.250", Some(Raw::Number)),
        (PgType::Number, "0.000", Some(Raw::Number)),
        (PgType::Number, "1e+100", None),
        (PgType::Number, "-0", None),
        (PgType::Number, "0", Some(Raw::Number)),
        (PgType::Number, "-120", Some(Raw::Number)),
        (PgType::Number, "007", None),
        (PgType::Number, "-", None),
        (PgType::Number, "12a", None),
        (PgType::Number, "NaN", None),
        (PgType::Text, "héllo \"x\"", Some(Raw::Text)),
        (PgType::Date, "2024-01-02", Some(Raw::Text)),
        (
            PgType::Timestamp,
            "2024-01-02 03:04:05.5",
            Some(Raw::Timestamp),
        ),
        (
            PgType::TimestampTz,
            "2024-01-02 03:04:05-08",
            Some(Raw::TimestampTz),
        ),
        (PgType::TimestampTz, "2024-01-02 03:04:05+05:30", None),
        (PgType::Bool, "t", None),
        (PgType::Jsonb, "{}", None),
        (array_of(PgType::Text), "{a}", None),
    ] {
        assert_eq!(raw_kind(&ty, text.as_bytes()), kind, "{ty:?} {text}");
    }
    assert_eq!(raw_kind(&PgType::Text, b"\xff"), None);
}

#[test]
fn the_usual_timestamp_shapes_take_the_short_way() {
    for (text, with_zone) in [
        ("2024-01-02 03:04:05.123456+00", true),
        ("2024-01-02 03:04:05-08", true),
        ("2024-01-02 03:04:05.5", false),
    ] {
        assert!(
            super::is_usual_timestamp(text.as_bytes(), with_zone),
            "{text}"
        );
    }
    for (text, with_zone) in [
        ("2024-01-02 03:04:05+05:30", true),
        ("0044-03-15 12:00:00+00 BC", true),
        ("12024-01-02 03:04:05+00", true),
        ("2024-01-02 03:04:05 BC", false),
    ] {
        assert!(
            !super::is_usual_timestamp(text.as_bytes(), with_zone),
            "{text}"
        );
    }
}

#[test]
fn special_numbers_are_strings() {
    assert_eq!(conv(&PgType::Number, "NaN"), json!("NaN"));
    assert_eq!(conv(&PgType::Number, "Infinity"), json!("Infinity"));
    assert_eq!(conv(&PgType::Number, "-Infinity"), json!("-Infinity"));
}

#[test]
fn malformed_numbers_are_errors() {
    for bad in [
        "", "-", "+1", "1.", ".5", "01", "1e", "1e+", "abc", "1 ", " 1", "nan", "inf", "1..2",
        "0x10", "1e1001",
    ] {
        let e = err(&PgType::Number, bad.as_bytes());
        assert_eq!(e.type_name(), "number", "{bad:?}");
    }
    assert_eq!(
        err(&PgType::Number, b"1e99999999999").to_string(),
        "number: number exponent out of range"
    );
}

#[test]
fn jsonb_is_parsed() {
    assert_eq!(
        conv(&PgType::Jsonb, r#"{"a": [1, {"b": null}], "c": "x\"y"}"#),
        json!({"a": [1, {"b": null}], "c": "x\"y"})
    );
    assert_eq!(conv(&PgType::Jsonb, "\"s\""), json!("s"));
    assert_eq!(conv(&PgType::Jsonb, "null"), Value::Null);
    assert_eq!(
        err(&PgType::Jsonb, b"{").to_string(),
        "jsonb: invalid json syntax"
    );
}

#[test]
fn json_is_normalised_like_jsonb() {
    let v = conv(
        &PgType::Json,
        r#"{"a":1,"a":2,"b":1e2,"c":-0,"d":-0.0,"e":1.0E+2,"f":1.5e-3,"g":[1,{"x":null}],"h":1.50}"#,
    );
    assert_eq!(
        v,
        j(r#"{"a":2,"b":100,"c":0,"d":0.0,"e":100,"f":0.0015,"g":[1,{"x":null}],"h":1.50}"#)
    );
    assert_eq!(number_text(&v["f"]), "0.0015");
    assert_eq!(number_text(&v["d"]), "0.0");
    assert_eq!(
        conv(&PgType::Json, "\"\\u00e9\\ud83d\\ude00\""),
        json!("é😀")
    );
    assert_eq!(
        err(&PgType::Json, b"{\"a\":}").to_string(),
        "json: invalid json syntax"
    );
    assert_eq!(
        err(&PgType::Json, b"[1e2000]").to_string(),
        "json: number exponent out of range"
    );
}

#[test]
fn the_depth_limit_counts_the_arrays_and_composites_around_a_document() {
    let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let jsonb_array = array_of(PgType::Jsonb);
    // The array's own level, then the document's.
    let ok = format!("{{\"{}\"}}", nested(MAX_VALUE_DEPTH - 1));
    assert!(text_to_json(&jsonb_array, ok.as_bytes()).is_ok());
    let deep = format!("{{\"{}\"}}", nested(MAX_VALUE_DEPTH));
    assert_eq!(
        err(&jsonb_array, deep.as_bytes()).to_string(),
        format!("jsonb: {TOO_DEEP}")
    );
    let in_composite = composite_of(&[("doc", PgType::Json)]);
    let ok = format!("(\"{}\")", nested(MAX_VALUE_DEPTH - 1));
    assert!(text_to_json(&in_composite, ok.as_bytes()).is_ok());
    let deep = format!("(\"{}\")", nested(MAX_VALUE_DEPTH));
    assert_eq!(err(&in_composite, deep.as_bytes()).type_name(), "json");
    assert_eq!(
        conv(&PgType::Jsonb, &nested(MAX_VALUE_DEPTH)).to_string(),
        nested(MAX_VALUE_DEPTH)
    );
}

/// What every stage does with a value (clone, compare, serialise, debug-print, drop)
/// works at twice [`MAX_VALUE_DEPTH`] on a thread with tokio's 2 MiB worker stack, in the
/// build under test, whether the value nests objects or arrays: half of the margin the
/// constant's measurements give is kept checked.
#[test]
fn values_at_twice_the_limit_are_safe_on_a_small_stack() {
    fn nested(depth: usize, objects: bool) -> Value {
        let mut v = json!("leaf");
        for _ in 0..depth {
            v = if objects {
                json!({ "k": v })
            } else {
                json!([v])
            };
        }
        v
    }
    let worker = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(|| {
            for objects in [true, false] {
                let v = nested(2 * MAX_VALUE_DEPTH, objects);
                let copy = v.clone();
                assert!(copy == v);
                let text = serde_json::to_string(&v).unwrap();
                assert_eq!(serde_json::to_value(&v).unwrap(), copy);
                assert!(format!("{v:?}").len() > text.len());
                drop(copy);
                drop(v);
            }
        })
        .unwrap();
    worker.join().expect("no stack overflow");
}

#[test]
fn dates_are_strings_as_written() {
    assert_eq!(conv(&PgType::Date, "2024-01-02"), json!("2024-01-02"));
    assert_eq!(conv(&PgType::Date, "0044-03-15 BC"), json!("0044-03-15 BC"));
    assert_eq!(conv(&PgType::Date, "infinity"), json!("infinity"));
    assert_eq!(conv(&PgType::Date, "-infinity"), json!("-infinity"));
    assert_eq!(
        err(&PgType::Date, b"\xff").to_string(),
        "date: invalid utf-8"
    );
}

#[test]
fn timestamps_get_a_t() {
    let ts = PgType::Timestamp;
    assert_eq!(
        conv(&ts, "2024-01-02 03:04:05"),
        json!("2024-01-02T03:04:05")
    );
    assert_eq!(
        conv(&ts, "2024-01-02 03:04:05.123456"),
        json!("2024-01-02T03:04:05.123456")
    );
    assert_eq!(
        conv(&ts, "0044-03-15 12:00:01.5 BC"),
        json!("0044-03-15T12:00:01.5 BC")
    );
    assert_eq!(
        conv(&ts, "10000-01-01 00:00:00"),
        json!("10000-01-01T00:00:00")
    );
    assert_eq!(conv(&ts, "infinity"), json!("infinity"));
    assert_eq!(conv(&ts, "-infinity"), json!("-infinity"));
    assert_eq!(
        err(&ts, b"2024-01-02").to_string(),
        "timestamp: missing time part"
    );
    assert_eq!(err(&ts, "2024-01-02 é".as_bytes()).type_name(), "timestamp");
}

#[test]
fn timestamptz_offsets_get_minutes() {
    let tz = PgType::TimestampTz;
    assert_eq!(
        conv(&tz, "2024-01-02 03:04:05+00"),
        json!("2024-01-02T03:04:05+00:00")
    );
    assert_eq!(
        conv(&tz, "2024-01-02 03:04:05.12-05"),
        json!("2024-01-02T03:04:05.12-05:00")
    );
    assert_eq!(
        conv(&tz, "2024-01-02 03:04:05+05:30"),
        json!("2024-01-02T03:04:05+05:30")
    );
    assert_eq!(
        conv(&tz, "1850-01-02 03:04:05+00:53:28"),
        json!("1850-01-02T03:04:05+00:53:28")
    );
    assert_eq!(
        conv(&tz, "0044-03-15 12:00:01.5+00 BC"),
        json!("0044-03-15T12:00:01.5+00:00 BC")
    );
    assert_eq!(conv(&tz, "infinity"), json!("infinity"));
    assert_eq!(
        err(&tz, b"2024-01-02 03:04:05").to_string(),
        "timestamptz: missing utc offset"
    );
}

#[test]
fn text_is_a_string_of_the_output() {
    for text in [
        "",
        "ab   ",
        "\\x0102",
        "1 year 2 mons",
        "$12.50",
        "[1,5)",
        "héllo 😀",
        "NULL",
    ] {
        assert_eq!(conv(&PgType::Text, text), json!(text));
    }
    assert_eq!(
        err(&PgType::Text, b"a\xffb").to_string(),
        "text: invalid utf-8"
    );
}

#[test]
fn arrays_of_scalars() {
    let ints = array_of(PgType::Number);
    assert_eq!(conv(&ints, "{1,2,3}"), json!([1, 2, 3]));
    assert_eq!(conv(&ints, "{}"), json!([]));
    assert_eq!(conv(&ints, "{{1,2},{3,4}}"), json!([[1, 2], [3, 4]]));
    assert_eq!(conv(&ints, "{{{1},{2}}}"), json!([[[1], [2]]]));
    assert_eq!(conv(&ints, "[0:2]={1,2,3}"), json!([1, 2, 3]));
    assert_eq!(conv(&ints, "[1:1][-1:0]={{1,2}}"), json!([[1, 2]]));
    assert_eq!(
        conv(&ints, "{NULL,null,Null,1}"),
        json!([null, null, null, 1])
    );
    assert_eq!(conv(&ints, " { 1 , 2 } "), json!([1, 2]));
    let floats = array_of(PgType::Number);
    assert_eq!(conv(&floats, "{1e-07,NaN}"), j(r#"[0.0000001,"NaN"]"#));
}

#[test]
fn arrays_of_text_unquote_and_unescape() {
    let texts = array_of(PgType::Text);
    assert_eq!(
        conv(
            &texts,
            r#"{"NULL",NULL,"",a,"a,b","{x}","q\"q","b\\s"," sp "}"#
        ),
        json!(["NULL", null, "", "a", "a,b", "{x}", "q\"q", "b\\s", " sp "])
    );
    assert_eq!(conv(&texts, r#"{héllo,"😀 x"}"#), json!(["héllo", "😀 x"]));
    assert_eq!(conv(&texts, r"{a\,b,c\\}"), json!(["a,b", "c\\"]));
    assert_eq!(
        conv(&texts, "{{a,b},{c,NULL}}"),
        json!([["a", "b"], ["c", null]])
    );
}

#[test]
fn arrays_use_the_element_delimiter() {
    let boxes = PgType::Array {
        element: Arc::new(PgType::Text),
        delimiter: b';',
    };
    assert_eq!(
        conv(&boxes, "{(2,2),(0,0);(1,1),(0,0)}"),
        json!(["(2,2),(0,0)", "(1,1),(0,0)"])
    );
}

#[test]
fn arrays_convert_elements_by_their_type() {
    assert_eq!(
        conv(
            &array_of(PgType::Timestamp),
            r#"{"2024-01-02 03:04:05",NULL}"#
        ),
        json!(["2024-01-02T03:04:05", null])
    );
    assert_eq!(
        conv(&array_of(PgType::Json), r#"{"{\"a\": 1e2}","[1, 2]",NULL}"#),
        json!([{"a": 100}, [1, 2], null])
    );
    assert_eq!(conv(&array_of(PgType::Bool), "{t,f}"), json!([true, false]));
    let pairs = array_of(composite_of(&[("a", PgType::Number), ("b", PgType::Text)]));
    assert_eq!(
        conv(&pairs, r#"{"(1,x)","(2,\"y z\")",NULL}"#),
        json!([{"a": 1, "b": "x"}, {"a": 2, "b": "y z"}, null])
    );
}

#[test]
fn malformed_arrays_are_errors() {
    let ints = array_of(PgType::Number);
    for (bad, problem) in [
        ("", "missing opening brace"),
        ("1,2", "missing opening brace"),
        ("{1,2", "unbalanced braces"),
        ("{{1,2}", "unbalanced braces"),
        ("{1,2}}", "text after the closing brace"),
        ("{1,{2}}", "mixed elements and sub-arrays"),
        ("{1,,2}", "empty element"),
        ("{\"1}", "unterminated quoted string"),
        ("{1\\", "backslash at end of text"),
        ("{\"1\"x}", "expected a delimiter or closing brace"),
        ("[1:2]{1,2}", "dimension bounds without '='"),
        ("[a]={1}", "malformed dimension bounds"),
        ("{{{{{{{1}}}}}}}", "too many dimensions"),
    ] {
        assert_eq!(
            err(&ints, bad.as_bytes()).to_string(),
            format!("array: {problem}"),
            "{bad:?}"
        );
    }
    assert_eq!(
        err(&ints, b"{1,x}").to_string(),
        "number: invalid number syntax"
    );
    assert_eq!(
        err(&array_of(PgType::Text), b"{\"\xff\"}").to_string(),
        "text: invalid utf-8"
    );
}

#[test]
fn composites_become_objects() {
    let ty = composite_of(&[
        ("id", PgType::Number),
        ("name", PgType::Text),
        ("note", PgType::Text),
    ]);
    assert_eq!(
        conv(&ty, r#"(1,"a b",)"#),
        json!({"id": 1, "name": "a b", "note": null})
    );
    assert_eq!(
        conv(&ty, r#"(,"",x)"#),
        json!({"id": null, "name": "", "note": "x"})
    );
    assert_eq!(
        conv(&ty, r#"(2,"say ""hi""","back\\slash, (paren)")"#),
        json!({"id": 2, "name": "say \"hi\"", "note": "back\\slash, (paren)"})
    );
    // record_in also takes backslash escapes and quotes in the middle of a field.
    assert_eq!(
        conv(&ty, r#"(3,a\,b,x"y z"w)"#),
        json!({"id": 3, "name": "a,b", "note": "xy zw"})
    );
}

#[test]
fn composites_nest() {
    let inner = composite_of(&[("x", PgType::Number), ("t", PgType::Timestamp)]);
    let outer = composite_of(&[
        ("inner", inner),
        ("tags", array_of(PgType::Text)),
        ("doc", PgType::Jsonb),
    ]);
    assert_eq!(
        conv(
            &outer,
            r#"("(1,""2024-01-02 03:04:05"")","{a,""b c""}","{""k"": [1, 2]}")"#
        ),
        json!({
            "inner": {"x": 1, "t": "2024-01-02T03:04:05"},
            "tags": ["a", "b c"],
            "doc": {"k": [1, 2]}
        })
    );
    assert_eq!(
        conv(&outer, "(,,)"),
        json!({"inner": null, "tags": null, "doc": null})
    );
    assert_eq!(conv(&composite_of(&[]), "()"), json!({}));
    assert_eq!(
        conv(&composite_of(&[("a", PgType::Text)]), "()"),
        json!({"a": null})
    );
}

#[test]
fn malformed_composites_are_errors() {
    let ty = composite_of(&[("a", PgType::Number), ("b", PgType::Text)]);
    for (bad, problem) in [
        ("", "missing opening parenthesis"),
        ("1,2", "missing opening parenthesis"),
        ("(1,2", "missing closing parenthesis"),
        ("(1)", "fewer fields than the type has"),
        ("(1,2,3)", "more fields than the type has"),
        ("(1,\"2)", "unterminated quoted string"),
        ("(1,2\\", "backslash at end of text"),
        ("(1,2)x", "text after the closing parenthesis"),
    ] {
        assert_eq!(
            err(&ty, bad.as_bytes()).to_string(),
            format!("composite: {problem}"),
            "{bad:?}"
        );
    }
    assert_eq!(
        err(&composite_of(&[]), b"(1)").to_string(),
        "composite: more fields than the type has"
    );
    assert_eq!(
        err(&ty, b"(x,2)").to_string(),
        "number: invalid number syntax"
    );
}

#[test]
fn errors_never_contain_the_value() {
    let secret = "s3cr3t-v4lue";
    let types = [
        PgType::Bool,
        PgType::Number,
        PgType::Json,
        PgType::Jsonb,
        PgType::Timestamp,
        PgType::TimestampTz,
        array_of(PgType::Number),
        composite_of(&[("a", PgType::Number)]),
    ];
    for ty in &types {
        for text in [
            secret.to_owned(),
            format!("{{{secret}}}"),
            format!("({secret})"),
        ] {
            if let Err(e) = text_to_json(ty, text.as_bytes()) {
                assert!(!e.to_string().contains("s3cr3t"), "{ty:?}: {e}");
            }
        }
    }
}

fn any_type() -> impl Strategy<Value = PgType> {
    let leaf = prop_oneof![
        Just(PgType::Bool),
        Just(PgType::Number),
        Just(PgType::Json),
        Just(PgType::Jsonb),
        Just(PgType::Date),
        Just(PgType::Timestamp),
        Just(PgType::TimestampTz),
        Just(PgType::Text),
    ];
    leaf.prop_recursive(3, 12, 4, |inner| {
        prop_oneof![
            (inner.clone(), prop_oneof![Just(b','), Just(b';')]).prop_map(|(e, d)| {
                PgType::Array {
                    element: Arc::new(e),
                    delimiter: d,
                }
            }),
            prop::collection::vec(inner, 0..4).prop_map(|fields| PgType::Composite {
                fields: fields
                    .into_iter()
                    .enumerate()
                    .map(|(i, t)| (format!("f{i}"), Arc::new(t)))
                    .collect(),
            }),
        ]
    })
}

/// Bytes that look like PostgreSQL text output often enough to reach deep into the parsers.
fn text_like() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..48),
        prop::collection::vec(
            prop::sample::select(
                b"{}()[]:=,;\"\\ \tNULLnul0123456789.-+eETtfaZ:x\xff\xc3".to_vec()
            ),
            0..48
        ),
    ]
}

/// Writes an array element as `array_out` does.
fn array_out_element(out: &mut String, element: Option<&str>, delimiter: char) {
    let Some(element) = element else {
        out.push_str("NULL");
        return;
    };
    let quote = element.is_empty()
        || element.eq_ignore_ascii_case("NULL")
        || element
            .chars()
            .any(|c| matches!(c, '"' | '\\' | '{' | '}') || c == delimiter || is_space_char(c));
    if !quote {
        out.push_str(element);
        return;
    }
    out.push('"');
    for c in element.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// Writes a composite field as `record_out` does.
fn record_out_field(out: &mut String, field: Option<&str>) {
    let Some(field) = field else { return };
    let quote = field.is_empty()
        || field
            .chars()
            .any(|c| matches!(c, '"' | '\\' | '(' | ')' | ',') || is_space_char(c));
    if !quote {
        out.push_str(field);
        return;
    }
    out.push('"');
    for c in field.chars() {
        if c == '"' || c == '\\' {
            out.push(c);
        }
        out.push(c);
    }
    out.push('"');
}

fn is_space_char(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\u{b}' | '\u{c}' | '\r')
}

/// Text that loves the characters arrays and records treat specially.
fn tricky_text() -> impl Strategy<Value = Option<String>> {
    prop::option::weighted(
        0.85,
        prop_oneof![
            "[a-z{}(),;\"\\\\ \t\nNULnul😀é]{0,8}",
            Just("NULL".to_owned()),
            Just(String::new()),
        ],
    )
}

proptest! {
    #[test]
    fn text_arrays_round_trip(items in prop::collection::vec(tricky_text(), 0..6), semicolon in any::<bool>()) {
        let delimiter = if semicolon { ';' } else { ',' };
        let mut text = String::from("{");
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                text.push(delimiter);
            }
            array_out_element(&mut text, item.as_deref(), delimiter);
        }
        text.push('}');
        let ty = PgType::Array { element: Arc::new(PgType::Text), delimiter: u8::try_from(delimiter).unwrap() };
        prop_assert_eq!(text_to_json(&ty, text.as_bytes()).unwrap(), json!(items));
    }

    #[test]
    fn composites_of_arrays_round_trip(
        rows in prop::collection::vec((tricky_text(), prop::option::of(prop::collection::vec(tricky_text(), 0..4))), 0..4)
    ) {
        // An array of (name text, tags text[]): records inside array elements inside records.
        let mut text = String::from("{");
        let mut expected = Vec::new();
        for (i, (name, tags)) in rows.iter().enumerate() {
            let tags_text = tags.as_ref().map(|tags| {
                let mut t = String::from("{");
                for (j, tag) in tags.iter().enumerate() {
                    if j > 0 {
                        t.push(',');
                    }
                    array_out_element(&mut t, tag.as_deref(), ',');
                }
                t.push('}');
                t
            });
            let mut record = String::from("(");
            record_out_field(&mut record, name.as_deref());
            record.push(',');
            record_out_field(&mut record, tags_text.as_deref());
            record.push(')');
            if i > 0 {
                text.push(',');
            }
            array_out_element(&mut text, Some(&record), ',');
            expected.push(json!({"name": name, "tags": tags}));
        }
        text.push('}');
        let ty = array_of(composite_of(&[("name", PgType::Text), ("tags", array_of(PgType::Text))]));
        prop_assert_eq!(text_to_json(&ty, text.as_bytes()).unwrap(), Value::Array(expected));
    }

    #[test]
    fn the_usual_timestamp_shape_converts_as_any_other(
        text in "[0-9]{4,5}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,6})?([+-][0-9]{2}(:[0-9]{2}){0,2})?( BC)?",
        with_zone in any::<bool>(),
    ) {
        let kind = if with_zone { Raw::TimestampTz } else { Raw::Timestamp };
        let any = super::any_timestamp(text.as_bytes(), with_zone).ok();
        if super::is_usual_timestamp(text.as_bytes(), with_zone) {
            prop_assert_eq!(Some(kind.to_value(text.as_bytes())), any, "{}", text);
        }
    }

    /// A value kept as its text never fails to convert, and reads and is written as JSON
    /// exactly as its conversion.
    #[test]
    fn a_value_kept_as_text_reads_and_writes_as_converted(
        (ty, text) in prop_oneof![
            (Just(PgType::Number), "-?(0|[1-9][0-9]{0,24})(\\.[0-9]{1,8})?([eE][+-]?[0-9]{1,4})?"),
            (Just(PgType::Number), "[-0-9.eE+NaInfity]{1,12}"),
            (Just(PgType::Timestamp), "[0-9]{4,5}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,6})?( BC)?"),
            (Just(PgType::TimestampTz), "[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,6})?[+-][0-9]{2}(:[0-9]{2}){0,2}( BC)?"),
            (Just(PgType::Date), "[0-9]{4}-[0-9]{2}-[0-9]{2}( BC)?|infinity"),
            (Just(PgType::Text), "\\PC{0,20}"),
            (Just(PgType::Text), "[\"\\\\\n\t\u{1}\u{7f}é€😀a ]{0,12}"),
        ],
    ) {
        let converted = text_to_json(&ty, text.as_bytes());
        let Some(kind) = raw_kind(&ty, text.as_bytes()) else {
            return Ok(());
        };
        let expected = converted.map_err(|e| TestCaseError::fail(format!("{text:?} kept as {kind:?}: {e}")))?;
        let columns = crate::event::Names::shared(vec!["c".into()]);
        let mut record = crate::event::Record::of(&columns);
        record.set_raw(0, kind, text.as_bytes());
        let mut json = Vec::new();
        record.peek_at(0).unwrap().write_json(&mut json);
        prop_assert_eq!(json, serde_json::to_vec(&expected).unwrap(), "{:?}", text);
        prop_assert_eq!(record.get("c"), Some(&expected), "{:?}", text);
        prop_assert_eq!(record.remove("c"), Some(expected));
    }

    #[test]
    fn never_panics(ty in any_type(), text in text_like()) {
        let _ = text_to_json(&ty, &text);
    }

    #[test]
    fn canonical_numbers_are_kept(n in any::<i64>(), frac in "[0-9]{0,12}") {
        let text = if frac.is_empty() { n.to_string() } else { format!("{n}.{frac}") };
        let v = text_to_json(&PgType::Number, text.as_bytes()).unwrap();
        prop_assert_eq!(number_text(&v), text.as_str());
    }

    #[test]
    fn floats_match_their_plain_decimal(x in any::<f64>().prop_filter("finite", |x| x.is_finite())) {
        // Rust's `{:e}` is a shortest round-trip form like float8out's; the result, read as
        // a decimal, must denote the same value.
        let text = format!("{x:e}");
        let v = text_to_json(&PgType::Number, text.as_bytes()).unwrap();
        let plain = number_text(&v);
        prop_assert!(!plain.contains(['e', 'E']));
        prop_assert_eq!(plain.parse::<f64>().unwrap(), if x == 0.0 { 0.0 } else { x });
    }
}
