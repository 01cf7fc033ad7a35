//! A number's text → the JSON number `numeric` writes for it (`1e2` → `100`, `-0` → `0`):
//! shared by number columns (value.rs) and `json` numbers (json.rs), so that both read
//! numbers the same way.

use std::str::FromStr;

use serde_json::{Number, Value};

use super::value_error::ValueError;

/// The largest exponent a `json` number may have. `to_jsonb` writes `1e100000` out in full;
/// we refuse it instead of growing a few bytes of text into a thousand zeros and more.
const MAX_EXPONENT: i64 = 1000;

/// A JSON number's text as `numeric` writes it, as a [`Value::Number`].
pub(super) fn numeric_value(
    text: &[u8],
    parts: &NumberParts,
    type_name: &'static str,
) -> Result<Value, ValueError> {
    if let Some(n) = parts.small_integer(text) {
        // The common case (integer columns): no text for serde_json to parse again.
        return Ok(Value::Number(Number::from(n)));
    }
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

    /// The number, when it is an integer as `numeric` writes it (no point, no exponent, no
    /// negative zero) of at most 18 digits, which always fits an `i64`.
    fn small_integer(&self, text: &[u8]) -> Option<i64> {
        let digits = &text[self.int.0..self.int.1];
        if !self.is_canonical() || self.frac.0 != self.frac.1 || digits.len() > 18 {
            return None;
        }
        let magnitude = digits
            .iter()
            .fold(0i64, |n, &d| n * 10 + i64::from(d - b'0'));
        Some(if self.negative { -magnitude } else { magnitude })
    }

    /// Whether the text is already as `numeric` would write it.
    pub(super) fn is_canonical(&self) -> bool {
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
