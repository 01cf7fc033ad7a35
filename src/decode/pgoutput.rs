//! Decoder for the messages of PostgreSQL's `pgoutput` logical decoding plugin, protocol
//! version 1.
//!
//! Each XLogData frame of a logical replication stream carries exactly one pgoutput message:
//! a one-byte tag followed by fields in a fixed order (see "Logical Replication Message
//! Formats" in the PostgreSQL 15 documentation). Integers are big-endian (`Int8`, `Int16`,
//! `Int32`, `Int64`), strings are NUL-terminated, and row contents come as `TupleData`: a
//! column count, then per column a kind byte (`n` NULL, `u` unchanged TOASTed value, `t`
//! text, `b` binary) with a length-prefixed value for the last two.
//!
//! Streaming and two-phase messages (tags `S`, `E`, `c`, `A`, `b`, `P`, `K`, `r`, `p`) only
//! exist in protocol versions 2 and 3, which streamex does not ask for; they are rejected
//! with [`DecodeError::UnsupportedMessage`].
//!
//! # No panics
//!
//! The input comes from the network, so [`decode`] must never panic, whatever the bytes:
//! every read goes through a private `Reader` that checks the remaining length first, lengths
//! and counts are validated (negative or larger than what is left is an error), allocations
//! are bounded by the size of the input, and a message must be consumed exactly (trailing
//! bytes mean the decoder and the server disagree, and are an error).
//!
//! Column values are [`Bytes`] slices of the input buffer: decoding copies no value.

use bytes::{Buf, Bytes};

use crate::lsn::Lsn;

/// The largest message [`decode`] accepts: 1 GiB, PostgreSQL's own limit for one value.
pub const MAX_MESSAGE_SIZE: usize = 1 << 30;

pub use crate::lsn::PG_EPOCH_OFFSET_MICROS;

/// Converts a PostgreSQL timestamp (microseconds since 2000-01-01 UTC) to microseconds since
/// the Unix epoch, saturating at the ends of `i64`.
pub fn pg_epoch_to_unix_micros(t: i64) -> i64 {
    t.saturating_add(PG_EPOCH_OFFSET_MICROS)
}

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgOutputMessage {
    /// `B`: start of a transaction.
    Begin(Begin),
    /// `C`: end of a transaction.
    Commit(Commit),
    /// `O`: the replication origin of the transaction.
    Origin(Origin),
    /// `R`: the layout of a relation, sent before its first change in a session and after
    /// every change of that layout.
    Relation(Relation),
    /// `Y`: a data type, sent before a relation that uses a non-built-in type.
    Type(TypeMessage),
    /// `I`: a new row.
    Insert(Insert),
    /// `U`: a changed row.
    Update(Update),
    /// `D`: a deleted row.
    Delete(Delete),
    /// `T`: one `TRUNCATE` of one or more relations.
    Truncate(Truncate),
    /// `M`: a logical decoding message from `pg_logical_emit_message`.
    Message(LogicalMessage),
}

/// `B`: start of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begin {
    /// The LSN of the transaction's commit record.
    pub final_lsn: Lsn,
    /// Commit time, in microseconds since 2000-01-01 UTC (see [`pg_epoch_to_unix_micros`]).
    pub commit_time: i64,
    /// Transaction id.
    pub xid: u32,
}

/// `C`: end of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// Flags; always 0 in protocol version 1, kept as sent.
    pub flags: u8,
    /// The LSN of the commit record.
    pub commit_lsn: Lsn,
    /// The end LSN of the transaction (the position to acknowledge once it is processed).
    pub end_lsn: Lsn,
    /// Commit time, in microseconds since 2000-01-01 UTC (see [`pg_epoch_to_unix_micros`]).
    pub commit_time: i64,
}

/// `O`: the replication origin the transaction came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The LSN of the commit on the origin server.
    pub commit_lsn: Lsn,
    /// The origin's name.
    pub name: String,
}

/// `R`: the layout of a relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// The relation's OID; changes refer to the relation by it.
    pub oid: u32,
    /// The schema; pgoutput sends an empty string for `pg_catalog`.
    pub namespace: String,
    /// The relation's name.
    pub name: String,
    /// What old values updates and deletes carry.
    pub replica_identity: ReplicaIdentity,
    /// The columns, in the order of the values of every tuple of this relation.
    pub columns: Vec<Column>,
}

/// The `REPLICA IDENTITY` setting of a relation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplicaIdentity {
    /// `d`: the primary key, if any.
    Default,
    /// `n`: nothing.
    Nothing,
    /// `f`: all columns.
    Full,
    /// `i`: the columns of a chosen unique index.
    Index,
}

impl ReplicaIdentity {
    /// The byte pgoutput sends for this setting.
    pub fn as_byte(self) -> u8 {
        match self {
            ReplicaIdentity::Default => b'd',
            ReplicaIdentity::Nothing => b'n',
            ReplicaIdentity::Full => b'f',
            ReplicaIdentity::Index => b'i',
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        match b {
            b'd' => Some(ReplicaIdentity::Default),
            b'n' => Some(ReplicaIdentity::Nothing),
            b'f' => Some(ReplicaIdentity::Full),
            b'i' => Some(ReplicaIdentity::Index),
            _ => None,
        }
    }
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Whether the column is part of the replica identity (the key).
    pub is_key: bool,
    /// The column's name.
    pub name: String,
    /// The OID of the column's data type.
    pub type_oid: u32,
    /// The type modifier (`atttypmod`), -1 if none.
    pub type_modifier: i32,
}

/// `Y`: a data type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeMessage {
    /// The type's OID.
    pub oid: u32,
    /// The schema; pgoutput sends an empty string for `pg_catalog`.
    pub namespace: String,
    /// The type's name.
    pub name: String,
}

/// `I`: a new row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    /// The OID of the relation (see [`Relation`]).
    pub relation: u32,
    /// The new row.
    pub new: Tuple,
}

/// `U`: a changed row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// The OID of the relation (see [`Relation`]).
    pub relation: u32,
    /// The old key or row, sent only if the key changed or the replica identity is `FULL`.
    pub old: Option<OldTuple>,
    /// The new row; TOASTed values that did not change are [`TupleValue::Unchanged`].
    pub new: Tuple,
}

/// `D`: a deleted row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    /// The OID of the relation (see [`Relation`]).
    pub relation: u32,
    /// The old key or row.
    pub old: OldTuple,
}

/// The old values of an updated or deleted row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// `K`: the replica identity columns only; the other columns are [`TupleValue::Null`].
    Key(Tuple),
    /// `O`: the whole old row (replica identity `FULL`).
    Full(Tuple),
}

impl OldTuple {
    /// The values, whichever kind this is.
    pub fn tuple(&self) -> &Tuple {
        match self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }
}

/// `T`: one `TRUNCATE` of one or more relations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    /// `TRUNCATE ... CASCADE`.
    pub cascade: bool,
    /// `TRUNCATE ... RESTART IDENTITY`.
    pub restart_identity: bool,
    /// The OIDs of the truncated relations.
    pub relations: Vec<u32>,
}

/// `M`: a logical decoding message from `pg_logical_emit_message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalMessage {
    /// Whether the message was emitted as part of a transaction (else it is sent at once).
    pub transactional: bool,
    /// The LSN of the message.
    pub lsn: Lsn,
    /// The prefix given to `pg_logical_emit_message`.
    pub prefix: String,
    /// The content, as sent (may be any bytes).
    pub content: Bytes,
}

/// The values of one row, in column order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tuple(pub Vec<TupleValue>);

/// One value of a [`Tuple`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    /// `n`: SQL NULL.
    Null,
    /// `u`: a TOASTed value that did not change and is not sent.
    Unchanged,
    /// `t`: the value in PostgreSQL's text format.
    Text(Bytes),
    /// `b`: the value in PostgreSQL's binary format.
    Binary(Bytes),
}

/// Why a pgoutput message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The message has no bytes at all.
    #[error("empty pgoutput message: expected at least a tag byte")]
    Empty,
    /// The message ended before a field.
    #[error(
        "truncated pgoutput {message} message: {field} needs {needed} bytes but only {remaining} remain"
    )]
    Truncated {
        /// The kind of message being decoded.
        message: &'static str,
        /// The field being read.
        field: &'static str,
        /// How many bytes the field needs.
        needed: usize,
        /// How many bytes were left.
        remaining: usize,
    },
    /// The tag is not a pgoutput message tag.
    #[error("unknown pgoutput message tag {}", show_tag(*.0))]
    UnknownMessage(u8),
    /// The tag belongs to a later protocol version.
    #[error(
        "unsupported pgoutput message {}: {reason}, streamex asks for protocol version 1",
        show_tag(*.tag)
    )]
    UnsupportedMessage {
        /// The tag.
        tag: u8,
        /// What the message is and which version it needs.
        reason: &'static str,
    },
    /// A string is not UTF-8.
    #[error(
        "pgoutput {message} message: {field} is not valid UTF-8 (the replication connection should use client_encoding UTF8)"
    )]
    InvalidUtf8 {
        /// The kind of message being decoded.
        message: &'static str,
        /// The field being read.
        field: &'static str,
    },
    /// A string runs to the end of the message without a terminating NUL.
    #[error("truncated pgoutput {message} message: string {field} has no terminating NUL byte")]
    MissingNul {
        /// The kind of message being decoded.
        message: &'static str,
        /// The field being read.
        field: &'static str,
    },
    /// A field has a value the format does not allow.
    #[error("invalid pgoutput {message} message: {detail}")]
    Invalid {
        /// The kind of message being decoded.
        message: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// Bytes follow the end of a complete message.
    #[error(
        "pgoutput {message} message has {count} trailing bytes after its last field; the decoder and the server disagree on the format"
    )]
    TrailingBytes {
        /// The kind of message decoded.
        message: &'static str,
        /// How many bytes were left over.
        count: usize,
    },
    /// The message is larger than [`MAX_MESSAGE_SIZE`].
    #[error("pgoutput message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The message's size.
        size: usize,
        /// The limit.
        limit: usize,
    },
}

/// A tag for error messages: `'B'` when printable ASCII, `0x01` otherwise.
fn show_tag(tag: u8) -> String {
    if tag.is_ascii_graphic() {
        format!("'{}'", char::from(tag))
    } else {
        format!("0x{tag:02x}")
    }
}

/// Decodes one pgoutput message (the payload of one XLogData frame).
pub fn decode(buf: Bytes) -> Result<PgOutputMessage, DecodeError> {
    if buf.len() > MAX_MESSAGE_SIZE {
        return Err(DecodeError::TooLarge {
            size: buf.len(),
            limit: MAX_MESSAGE_SIZE,
        });
    }
    let Some(&tag) = buf.first() else {
        return Err(DecodeError::Empty);
    };
    let mut body = buf;
    body.advance(1);
    let mut r = Reader::new(body, message_name(tag)?);
    let msg = match tag {
        b'B' => PgOutputMessage::Begin(Begin {
            final_lsn: Lsn(r.u64("final lsn")?),
            commit_time: r.i64("commit timestamp")?,
            xid: r.u32("xid")?,
        }),
        b'C' => PgOutputMessage::Commit(Commit {
            flags: r.u8("flags")?,
            commit_lsn: Lsn(r.u64("commit lsn")?),
            end_lsn: Lsn(r.u64("end lsn")?),
            commit_time: r.i64("commit timestamp")?,
        }),
        b'O' => PgOutputMessage::Origin(Origin {
            commit_lsn: Lsn(r.u64("commit lsn")?),
            name: r.string("origin name")?,
        }),
        b'R' => PgOutputMessage::Relation(read_relation(&mut r)?),
        b'Y' => PgOutputMessage::Type(TypeMessage {
            oid: r.u32("type oid")?,
            namespace: r.string("namespace")?,
            name: r.string("type name")?,
        }),
        b'I' => {
            let relation = r.u32("relation oid")?;
            r.expect_new_tuple_marker("")?;
            let new = r.tuple()?;
            PgOutputMessage::Insert(Insert { relation, new })
        }
        b'U' => {
            let relation = r.u32("relation oid")?;
            let old = match r.u8("tuple kind")? {
                b'K' => Some(OldTuple::Key(r.tuple()?)),
                b'O' => Some(OldTuple::Full(r.tuple()?)),
                b'N' => None,
                other => {
                    return Err(r.invalid(format!(
                        "expected 'K', 'O' or 'N' before a tuple, got {}",
                        show_tag(other)
                    )));
                }
            };
            if old.is_some() {
                r.expect_new_tuple_marker(" after the old one")?;
            }
            let new = r.tuple()?;
            PgOutputMessage::Update(Update { relation, old, new })
        }
        b'D' => {
            let relation = r.u32("relation oid")?;
            let old = match r.u8("tuple kind")? {
                b'K' => OldTuple::Key(r.tuple()?),
                b'O' => OldTuple::Full(r.tuple()?),
                other => {
                    return Err(r.invalid(format!(
                        "expected 'K' or 'O' before the old tuple, got {}",
                        show_tag(other)
                    )));
                }
            };
            PgOutputMessage::Delete(Delete { relation, old })
        }
        b'T' => {
            let count = r.count_i32("relation count")?;
            let options = r.u8("options")?;
            // Each OID takes 4 bytes: allocate no more than the message can hold.
            let mut relations = Vec::with_capacity(count.min(r.remaining() / 4));
            for _ in 0..count {
                relations.push(r.u32("relation oid")?);
            }
            PgOutputMessage::Truncate(Truncate {
                cascade: options & 1 != 0,
                restart_identity: options & 2 != 0,
                relations,
            })
        }
        b'M' => {
            let flags = r.u8("flags")?;
            let lsn = Lsn(r.u64("lsn")?);
            let prefix = r.string("prefix")?;
            let len = r.count_i32("content length")?;
            let content = r.bytes(len, "content")?;
            PgOutputMessage::Message(LogicalMessage {
                transactional: flags & 1 != 0,
                lsn,
                prefix,
                content,
            })
        }
        // `message_name` returned an error for every other tag.
        other => return Err(DecodeError::UnknownMessage(other)),
    };
    r.finish()?;
    Ok(msg)
}

/// The name of the message a tag starts, for error messages, or why it is not decoded.
fn message_name(tag: u8) -> Result<&'static str, DecodeError> {
    let unsupported = |reason| Err(DecodeError::UnsupportedMessage { tag, reason });
    match tag {
        b'B' => Ok("begin"),
        b'C' => Ok("commit"),
        b'O' => Ok("origin"),
        b'R' => Ok("relation"),
        b'Y' => Ok("type"),
        b'I' => Ok("insert"),
        b'U' => Ok("update"),
        b'D' => Ok("delete"),
        b'T' => Ok("truncate"),
        b'M' => Ok("logical"),
        b'S' => unsupported("stream start needs protocol version 2"),
        b'E' => unsupported("stream stop needs protocol version 2"),
        b'c' => unsupported("stream commit needs protocol version 2"),
        b'A' => unsupported("stream abort needs protocol version 2"),
        b'b' => unsupported("begin prepare needs protocol version 3"),
        b'P' => unsupported("prepare needs protocol version 3"),
        b'K' => unsupported("commit prepared needs protocol version 3"),
        b'r' => unsupported("rollback prepared needs protocol version 3"),
        b'p' => unsupported("stream prepare needs protocol version 3"),
        other => Err(DecodeError::UnknownMessage(other)),
    }
}

/// The body of a Relation message.
fn read_relation(r: &mut Reader) -> Result<Relation, DecodeError> {
    let oid = r.u32("relation oid")?;
    let namespace = r.string("namespace")?;
    let name = r.string("relation name")?;
    let identity = r.u8("replica identity")?;
    let Some(replica_identity) = ReplicaIdentity::from_byte(identity) else {
        return Err(r.invalid(format!(
            "unknown replica identity {}, expected 'd', 'n', 'f' or 'i'",
            show_tag(identity)
        )));
    };
    let count = r.count_i16("column count")?;
    // Each column takes at least 10 bytes (flags, an empty name, type OID and modifier):
    // allocate no more than the message can hold.
    let mut columns = Vec::with_capacity(count.min(r.remaining() / 10));
    for _ in 0..count {
        columns.push(Column {
            is_key: r.u8("column flags")? & 1 != 0,
            name: r.string("column name")?,
            type_oid: r.u32("column type oid")?,
            type_modifier: r.i32("column type modifier")?,
        });
    }
    Ok(Relation {
        oid,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

/// A cursor over the body of one message that checks the length before every read.
struct Reader {
    buf: Bytes,
    message: &'static str,
}

impl Reader {
    fn new(buf: Bytes, message: &'static str) -> Self {
        Reader { buf, message }
    }

    fn remaining(&self) -> usize {
        self.buf.len()
    }

    fn truncated(&self, field: &'static str, needed: usize) -> DecodeError {
        DecodeError::Truncated {
            message: self.message,
            field,
            needed,
            remaining: self.buf.len(),
        }
    }

    fn invalid(&self, detail: String) -> DecodeError {
        DecodeError::Invalid {
            message: self.message,
            detail,
        }
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let Some(&a) = self.buf.first_chunk::<N>() else {
            return Err(self.truncated(field, N));
        };
        self.buf.advance(N);
        Ok(a)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(u8::from_be_bytes(self.array(field)?))
    }

    fn i16(&mut self, field: &'static str) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.array(field)?))
    }

    fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array(field)?))
    }

    /// An `Int32` that is really unsigned (OIDs, xids).
    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    fn i64(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array(field)?))
    }

    /// An `Int64` that is really unsigned (LSNs).
    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }

    /// An `Int16` count or length, which must not be negative.
    fn count_i16(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let v = self.i16(field)?;
        usize::try_from(v).map_err(|_| self.invalid(format!("negative {field} {v}")))
    }

    /// An `Int32` count or length, which must not be negative.
    fn count_i32(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let v = self.i32(field)?;
        usize::try_from(v).map_err(|_| self.invalid(format!("negative {field} {v}")))
    }

    /// The next `n` bytes, as a slice of the input.
    fn bytes(&mut self, n: usize, field: &'static str) -> Result<Bytes, DecodeError> {
        if n > self.buf.len() {
            return Err(self.truncated(field, n));
        }
        Ok(self.buf.split_to(n))
    }

    /// A NUL-terminated UTF-8 string.
    fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let Some(end) = self.buf.iter().position(|&b| b == 0) else {
            return Err(DecodeError::MissingNul {
                message: self.message,
                field,
            });
        };
        let raw = self.buf.split_to(end);
        self.buf.advance(1); // the NUL, which `position` found
        match std::str::from_utf8(&raw) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(DecodeError::InvalidUtf8 {
                message: self.message,
                field,
            }),
        }
    }

    /// The `N` that precedes a new tuple.
    fn expect_new_tuple_marker(&mut self, context: &str) -> Result<(), DecodeError> {
        match self.u8("tuple kind")? {
            b'N' => Ok(()),
            other => Err(self.invalid(format!(
                "expected 'N' before the new tuple{context}, got {}",
                show_tag(other)
            ))),
        }
    }

    /// A `TupleData`.
    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let count = self.count_i16("tuple column count")?;
        // Each value takes at least its kind byte.
        let mut values = Vec::with_capacity(count.min(self.buf.len()));
        for _ in 0..count {
            let value = match self.u8("tuple value kind")? {
                b'n' => TupleValue::Null,
                b'u' => TupleValue::Unchanged,
                b't' => {
                    let len = self.count_i32("text value length")?;
                    TupleValue::Text(self.bytes(len, "text value")?)
                }
                b'b' => {
                    let len = self.count_i32("binary value length")?;
                    TupleValue::Binary(self.bytes(len, "binary value")?)
                }
                other => {
                    return Err(self.invalid(format!(
                        "unknown tuple value kind {}, expected 'n', 'u', 't' or 'b'",
                        show_tag(other)
                    )));
                }
            };
            values.push(value);
        }
        Ok(Tuple(values))
    }

    /// Checks that the whole message was consumed.
    fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes {
                message: self.message,
                count: self.buf.len(),
            })
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
