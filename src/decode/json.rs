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

use super::numeric::{NumberParts, numeric_value};
use super::value_error::{MAX_VALUE_DEPTH, TOO_DEEP, ValueError};

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
mod tests;
