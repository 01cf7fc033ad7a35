//! `json` and `jsonb` text → [`Value`], for column values.
//!
//! Our own parser, not serde_json's, because it must take every document PostgreSQL takes:
//!
//! - **No recursion.** Nesting is tracked on an explicit stack of open arrays and objects, so a
//!   document of any depth costs heap, never call stack. serde_json refuses more than 128
//!   levels; PostgreSQL keeps thousands. Depth is still limited, to
//!   [`MAX_VALUE_DEPTH`] for the whole column value (see there why): beyond it the document
//!   is an error, which the decoder reports in the event's `decode_error`.
//! - **Lone surrogates.** `json` keeps its text verbatim, so `"\ud800"` (a high surrogate
//!   escape with no low one after it, or a low one alone) is a valid `json` value; a Rust
//!   string cannot hold it, so it becomes U+FFFD REPLACEMENT CHARACTER. A valid pair becomes
//!   its character, `\u0000` the NUL character.
//! - **`jsonb` semantics for `json`.** The last of duplicate keys wins (at the place of the
//!   first, as serde_json's map does), and numbers are rewritten as `numeric` writes them
//!   (`1e2` → `100`, `-0` → `0`), through the same code as number columns. `jsonb` text comes
//!   from the server already in that form.
//!
//! The grammar is RFC 8259's, as PostgreSQL's own lexer reads it: white space is space, tab,
//! line feed and carriage return; control characters inside strings must be escaped. Any input
//! outside it is an error, never a panic: every read checks the length first, and the text is
//! checked to be UTF-8 once, up front, so that slices taken between ASCII bytes are UTF-8 too.

use serde_json::{Map, Value};

use super::value::{MAX_VALUE_DEPTH, NumberParts, TOO_DEEP, ValueError, numeric_value};

/// An array or object whose closing bracket has not been read yet.
enum Open {
    Array(Vec<Value>),
    /// The members so far, and the key whose value is being read.
    Object(Map<String, Value>, String),
}

/// Parses one `json` or `jsonb` document (`type_name` names it in errors). `outer` is how many
/// arrays and objects already hold it (it is an element of an array column or a field of a
/// composite), so that the whole column value stays within [`MAX_VALUE_DEPTH`].
pub(super) fn parse(
    text: &[u8],
    type_name: &'static str,
    outer: usize,
) -> Result<Value, ValueError> {
    parse_within(text, type_name, MAX_VALUE_DEPTH.saturating_sub(outer))
}

/// [`parse`] with room for `room` arrays and objects, one inside the other.
pub(super) fn parse_within(
    text: &[u8],
    type_name: &'static str,
    room: usize,
) -> Result<Value, ValueError> {
    let text =
        std::str::from_utf8(text).map_err(|_| ValueError::new(type_name, "invalid utf-8"))?;
    let mut p = Parser {
        text,
        bytes: text.as_bytes(),
        pos: 0,
        type_name,
    };
    let mut open: Vec<Open> = Vec::new();
    'value: loop {
        p.skip_space();
        let mut value = match p.bump() {
            Some(b'[') => {
                if open.len() >= room {
                    return Err(ValueError::new(type_name, TOO_DEEP));
                }
                p.skip_space();
                if p.eat(b']') {
                    Value::Array(Vec::new())
                } else {
                    open.push(Open::Array(Vec::new()));
                    continue 'value;
                }
            }
            Some(b'{') => {
                if open.len() >= room {
                    return Err(ValueError::new(type_name, TOO_DEEP));
                }
                p.skip_space();
                if p.eat(b'}') {
                    Value::Object(Map::new())
                } else {
                    let key = p.key()?;
                    open.push(Open::Object(Map::new(), key));
                    continue 'value;
                }
            }
            Some(b'"') => Value::String(p.string()?),
            Some(b't') => p.literal(b"rue", Value::Bool(true))?,
            Some(b'f') => p.literal(b"alse", Value::Bool(false))?,
            Some(b'n') => p.literal(b"ull", Value::Null)?,
            Some(b'-' | b'0'..=b'9') => p.number()?,
            _ => return Err(p.syntax()),
        };
        // A value is complete: put it in the array or object holding it, and close every one
        // that ends right after it.
        loop {
            let Some(innermost) = open.last_mut() else {
                p.skip_space();
                return if p.pos == p.bytes.len() {
                    Ok(value)
                } else {
                    Err(p.syntax())
                };
            };
            match innermost {
                Open::Array(items) => {
                    items.push(value);
                    p.skip_space();
                    match p.bump() {
                        Some(b',') => continue 'value,
                        Some(b']') => {}
                        _ => return Err(p.syntax()),
                    }
                }
                Open::Object(members, key) => {
                    members.insert(std::mem::take(key), value);
                    p.skip_space();
                    match p.bump() {
                        Some(b',') => {
                            p.skip_space();
                            *key = p.key()?;
                            continue 'value;
                        }
                        Some(b'}') => {}
                        _ => return Err(p.syntax()),
                    }
                }
            }
            value = match open.pop() {
                Some(Open::Array(items)) => Value::Array(items),
                Some(Open::Object(members, _)) => Value::Object(members),
                None => return Err(p.syntax()), // `last_mut` just found one
            };
        }
    }
}

struct Parser<'a> {
    /// The whole document; `bytes` is the same text.
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
    type_name: &'static str,
}

impl Parser<'_> {
    fn syntax(&self) -> ValueError {
        ValueError::new(self.type_name, "invalid json syntax")
    }

    /// The next byte, consumed.
    fn bump(&mut self) -> Option<u8> {
        let b = *self.bytes.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    /// Consumes `b` if it comes next.
    fn eat(&mut self, b: u8) -> bool {
        let next = self.bytes.get(self.pos) == Some(&b);
        if next {
            self.pos += 1;
        }
        next
    }

    fn skip_space(&mut self) {
        while matches!(self.bytes.get(self.pos), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    /// The rest of `true`, `false` or `null`, whose first letter was read.
    fn literal(&mut self, rest: &[u8], value: Value) -> Result<Value, ValueError> {
        let end = self.pos + rest.len();
        if self.bytes.get(self.pos..end) != Some(rest) {
            return Err(self.syntax());
        }
        self.pos = end;
        Ok(value)
    }

    /// An object key and the colon after it, from the opening quote on.
    fn key(&mut self) -> Result<String, ValueError> {
        if !self.eat(b'"') {
            return Err(self.syntax());
        }
        let key = self.string()?;
        self.skip_space();
        if !self.eat(b':') {
            return Err(self.syntax());
        }
        Ok(key)
    }

    /// A number whose first byte was read, as `numeric` writes it.
    fn number(&mut self) -> Result<Value, ValueError> {
        let start = self.pos - 1;
        while matches!(
            self.bytes.get(self.pos),
            Some(b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
        ) {
            self.pos += 1;
        }
        let token = self
            .bytes
            .get(start..self.pos)
            .ok_or_else(|| self.syntax())?;
        // The scan checks the JSON number grammar exactly (`1-2`, `01`, `1.` are refused).
        let parts = NumberParts::scan(token).ok_or_else(|| self.syntax())?;
        numeric_value(token, &parts, self.type_name)
    }

    /// A string's content and its closing quote; the opening quote was read.
    fn string(&mut self) -> Result<String, ValueError> {
        let mut out = String::new();
        loop {
            let start = self.pos;
            while matches!(self.bytes.get(self.pos), Some(&c) if c != b'"' && c != b'\\' && c >= 0x20)
            {
                self.pos += 1;
            }
            // Both ends are at an ASCII byte or the end of the text: a UTF-8 boundary.
            out.push_str(
                self.text
                    .get(start..self.pos)
                    .ok_or_else(|| self.syntax())?,
            );
            match self.bump() {
                Some(b'"') => return Ok(out),
                Some(b'\\') => {
                    let c = match self.bump() {
                        Some(b'"') => '"',
                        Some(b'\\') => '\\',
                        Some(b'/') => '/',
                        Some(b'b') => '\u{8}',
                        Some(b'f') => '\u{c}',
                        Some(b'n') => '\n',
                        Some(b'r') => '\r',
                        Some(b't') => '\t',
                        Some(b'u') => self.unicode_escape()?,
                        _ => return Err(self.syntax()),
                    };
                    out.push(c);
                }
                // The end of the text, or a control character PostgreSQL would not accept.
                _ => return Err(self.syntax()),
            }
        }
    }

    /// The character of a `\uXXXX` escape whose `\u` was read; a surrogate pair is read whole,
    /// and a lone surrogate becomes U+FFFD.
    fn unicode_escape(&mut self) -> Result<char, ValueError> {
        let unit = self.hex4(self.pos).ok_or_else(|| self.syntax())?;
        self.pos += 4;
        match unit {
            0xD800..=0xDBFF => {
                let low = match self.bytes.get(self.pos..self.pos + 2) {
                    Some(b"\\u") => self.hex4(self.pos + 2),
                    _ => None,
                };
                match low {
                    Some(low @ 0xDC00..=0xDFFF) => {
                        self.pos += 6;
                        let c = 0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00);
                        Ok(char::from_u32(c).unwrap_or(char::REPLACEMENT_CHARACTER))
                    }
                    // Not a pair: what follows is read on its own.
                    _ => Ok(char::REPLACEMENT_CHARACTER),
                }
            }
            0xDC00..=0xDFFF => Ok(char::REPLACEMENT_CHARACTER),
            _ => char::from_u32(unit).ok_or_else(|| self.syntax()),
        }
    }

    /// The four hex digits at `at`, if they are.
    fn hex4(&self, at: usize) -> Option<u32> {
        let digits = self.bytes.get(at..at + 4)?;
        digits
            .iter()
            .try_fold(0u32, |n, &d| Some(n * 16 + char::from(d).to_digit(16)?))
    }
}

#[cfg(test)]
mod tests {
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
        let mut value: Value = serde_json::from_slice(text)
            .map_err(|_| ValueError::new("json", "invalid json syntax"))?;
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
            (0u8..10, "[eE]", "[+-]?", 0u16..1200)
                .prop_map(|(m, e, s, x)| format!("{m}.5{e}{s}{x}")),
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
                (prop::collection::vec(inner.clone(), 0..5), space.clone()).prop_map(
                    |(items, s)| { format!("[{s}{}{s}]", items.join(&format!("{s},{s}"))) }
                ),
                (
                    prop::collection::vec(
                        (prop::sample::select(vec!["a", "b", "", "ü"]), inner),
                        0..5
                    ),
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
}
