//! Where things are in the write-ahead log: [`Lsn`], an event's [`Position`], and
//! PostgreSQL's time epoch. A leaf module: every stage uses it, it uses none.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A position in the write-ahead log, written by PostgreSQL as `X/X` (two hexadecimal halves).
///
/// ```
/// use streamex::Lsn;
///
/// let lsn: Lsn = "1/16B3748".parse().unwrap();
/// assert_eq!(lsn, Lsn(0x1_016B_3748));
/// assert_eq!(lsn.to_string(), "1/16B3748");
/// assert!(lsn > "0/FFFFFFFF".parse().unwrap());
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The invalid position `0/0`, which PostgreSQL reads as "wherever the slot is".
    pub const ZERO: Lsn = Lsn(0);

    /// How many bytes of WAL lie from `earlier` up to this position (0 if `earlier` is ahead).
    pub fn bytes_since(self, earlier: Lsn) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// An LSN that is not of the form `X/X` with hexadecimal halves of at most 32 bits.
#[derive(Debug, thiserror::Error)]
#[error("invalid LSN {0:?}: expected the form X/X with hexadecimal halves, such as 0/16B3748")]
pub struct ParseLsnError(String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError(s.to_owned());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

impl Lsn {
    /// Appends the LSN as [`Display`](fmt::Display) writes it.
    pub(crate) fn write_to(self, out: &mut Vec<u8>) {
        let (text, len) = self.text();
        out.extend_from_slice(&text[..len]);
    }

    /// The LSN as Display writes it, and its length, without the formatting machinery: every
    /// event has two.
    fn text(self) -> ([u8; 17], usize) {
        fn hex(mut n: u32, out: &mut [u8; 17], at: &mut usize) {
            let start = *at;
            loop {
                out[*at] = b"0123456789ABCDEF"[(n & 0xF) as usize];
                *at += 1;
                n >>= 4;
                if n == 0 {
                    break;
                }
            }
            out[start..*at].reverse();
        }
        let mut out = [0u8; 17];
        let mut at = 0;
        hex((self.0 >> 32) as u32, &mut out, &mut at);
        out[at] = b'/';
        at += 1;
        hex(
            u32::try_from(self.0 & 0xFFFF_FFFF).unwrap_or_default(),
            &mut out,
            &mut at,
        );
        (out, at)
    }
}

impl Serialize for Lsn {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let (text, len) = self.text();
        // Only ASCII hexadecimal digits and '/' were written.
        serializer.serialize_str(std::str::from_utf8(&text[..len]).unwrap_or_default())
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01 00:00:00 UTC), in which the
/// protocol gives times.
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// Where an event is among all others: its transaction's commit LSN, then its place in the
/// transaction. Positions order events totally (WAL order), and identify them: the
/// idempotency key of anything acting outside the database. Written `0/1A2B4F0#3`.
///
/// ```
/// use streamex::{Lsn, Position};
///
/// let a = Position::new(Lsn(0x100), 7);
/// let b = Position::new(Lsn(0x200), 0);
/// assert!(a < b);
/// assert_eq!(a.to_string(), "0/100#7");
/// assert_eq!("0/100#7".parse::<Position>().unwrap(), a);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// Where the event's transaction commits.
    pub commit_lsn: Lsn,
    /// The event's place in its transaction, from 0.
    pub ordinal: u64,
}

impl Position {
    /// The position of the `ordinal`-th change of the transaction committing at `commit_lsn`.
    pub const fn new(commit_lsn: Lsn, ordinal: u64) -> Self {
        Position {
            commit_lsn,
            ordinal,
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.commit_lsn, self.ordinal)
    }
}

/// A position that is not of the form `X/X#N`.
#[derive(Debug, thiserror::Error)]
#[error("invalid position {0:?}: expected an LSN, '#' and an ordinal, such as 0/16B3748#0")]
pub struct ParsePositionError(String);

impl FromStr for Position {
    type Err = ParsePositionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParsePositionError(s.to_owned());
        let (lsn, ordinal) = s.split_once('#').ok_or_else(err)?;
        Ok(Position {
            commit_lsn: lsn.parse().map_err(|_| err())?,
            ordinal: ordinal.parse().map_err(|_| err())?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn serialises_as_it_displays(n in proptest::prelude::any::<u64>(), small in 0u64..0x100) {
            for lsn in [Lsn(n), Lsn(small), Lsn(small << 32)] {
                proptest::prop_assert_eq!(
                    serde_json::to_string(&lsn).unwrap(),
                    format!("\"{lsn}\"")
                );
            }
        }
    }

    #[test]
    fn formats_and_parses_both_halves() {
        let lsn = Lsn(0x1_016B_3748);
        assert_eq!(lsn.to_string(), "1/16B3748");
        assert_eq!("1/16B3748".parse::<Lsn>().unwrap(), lsn);
        assert_eq!("0/0".parse::<Lsn>().unwrap(), Lsn::ZERO);
        assert_eq!("FFFFFFFF/FFFFFFFF".parse::<Lsn>().unwrap(), Lsn(u64::MAX));
    }

    #[test]
    fn refuses_malformed_text() {
        for bad in ["", "0", "0/", "/0", "1/2/3", "G/0", "100000000/0", "0/-1"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} parsed");
        }
    }
}
