//! A column value's text output → the JSON value `to_jsonb` gives for it.
//!
//! pgoutput (protocol v1) sends each value as the text its type's output function writes, in a
//! session with `DateStyle = ISO`, `TimeZone = UTC`, `IntervalStyle = postgres`,
//! `extra_float_digits = 3` and `bytea_output = hex`. [`text_to_json`] turns that text into the
//! JSON value `to_jsonb(row)` gives for the same column with `TimeZone = UTC`: one well-known
//! mapping, checkable against your own database with
//! `SELECT to_jsonb(t) FROM your_table t` (the integration tests do exactly that).
//!
//! | type ([`PgType`])                          | text output                     | JSON                               |
//! |--------------------------------------------|---------------------------------|------------------------------------|
//! | `bool` (`Bool`)                            | `t`, `f`                        | `true`, `false`                    |
//! | `int2`, `int4`, `int8` (`Number`)          | `-42`                           | `-42`                              |
//! | `numeric` (`Number`)                       | `1.50`, `NaN`, `-Infinity`      | `1.50` (every digit), `"NaN"`, `"-Infinity"` |
//! | `float4`, `float8` (`Number`)              | `1.5e+20`, `1e-07`, `-0`, `NaN` | `150000000000000000000`, `0.0000001`, `0`, `"NaN"` (written as `numeric` writes it) |
//! | `json` (`Json`)                            | `{"a":1,"a":1e2}`               | `{"a": 100}` (as `jsonb`: last duplicate key wins, numbers as `numeric`) |
//! | `jsonb` (`Jsonb`)                          | `{"a": [1, null]}`              | `{"a": [1, null]}`                 |
//! | `date` (`Date`)                            | `2024-01-02`, `0044-03-15 BC`, `infinity` | the same, as a string    |
//! | `timestamp` (`Timestamp`)                  | `2024-01-02 03:04:05.5`         | `"2024-01-02T03:04:05.5"` (BC keeps its ` BC` suffix, `infinity` stays) |
//! | `timestamptz` (`TimestampTz`)              | `2024-01-02 03:04:05+00`        | `"2024-01-02T03:04:05+00:00"`      |
//! | `oid`, `text`, `varchar`, `char(n)`, `name`, `"char"`, `uuid`, `time`, `timetz`, `interval`, `bytea`, `money`, `inet`, `bit`, enums, ranges, ... (`Text`) | `\x0102`, `ab   `, `1 day 02:00:00` | the text as a string |
//! | arrays (`Array`)                           | `{{1,NULL},{"a,b",3}}`, `[0:1]={1,2}` | nested arrays of the elements converted by the element type; `NULL` → `null`; bounds dropped; `{}` → `[]` |
//! | composites (`Composite`)                   | `(1,"a b",)`                    | `{"f1": 1, "f2": "a b", "f3": null}` |
//! | domains                                    | as the base type                | as the base type                   |
//!
//! Malformed text gives a [`ValueError`] naming the type and the problem, never the value:
//! values may be secret, and errors end up in logs.
//!
//! # What is not matched
//!
//! - Types from extensions with a cast to `json` (`hstore`, PostGIS `geometry`, ...):
//!   `to_jsonb` calls the cast (`{"a": "1"}` for an hstore), streamex gives the text output as a
//!   string (`"\"a\"=>\"1\""`): the cast runs inside the server and cannot be redone from the
//!   text. Find them with `SELECT castsource::regtype FROM pg_cast WHERE casttarget =
//!   'json'::regtype AND castsource >= 16384 AND castmethod = 'f'`.
//! - Values nested deeper than [`MAX_VALUE_DEPTH`](super::MAX_VALUE_DEPTH) (256) levels of arrays and objects, a
//!   `json` or `jsonb` document counted with the arrays and composites around it, give an
//!   error; PostgreSQL keeps `jsonb` some 10,000 levels deep. The limit keeps every stage that
//!   clones, compares or serialises the value within a thread's stack (see the constant for the
//!   measurements). Up to it, documents of any shape decode exactly: the JSON parser
//!   (`json.rs`) uses no recursion.
//! - `json` numbers with an exponent beyond ±1000 give an error. `to_jsonb` writes them out in
//!   full (`numeric` takes up to 131,072 digits before the point), but ten bytes of text would
//!   then grow into a hundred thousand: the cap keeps a small document from taking gigabytes.
//! - `json` text the server keeps verbatim but `to_jsonb` refuses: a string with `\u0000`
//!   converts to the NUL character; a lone surrogate escape (`\ud800` with no low surrogate
//!   after it, or `\udc00` alone) becomes U+FFFD REPLACEMENT CHARACTER, because a Rust string
//!   cannot hold a lone surrogate (`to_json` prints the escape as it is). This is the one place
//!   where a value is not what its text says; a valid surrogate pair becomes its character.
//!
//! A value that gives an error does not stop the stream: the decoder leaves its column out of
//! the record and names the column and the problem in the event's `decode_error`.
//! - Time zones: `timestamptz` text is taken as written; it matches `to_jsonb` when both run
//!   with the same `TimeZone` (streamex pins UTC). Offsets are widened to `+hh:mm` as
//!   `to_jsonb` writes them.

use std::borrow::Cow;

use serde_json::{Map, Value};

use super::json;
use super::numeric::{NumberParts, numeric_value};
use super::types::PgType;
use super::value_error::ValueError;
use crate::event::Raw;

/// Arrays nest at most this deep (PostgreSQL's `MAXDIM`).
const MAX_ARRAY_DIMS: usize = 6;
/// Converts one value's text output to the JSON value `to_jsonb` gives for it (see the module
/// documentation for the mapping).
pub fn text_to_json(ty: &PgType, text: &[u8]) -> Result<Value, ValueError> {
    convert(ty, text, 0)
}

/// Whether a value of `ty` may be kept as its `text` and converted when first read, and as
/// what: when its conversion cannot fail and gives what [`text_to_json`] gives (the common
/// types: text, numbers as `numeric` writes them, dates, timestamps of the usual shape).
pub(crate) fn raw_kind(ty: &PgType, text: &[u8]) -> Option<Raw> {
    match ty {
        PgType::Text | PgType::Date => std::str::from_utf8(text).is_ok().then_some(Raw::Text),
        PgType::Number => (is_plain_integer(text)
            || NumberParts::scan(text).is_some_and(|parts| parts.is_canonical()))
        .then_some(Raw::Number),
        PgType::Timestamp => is_usual_timestamp(text, false).then_some(Raw::Timestamp),
        PgType::TimestampTz => is_usual_timestamp(text, true).then_some(Raw::TimestampTz),
        _ => None,
    }
}

/// Whether `text` is an integer as `numeric` writes it (digits without a leading zero, a
/// minus before any but zero): the usual number, checked without [`NumberParts::scan`].
fn is_plain_integer(text: &[u8]) -> bool {
    let digits = text.strip_prefix(b"-").unwrap_or(text);
    match digits {
        [] => false,
        [b'0'] => digits.len() == text.len(),
        [b'0', ..] => false,
        _ => digits.iter().all(u8::is_ascii_digit),
    }
}

/// [`text_to_json`] for a value that `outer` arrays and objects already hold.
fn convert(ty: &PgType, text: &[u8], outer: usize) -> Result<Value, ValueError> {
    match ty {
        PgType::Text => Ok(Value::String(utf8(text, "text")?.to_owned())),
        PgType::Number => number(text),
        PgType::Bool => match text {
            b"t" => Ok(Value::Bool(true)),
            b"f" => Ok(Value::Bool(false)),
            _ => Err(ValueError::new("bool", "expected t or f")),
        },
        PgType::Timestamp => timestamp(text, false),
        PgType::TimestampTz => timestamp(text, true),
        PgType::Date => Ok(Value::String(utf8(text, "date")?.to_owned())),
        PgType::Jsonb => json::parse(text, "jsonb", outer),
        PgType::Json => json::parse(text, "json", outer),
        PgType::Array { element, delimiter } => array(element, *delimiter, text, outer),
        PgType::Composite { fields } => composite(fields, text, outer),
    }
}

/// Converts an element's or field's text, reusing its buffer when it had to be unescaped and
/// the type keeps the text as it is.
fn nested_to_json(ty: &PgType, text: Cow<'_, [u8]>, outer: usize) -> Result<Value, ValueError> {
    match (ty, text) {
        (PgType::Text, Cow::Owned(bytes)) => String::from_utf8(bytes)
            .map(Value::String)
            .map_err(|_| ValueError::new("text", "invalid utf-8")),
        (ty, text) => convert(ty, &text, outer),
    }
}

fn utf8<'a>(text: &'a [u8], type_name: &'static str) -> Result<&'a str, ValueError> {
    std::str::from_utf8(text).map_err(|_| ValueError::new(type_name, "invalid utf-8"))
}

// ---------------------------------------------------------------------------------------------
// Numbers

fn number(text: &[u8]) -> Result<Value, ValueError> {
    match text {
        b"NaN" => return Ok(Value::String("NaN".to_owned())),
        b"Infinity" => return Ok(Value::String("Infinity".to_owned())),
        b"-Infinity" => return Ok(Value::String("-Infinity".to_owned())),
        _ => {}
    }
    let parts =
        NumberParts::scan(text).ok_or(ValueError::new("number", "invalid number syntax"))?;
    numeric_value(text, &parts, "number")
}

// ---------------------------------------------------------------------------------------------
// Timestamps

/// `2024-01-02 03:04:05.5[+05[:30]][ BC]` → `2024-01-02T03:04:05.5[+05:00|+05:30][ BC]`.
fn timestamp(text: &[u8], with_zone: bool) -> Result<Value, ValueError> {
    match (is_usual_timestamp(text, with_zone), with_zone) {
        (true, false) => Ok(Raw::Timestamp.to_value(text)),
        (true, true) => Ok(Raw::TimestampTz.to_value(text)),
        (false, _) => any_timestamp(text, with_zone),
    }
}

/// [`timestamp`] for any text.
fn any_timestamp(text: &[u8], with_zone: bool) -> Result<Value, ValueError> {
    let type_name = if with_zone {
        "timestamptz"
    } else {
        "timestamp"
    };
    if !text.is_ascii() {
        return Err(ValueError::new(type_name, "non-ascii text"));
    }
    if text == b"infinity" || text == b"-infinity" {
        return Ok(Value::String(utf8(text, type_name)?.to_owned()));
    }
    let s = utf8(text, type_name)?;
    // ASCII only (checked above): byte positions are character boundaries.
    let space = text
        .iter()
        .position(|&c| c == b' ')
        .ok_or(ValueError::new(type_name, "missing time part"))?;
    let (date, rest) = (&s[..space], &s[space + 1..]);
    let mut out = String::with_capacity(s.len() + 3);
    out.push_str(date);
    out.push('T');
    if with_zone {
        let sign = rest
            .bytes()
            .position(|c| c == b'+' || c == b'-')
            .ok_or(ValueError::new(type_name, "missing utc offset"))?;
        let (time, zone) = rest.split_at(sign);
        let end = zone.bytes().position(|c| c == b' ').unwrap_or(zone.len());
        let (offset, tail) = zone.split_at(end);
        out.push_str(time);
        out.push_str(offset);
        if offset.len() == 3 {
            // ISO writes `+05`, to_jsonb (XSD) `+05:00`.
            out.push_str(":00");
        }
        out.push_str(tail);
    } else {
        out.push_str(rest);
    }
    Ok(Value::String(out))
}

/// Whether `text` has the shape PostgreSQL writes for years 1000 to 9999 AD (the date, a
/// space, digits, colons and a point, then for a timestamptz an offset in whole hours:
/// `2024-01-02 03:04:05.123456+00`), which [`Raw::Timestamp`] and [`Raw::TimestampTz`]
/// rewrite without searching the text.
fn is_usual_timestamp(text: &[u8], with_zone: bool) -> bool {
    let offset = if with_zone { 3 } else { 0 };
    let Some(time_end) = text.len().checked_sub(offset) else {
        return false;
    };
    if time_end < 19 || text[10] != b' ' {
        return false;
    }
    // Every byte looked at, without branching on each (it runs for every timestamp).
    let mut ok = true;
    for (i, &c) in text[..10].iter().enumerate() {
        ok &= if i == 4 || i == 7 {
            c == b'-'
        } else {
            c.is_ascii_digit()
        };
    }
    for &c in &text[11..time_end] {
        ok &= c.is_ascii_digit() | (c == b':') | (c == b'.');
    }
    if let [sign, hours @ ..] = &text[time_end..] {
        ok &= matches!(sign, b'+' | b'-') & hours.iter().all(u8::is_ascii_digit);
    }
    ok
}

// ---------------------------------------------------------------------------------------------
// Arrays

fn is_space(c: u8) -> bool {
    // array_in and record_in use isspace(): space, \t, \n, \v, \f, \r.
    matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

fn skip_space(text: &[u8], mut pos: usize) -> usize {
    while pos < text.len() && is_space(text[pos]) {
        pos += 1;
    }
    pos
}

fn array_error(problem: &'static str) -> ValueError {
    ValueError::new("array", problem)
}

fn array(element: &PgType, delimiter: u8, text: &[u8], outer: usize) -> Result<Value, ValueError> {
    let mut pos = skip_space(text, 0);
    if text.get(pos) == Some(&b'[') {
        // Dimension decoration `[1:2][0:3]=`: to_jsonb ignores the bounds.
        let equals = text[pos..]
            .iter()
            .position(|&c| c == b'=')
            .ok_or(array_error("dimension bounds without '='"))?;
        let bounds = &text[pos..pos + equals];
        if !bounds
            .iter()
            .all(|&c| c.is_ascii_digit() || matches!(c, b'[' | b']' | b':' | b'-' | b'+'))
        {
            return Err(array_error("malformed dimension bounds"));
        }
        pos = skip_space(text, pos + equals + 1);
    }
    if text.get(pos) != Some(&b'{') {
        return Err(array_error("missing opening brace"));
    }
    let parser = ArrayParser {
        text,
        element,
        delimiter,
        outer,
    };
    let (value, end) = parser.level(pos + 1, 1)?;
    if skip_space(text, end) != text.len() {
        return Err(array_error("text after the closing brace"));
    }
    Ok(value)
}

/// An element's or field's text (`None` for NULL) and the position after it.
type Item<'a> = (Option<Cow<'a, [u8]>>, usize);

struct ArrayParser<'a> {
    text: &'a [u8],
    element: &'a PgType,
    delimiter: u8,
    /// How many arrays and objects hold the whole array.
    outer: usize,
}

impl ArrayParser<'_> {
    /// Parses the items of one `{...}` whose opening brace ends before `pos`; returns the array
    /// and the position after its closing brace.
    fn level(&self, pos: usize, depth: usize) -> Result<(Value, usize), ValueError> {
        let text = self.text;
        let mut pos = skip_space(text, pos);
        let mut items = Vec::new();
        if text.get(pos) == Some(&b'}') {
            return Ok((Value::Array(items), pos + 1));
        }
        let mut nested = None;
        loop {
            pos = skip_space(text, pos);
            let is_sub = match text.get(pos) {
                None => return Err(array_error("unbalanced braces")),
                Some(b'{') => true,
                Some(_) => false,
            };
            if *nested.get_or_insert(is_sub) != is_sub {
                return Err(array_error("mixed elements and sub-arrays"));
            }
            if is_sub {
                if depth >= MAX_ARRAY_DIMS {
                    return Err(array_error("too many dimensions"));
                }
                let (sub, end) = self.level(pos + 1, depth + 1)?;
                items.push(sub);
                pos = end;
            } else {
                let (item, end) = self.item(pos)?;
                items.push(match item {
                    None => Value::Null,
                    Some(bytes) => nested_to_json(self.element, bytes, self.outer + depth)?,
                });
                pos = end;
            }
            pos = skip_space(text, pos);
            match text.get(pos) {
                Some(&c) if c == self.delimiter => pos += 1,
                Some(b'}') => return Ok((Value::Array(items), pos + 1)),
                None => return Err(array_error("unbalanced braces")),
                Some(_) => return Err(array_error("expected a delimiter or closing brace")),
            }
        }
    }

    /// Reads one element starting at `pos` (not on white space); `None` for an unquoted NULL.
    /// Returns the element's text and the position after it.
    fn item(&self, pos: usize) -> Result<Item<'_>, ValueError> {
        let text = self.text;
        if text[pos] == b'"' {
            let (value, end) = quoted(text, pos + 1, b'\\', "array")?;
            return Ok((Some(value), end));
        }
        // Unquoted: up to the delimiter or a brace; backslash escapes the next byte; trailing
        // white space (not escaped) is dropped.
        let start = pos;
        let mut pos = pos;
        let mut owned: Option<Vec<u8>> = None;
        let mut run = start;
        let mut significant_end = start; // end of the text before trailing white space
        loop {
            match text.get(pos) {
                None => return Err(array_error("unbalanced braces")),
                Some(&c) if c == self.delimiter || c == b'}' => break,
                Some(b'{') => return Err(array_error("unexpected opening brace")),
                Some(b'"') => return Err(array_error("unexpected quote")),
                Some(b'\\') => {
                    let escaped = *text
                        .get(pos + 1)
                        .ok_or(array_error("backslash at end of text"))?;
                    let buf = owned.get_or_insert_with(Vec::new);
                    buf.extend_from_slice(&text[run..pos]);
                    buf.push(escaped);
                    pos += 2;
                    run = pos;
                    significant_end = pos;
                }
                Some(&c) => {
                    pos += 1;
                    if !is_space(c) {
                        significant_end = pos;
                    }
                }
            }
        }
        match owned {
            None => {
                let value = &text[start..significant_end];
                if value.is_empty() {
                    return Err(array_error("empty element"));
                }
                if value.eq_ignore_ascii_case(b"NULL") {
                    return Ok((None, pos));
                }
                Ok((Some(Cow::Borrowed(value)), pos))
            }
            Some(mut buf) => {
                if significant_end > run {
                    buf.extend_from_slice(&text[run..significant_end]);
                }
                Ok((Some(Cow::Owned(buf)), pos))
            }
        }
    }
}

/// Reads a double-quoted string whose opening quote ends before `pos`, up to its closing
/// quote; a backslash escapes the next byte. Borrows when there is no escape. Returns the
/// content and the position after the closing quote.
fn quoted<'a>(
    text: &'a [u8],
    pos: usize,
    escape: u8,
    type_name: &'static str,
) -> Result<(Cow<'a, [u8]>, usize), ValueError> {
    let start = pos;
    let mut pos = pos;
    let mut owned: Option<Vec<u8>> = None;
    let mut run = start;
    loop {
        match text.get(pos) {
            None => return Err(ValueError::new(type_name, "unterminated quoted string")),
            Some(b'"') => break,
            Some(&c) if c == escape => {
                let escaped = *text
                    .get(pos + 1)
                    .ok_or(ValueError::new(type_name, "unterminated quoted string"))?;
                let buf = owned.get_or_insert_with(Vec::new);
                buf.extend_from_slice(&text[run..pos]);
                buf.push(escaped);
                pos += 2;
                run = pos;
            }
            Some(_) => pos += 1,
        }
    }
    let value = match owned {
        None => Cow::Borrowed(&text[start..pos]),
        Some(mut buf) => {
            buf.extend_from_slice(&text[run..pos]);
            Cow::Owned(buf)
        }
    };
    Ok((value, pos + 1))
}

// ---------------------------------------------------------------------------------------------
// Composites

fn composite_error(problem: &'static str) -> ValueError {
    ValueError::new("composite", problem)
}

/// `record_in` syntax: `(f1,f2,...)`; an empty unquoted field is NULL; inside a field, double
/// quotes start and end quoted parts, `""` inside quotes is a quote and a backslash escapes the
/// next byte anywhere.
fn composite(
    fields: &[(String, std::sync::Arc<PgType>)],
    text: &[u8],
    outer: usize,
) -> Result<Value, ValueError> {
    let mut pos = skip_space(text, 0);
    if text.get(pos) != Some(&b'(') {
        return Err(composite_error("missing opening parenthesis"));
    }
    pos += 1;
    let mut object = Map::with_capacity(fields.len());
    for (i, (name, ty)) in fields.iter().enumerate() {
        let (field, end) = composite_field(text, pos)?;
        let value = match field {
            None => Value::Null,
            Some(bytes) => nested_to_json(ty, bytes, outer + 1)?,
        };
        object.insert(name.clone(), value);
        let last = i + 1 == fields.len();
        match (text.get(end), last) {
            (Some(b','), false) | (Some(b')'), true) => pos = end + 1,
            (Some(b','), true) => return Err(composite_error("more fields than the type has")),
            (Some(b')'), false) => return Err(composite_error("fewer fields than the type has")),
            _ => return Err(composite_error("missing closing parenthesis")),
        }
    }
    if fields.is_empty() {
        if text.get(pos) != Some(&b')') {
            return Err(composite_error("more fields than the type has"));
        }
        pos += 1;
    }
    if skip_space(text, pos) != text.len() {
        return Err(composite_error("text after the closing parenthesis"));
    }
    Ok(Value::Object(object))
}

/// Reads one field from `pos` up to an unquoted `,` or `)`; `None` for an empty unquoted field.
fn composite_field(text: &[u8], pos: usize) -> Result<Item<'_>, ValueError> {
    let start = pos;
    let mut pos = pos;
    let mut owned: Option<Vec<u8>> = None;
    let mut run = start;
    let mut in_quotes = false;
    loop {
        let Some(&c) = text.get(pos) else {
            return Err(if in_quotes {
                composite_error("unterminated quoted string")
            } else {
                composite_error("missing closing parenthesis")
            });
        };
        match c {
            b',' | b')' if !in_quotes => break,
            b'\\' => {
                let escaped = *text
                    .get(pos + 1)
                    .ok_or(composite_error("backslash at end of text"))?;
                let buf = owned.get_or_insert_with(Vec::new);
                buf.extend_from_slice(&text[run..pos]);
                buf.push(escaped);
                pos += 2;
                run = pos;
            }
            b'"' => {
                let buf = owned.get_or_insert_with(Vec::new);
                buf.extend_from_slice(&text[run..pos]);
                if !in_quotes {
                    in_quotes = true;
                } else if text.get(pos + 1) == Some(&b'"') {
                    buf.push(b'"');
                    pos += 1;
                } else {
                    in_quotes = false;
                }
                pos += 1;
                run = pos;
            }
            _ => pos += 1,
        }
    }
    let value = match owned {
        None if pos == start => None,
        None => Some(Cow::Borrowed(&text[start..pos])),
        Some(mut buf) => {
            buf.extend_from_slice(&text[run..pos]);
            Some(Cow::Owned(buf))
        }
    };
    Ok((value, pos))
}

#[cfg(test)]
mod tests;
