//! Rows in `COPY ... TO STDOUT` text format → records, with the same conversion as the
//! stream's values.
//!
//! A backfill (and `streamex tail --snapshot`) reads a table with `COPY (SELECT columns FROM
//! table) TO STDOUT`, which costs the server what a plain `COPY` does (about a sixth of
//! `to_jsonb(t)::text` per row), and converts each value here. The text a column holds in
//! COPY's format is its type's output function's, exactly what pgoutput sends, so
//! [`text_to_json`] turns it into the same JSON value, provided the reading session has the
//! settings the stream pins (`DateStyle`, `TimeZone`, ...): a read row is then the record an
//! insert of it would have carried.
//!
//! The format: one row per line (`\n`), columns separated by a tab, `\N` for NULL, and inside
//! a value a backslash escapes the characters that would be ambiguous (`\\`, `\t`, `\n`, `\r`,
//! `\b`, `\f`, `\v`, octal `\NNN` and hexadecimal `\xHH`). A raw tab or newline is therefore
//! always a separator.
//!
//! Malformed input (a wrong column count, a row cut off at the end) is an error, never a
//! panic; a value its type's conversion refuses is left out of its record and named, with the
//! reason and never the value, in the row's problems (the event's `decode_error`).

use std::borrow::Cow;
use std::sync::Arc;

use serde_json::Value;

use super::text_to_json;
use super::types::PgType;
use super::value::raw_kind;
use crate::event::{Columns, Names, Record};

/// A table's columns in the order the COPY statement selects them.
#[derive(Clone, Debug)]
pub struct CopyColumn {
    /// The column's name, the record's key.
    pub name: String,
    /// How its text converts.
    pub ty: Arc<PgType>,
}

/// One row read.
#[derive(Debug, PartialEq)]
pub struct CopyRow {
    /// The row's record.
    pub record: Record,
    /// The values left out of it, and why (`None` when every value converted).
    pub problems: Option<String>,
}

/// Why COPY's output could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CopyError {
    /// A line has more or fewer values than the columns selected.
    #[error("a row of COPY's output has {got} values, but {expected} columns were selected")]
    ColumnCount { got: usize, expected: usize },
    /// The output ended inside a row.
    #[error("COPY's output ended inside a row ({0} bytes without a line end)")]
    CutRow(usize),
}

/// Splits COPY's output, in whatever chunks it arrives, into rows.
#[derive(Debug)]
pub struct CopyReader {
    columns: Arc<[CopyColumn]>,
    /// Their names, shared by every record read.
    names: Columns,
    /// The start of a row whose end has not arrived yet.
    partial: Vec<u8>,
}

impl CopyReader {
    /// A reader for rows of `columns`.
    pub fn new(columns: Arc<[CopyColumn]>) -> Self {
        CopyReader {
            names: Names::shared(columns.iter().map(|c| c.name.as_str().into()).collect()),
            columns,
            partial: Vec::new(),
        }
    }

    /// Reads the rows that `chunk` completes into `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<CopyRow>) -> Result<(), CopyError> {
        let mut rest = chunk;
        if !self.partial.is_empty() {
            match memchr(b'\n', rest) {
                None => {
                    self.partial.extend_from_slice(rest);
                    return Ok(());
                }
                Some(end) => {
                    self.partial.extend_from_slice(&rest[..end]);
                    let line = std::mem::take(&mut self.partial);
                    out.push(self.row(&line)?);
                    rest = &rest[end + 1..];
                }
            }
        }
        while let Some(end) = memchr(b'\n', rest) {
            out.push(self.row(&rest[..end])?);
            rest = &rest[end + 1..];
        }
        self.partial.extend_from_slice(rest);
        Ok(())
    }

    /// Says whether the output ended between rows, as it must.
    pub fn finish(&self) -> Result<(), CopyError> {
        if self.partial.is_empty() {
            Ok(())
        } else {
            Err(CopyError::CutRow(self.partial.len()))
        }
    }

    fn row(&self, line: &[u8]) -> Result<CopyRow, CopyError> {
        let expected = self.columns.len();
        let mut record = Record::with_text_capacity(&self.names, line.len());
        let mut problems: Vec<String> = Vec::new();
        let mut fields = line.split(|&b| b == b'\t');
        // A table without columns has one empty line per row.
        if expected == 0 {
            return if line.is_empty() {
                Ok(CopyRow {
                    record,
                    problems: None,
                })
            } else {
                Err(CopyError::ColumnCount {
                    got: fields.count(),
                    expected,
                })
            };
        }
        for (i, column) in self.columns.iter().enumerate() {
            let Some(field) = fields.next() else {
                return Err(CopyError::ColumnCount { got: i, expected });
            };
            if field == b"\\N" {
                record.set(i, Value::Null);
                continue;
            }
            let text = unescape(field);
            if let Some(kind) = raw_kind(&column.ty, &text) {
                record.set_raw(i, kind, &text);
                continue;
            }
            match text_to_json(&column.ty, &text) {
                Ok(value) => record.set(i, value),
                Err(error) => problems.push(format!(
                    "column {} could not be decoded and is left out of the record: {error}",
                    column.name
                )),
            }
        }
        let extra = fields.count();
        if extra > 0 {
            return Err(CopyError::ColumnCount {
                got: expected + extra,
                expected,
            });
        }
        Ok(CopyRow {
            record,
            problems: (!problems.is_empty()).then(|| problems.join("; ")),
        })
    }
}

fn memchr(needle: u8, haystack: &[u8]) -> Option<usize> {
    haystack.iter().position(|&b| b == needle)
}

/// A value's text with COPY's backslash escapes undone (borrowed when it has none).
fn unescape(field: &[u8]) -> Cow<'_, [u8]> {
    if !field.contains(&b'\\') {
        return Cow::Borrowed(field);
    }
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let b = field[i];
        if b != b'\\' || i + 1 == field.len() {
            out.push(b);
            i += 1;
            continue;
        }
        let next = field[i + 1];
        i += 2;
        match next {
            b'b' => out.push(0x08),
            b'f' => out.push(0x0c),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(0x0b),
            b'0'..=b'7' => {
                // Up to three octal digits.
                let mut value = u32::from(next - b'0');
                let mut digits = 1;
                while digits < 3 && i < field.len() && (b'0'..=b'7').contains(&field[i]) {
                    value = value * 8 + u32::from(field[i] - b'0');
                    i += 1;
                    digits += 1;
                }
                out.push((value & 0xff) as u8);
            }
            b'x' if i < field.len() && field[i].is_ascii_hexdigit() => {
                // One or two hexadecimal digits.
                let mut value = hex(field[i]);
                i += 1;
                if i < field.len() && field[i].is_ascii_hexdigit() {
                    value = value * 16 + hex(field[i]);
                    i += 1;
                }
                out.push(value);
            }
            // Any other escaped character stands for itself (`\\` among them).
            other => out.push(other),
        }
    }
    Cow::Owned(out)
}

fn hex(digit: u8) -> u8 {
    match digit {
        b'0'..=b'9' => digit - b'0',
        b'a'..=b'f' => digit - b'a' + 10,
        _ => digit - b'A' + 10,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn columns() -> Arc<[CopyColumn]> {
        vec![
            CopyColumn {
                name: "id".into(),
                ty: Arc::new(PgType::Number),
            },
            CopyColumn {
                name: "body".into(),
                ty: Arc::new(PgType::Text),
            },
            CopyColumn {
                name: "ok".into(),
                ty: Arc::new(PgType::Bool),
            },
        ]
        .into()
    }

    fn read(chunks: &[&[u8]]) -> Result<Vec<CopyRow>, CopyError> {
        let mut reader = CopyReader::new(columns());
        let mut out = Vec::new();
        for chunk in chunks {
            reader.push(chunk, &mut out)?;
        }
        reader.finish()?;
        Ok(out)
    }

    fn record(value: serde_json::Value) -> Record {
        value.as_object().unwrap().clone().into()
    }

    #[test]
    fn rows_are_converted_as_the_stream_converts_values() {
        let rows = read(&[b"1\tabc\tt\n2\t\\N\tf\n"]).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(
            rows[0].record,
            record(json!({"id": 1, "body": "abc", "ok": true}))
        );
        assert_eq!(
            rows[1].record,
            record(json!({"id": 2, "body": null, "ok": false}))
        );
        assert!(rows.iter().all(|r| r.problems.is_none()));
    }

    #[test]
    fn escapes_are_undone() {
        let rows = read(&[b"1\ta\\tb\\nc\\\\d\\101\\x42\\x4\\r\\b\\f\\v\\N!\tt\n"]).unwrap();
        // `\N` inside a longer value is an escaped N, not NULL.
        assert_eq!(
            rows[0].record["body"],
            json!("a\tb\nc\\dAB\u{4}\r\u{8}\u{c}\u{b}N!")
        );
    }

    #[test]
    fn rows_may_be_cut_anywhere_between_chunks() {
        let whole: &[u8] = b"1\tab\\\\c\tt\n22\t\\N\tf\n333\txyz\tt\n";
        let expected = read(&[whole]).unwrap();
        for cut in 0..=whole.len() {
            let (a, b) = whole.split_at(cut);
            assert_eq!(read(&[a, b]).unwrap(), expected, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = whole.chunks(1).collect();
        assert_eq!(read(&bytes).unwrap(), expected);
    }

    #[test]
    fn a_wrong_column_count_or_a_cut_row_is_an_error() {
        assert_eq!(
            read(&[b"1\tabc\n"]).unwrap_err(),
            CopyError::ColumnCount {
                got: 2,
                expected: 3
            }
        );
        assert_eq!(
            read(&[b"1\tabc\tt\tx\n"]).unwrap_err(),
            CopyError::ColumnCount {
                got: 4,
                expected: 3
            }
        );
        assert_eq!(read(&[b"1\tabc\tt"]).unwrap_err(), CopyError::CutRow(7));
    }

    #[test]
    fn a_value_that_does_not_convert_is_left_out_and_named() {
        let rows = read(&[b"x1\tabc\tt\n"]).unwrap();
        assert!(!rows[0].record.contains_key("id"));
        assert_eq!(rows[0].record["body"], json!("abc"));
        let problems = rows[0].problems.as_deref().unwrap();
        assert!(problems.contains("column id"), "{problems}");
        assert!(
            !problems.contains("x1"),
            "the value is never in the message: {problems}"
        );
    }

    #[test]
    fn a_table_without_columns_has_empty_lines() {
        let mut reader = CopyReader::new(Vec::new().into());
        let mut out = Vec::new();
        reader.push(b"\n\n", &mut out).unwrap();
        assert_eq!(out.len(), 2);
        assert!(reader.push(b"1\n", &mut out).is_err());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(chunks in proptest::collection::vec(
            proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64), 0..8)) {
            let mut reader = CopyReader::new(columns());
            let mut out = Vec::new();
            for chunk in &chunks {
                if reader.push(chunk, &mut out).is_err() {
                    break;
                }
            }
            let _ = reader.finish();
        }
    }
}
