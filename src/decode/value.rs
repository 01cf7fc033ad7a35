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
//! - Values nested deeper than [`MAX_VALUE_DEPTH`] (256) levels of arrays and objects, a
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
use std::str::FromStr;

use serde_json::{Map, Number, Value};

use super::json;
use super::types::PgType;

/// Why a value's text could not be converted. The message names the type and the problem, and
/// never contains the value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{type_name}: {problem}")]
pub struct ValueError {
    type_name: &'static str,
    problem: &'static str,
}

impl ValueError {
    pub(super) fn new(type_name: &'static str, problem: &'static str) -> Self {
        ValueError { type_name, problem }
    }

    /// The kind of type whose text was malformed (`number`, `array`, ...).
    pub fn type_name(&self) -> &'static str {
        self.type_name
    }

    /// What was wrong with it.
    pub fn problem(&self) -> &'static str {
        self.problem
    }
}

/// How deep a column value may nest: arrays and objects inside each other, counting the
/// arrays and composites around a `json` or `jsonb` document (`[[1]]` is 2 levels). A value
/// nested deeper is not decoded; the decoder leaves the column out of its record and says so
/// in the event's `decode_error`. PostgreSQL itself keeps `jsonb` some 10,000 levels deep
/// (with the default `max_stack_depth`), and `json` text without limit.
///
/// Why so few: serde_json's [`Value`] recurses once per level when it is cloned, compared,
/// serialised or dropped, and so do operators and every stage that copies an event, on a
/// tokio worker thread whose stack is 2 MiB. Measured with serde_json 1.0.154 (features
/// `arbitrary_precision`, `preserve_order`) on a fresh 2 MiB thread, a value nested as
/// objects overflows past 974 levels when cloned in a debug build (arrays: 1,920), past 1,318
/// (arrays) in `serde_json::to_value`, 1,948 serialised, 3,037 compared, 6,872 dropped; in a
/// release build past 3,631 cloned and 3,112 in `to_value` (objects), and 8,000 and more for
/// the rest. 256 levels leave a margin of about 4× in a debug build and 12× in a release
/// build for the stack that the caller already uses. The unit test
/// `values_at_twice_the_limit_are_safe_on_a_small_stack` keeps half of that margin checked.
pub const MAX_VALUE_DEPTH: usize = 256;

/// The problem of a value deeper than [`MAX_VALUE_DEPTH`] (a literal: [`ValueError`] holds
/// static text; a test checks that the number agrees).
pub(super) const TOO_DEEP: &str =
    "nested more than 256 levels deep (arrays and objects), deeper than streamex decodes";

/// Arrays nest at most this deep (PostgreSQL's `MAXDIM`).
const MAX_ARRAY_DIMS: usize = 6;
/// The largest exponent a `json` number may have. `to_jsonb` writes `1e100000` out in full;
/// we refuse it instead of growing a few bytes of text into a thousand zeros and more.
const MAX_EXPONENT: i64 = 1000;

/// Converts one value's text output to the JSON value `to_jsonb` gives for it (see the module
/// documentation for the mapping).
pub fn text_to_json(ty: &PgType, text: &[u8]) -> Result<Value, ValueError> {
    convert(ty, text, 0)
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

/// A JSON number's text as `numeric` writes it, as a [`Value::Number`].
pub(super) fn numeric_value(
    text: &[u8],
    parts: &NumberParts,
    type_name: &'static str,
) -> Result<Value, ValueError> {
    let normal;
    let text = if parts.is_canonical() {
        // Only ASCII digits, '-' and '.' passed the scan.
        std::str::from_utf8(text).map_err(|_| ValueError::new(type_name, "invalid utf-8"))?
    } else {
        normal = parts.canonical(text, type_name)?;
        normal.as_str()
    };
    Number::from_str(text)
        .map(Value::Number)
        .map_err(|_| ValueError::new(type_name, "invalid number syntax"))
}

/// The pieces of a number in JSON syntax: `-? int (. frac)? ([eE] [+-]? exp)?`.
pub(super) struct NumberParts {
    negative: bool,
    int: (usize, usize),
    frac: (usize, usize),
    exponent: Option<i64>,
    all_zero: bool,
}

impl NumberParts {
    /// Splits `text` if it is a number in JSON syntax.
    pub(super) fn scan(text: &[u8]) -> Option<NumberParts> {
        let mut pos = 0;
        let negative = text.first() == Some(&b'-');
        if negative {
            pos = 1;
        }
        let int_start = pos;
        while pos < text.len() && text[pos].is_ascii_digit() {
            pos += 1;
        }
        let int = (int_start, pos);
        // JSON: one or more digits, and no leading zero unless the zero is alone.
        if int.1 == int.0 || (text[int.0] == b'0' && int.1 - int.0 > 1) {
            return None;
        }
        let mut frac = (pos, pos);
        if text.get(pos) == Some(&b'.') {
            pos += 1;
            let start = pos;
            while pos < text.len() && text[pos].is_ascii_digit() {
                pos += 1;
            }
            if pos == start {
                return None;
            }
            frac = (start, pos);
        }
        let mut exponent = None;
        if matches!(text.get(pos), Some(b'e' | b'E')) {
            pos += 1;
            let exp_negative = match text.get(pos) {
                Some(b'-') => {
                    pos += 1;
                    true
                }
                Some(b'+') => {
                    pos += 1;
                    false
                }
                _ => false,
            };
            let start = pos;
            let mut value: i64 = 0;
            while pos < text.len() && text[pos].is_ascii_digit() {
                // Saturate: anything past the limit is refused later anyway.
                value = (value * 10 + i64::from(text[pos] - b'0')).min(i64::from(u32::MAX));
                pos += 1;
            }
            if pos == start {
                return None;
            }
            exponent = Some(if exp_negative { -value } else { value });
        }
        if pos != text.len() {
            return None;
        }
        let all_zero = text[int.0..int.1]
            .iter()
            .chain(&text[frac.0..frac.1])
            .all(|&d| d == b'0');
        Some(NumberParts {
            negative,
            int,
            frac,
            exponent,
            all_zero,
        })
    }

    /// Whether the text is already as `numeric` would write it.
    fn is_canonical(&self) -> bool {
        self.exponent.is_none() && !(self.negative && self.all_zero)
    }

    /// The number as `numeric_out(numeric_in(text))` writes it: no exponent, as many decimals
    /// as the input had after the point minus the exponent, no negative zero.
    fn canonical(&self, text: &[u8], type_name: &'static str) -> Result<String, ValueError> {
        let exponent = self.exponent.unwrap_or(0);
        if !(-MAX_EXPONENT..=MAX_EXPONENT).contains(&exponent) {
            return Err(ValueError::new(type_name, "number exponent out of range"));
        }
        let int = &text[self.int.0..self.int.1];
        let frac = &text[self.frac.0..self.frac.1];
        let digits_len = int.len() + frac.len();
        let digit = |i: usize| {
            if i < int.len() {
                int[i]
            } else {
                frac[i - int.len()]
            }
        };
        // Where the decimal point falls among the digits, and how many decimals to write.
        let point = to_i64(int.len()) + exponent;
        let scale = (to_i64(frac.len()) - exponent).max(0);
        let mut out = String::with_capacity(digits_len + 8 + to_usize(exponent.abs()));
        if self.negative && !self.all_zero {
            out.push('-');
        }
        // Integer part: the digits before the point without leading zeros, then zeros.
        let int_end = to_usize(point.max(0));
        let mut started = false;
        for i in 0..int_end {
            let d = if i < digits_len { digit(i) } else { b'0' };
            if started || d != b'0' {
                started = true;
                out.push(char::from(d));
            }
        }
        if !started {
            out.push('0');
        }
        if scale > 0 {
            out.push('.');
            // Zeros between the point and the first digit, then the remaining digits.
            for _ in 0..to_usize((-point).max(0)) {
                out.push('0');
            }
            for i in int_end..digits_len {
                out.push(char::from(digit(i)));
            }
        }
        Ok(out)
    }
}

fn to_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_usize(n: i64) -> usize {
    usize::try_from(n).unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Timestamps

/// `2024-01-02 03:04:05.5[+05[:30]][ BC]` → `2024-01-02T03:04:05.5[+05:00|+05:30][ BC]`.
fn timestamp(text: &[u8], with_zone: bool) -> Result<Value, ValueError> {
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
    let space = s
        .find(' ')
        .ok_or(ValueError::new(type_name, "missing time part"))?;
    let (date, rest) = (&s[..space], &s[space + 1..]);
    let mut out = String::with_capacity(s.len() + 3);
    out.push_str(date);
    out.push('T');
    if with_zone {
        let sign = rest
            .find(['+', '-'])
            .ok_or(ValueError::new(type_name, "missing utc offset"))?;
        let (time, zone) = rest.split_at(sign);
        let end = zone.find(' ').unwrap_or(zone.len());
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
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

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
}
