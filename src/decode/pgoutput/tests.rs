use super::*;
use proptest::prelude::*;
use proptest::sample::Index;

/// A test-only encoder, written from the format description rather than from the
/// decoder, so that expected values do not depend on the code under test.
pub(crate) struct Enc(Vec<u8>);

impl Enc {
    pub(crate) fn new(tag: u8) -> Self {
        Enc(vec![tag])
    }
    pub(crate) fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    pub(crate) fn i16(mut self, v: i16) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub(crate) fn i32(mut self, v: i32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub(crate) fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub(crate) fn i64(mut self, v: i64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub(crate) fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub(crate) fn raw(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    /// A NUL-terminated string.
    pub(crate) fn str(self, s: &str) -> Self {
        self.raw(s.as_bytes()).u8(0)
    }
    /// An `Int16` count.
    pub(crate) fn count(self, n: usize) -> Self {
        self.i16(i16::try_from(n).unwrap())
    }
    /// An `Int32` length followed by the bytes.
    pub(crate) fn len_bytes(self, b: &[u8]) -> Self {
        self.i32(i32::try_from(b.len()).unwrap()).raw(b)
    }
    pub(crate) fn text(self, b: &[u8]) -> Self {
        self.u8(b't').len_bytes(b)
    }
    pub(crate) fn binary(self, b: &[u8]) -> Self {
        self.u8(b'b').len_bytes(b)
    }
    pub(crate) fn tuple(self, t: &Tuple) -> Self {
        let mut e = self.count(t.0.len());
        for v in &t.0 {
            e = match v {
                TupleValue::Null => e.u8(b'n'),
                TupleValue::Unchanged => e.u8(b'u'),
                TupleValue::Text(b) => e.text(b),
                TupleValue::Binary(b) => e.binary(b),
            };
        }
        e
    }
    pub(crate) fn old(self, old: &OldTuple) -> Self {
        match old {
            OldTuple::Key(t) => self.u8(b'K').tuple(t),
            OldTuple::Full(t) => self.u8(b'O').tuple(t),
        }
    }
    pub(crate) fn done(self) -> Bytes {
        Bytes::from(self.0)
    }
}

/// Encodes a message the way pgoutput does (protocol version 1).
fn encode(m: &PgOutputMessage) -> Bytes {
    match m {
        PgOutputMessage::Begin(b) => Enc::new(b'B')
            .u64(b.final_lsn.0)
            .i64(b.commit_time)
            .u32(b.xid),
        PgOutputMessage::Commit(c) => Enc::new(b'C')
            .u8(c.flags)
            .u64(c.commit_lsn.0)
            .u64(c.end_lsn.0)
            .i64(c.commit_time),
        PgOutputMessage::Origin(o) => Enc::new(b'O').u64(o.commit_lsn.0).str(&o.name),
        PgOutputMessage::Relation(r) => {
            let identity = match r.replica_identity {
                ReplicaIdentity::Default => b'd',
                ReplicaIdentity::Nothing => b'n',
                ReplicaIdentity::Full => b'f',
                ReplicaIdentity::Index => b'i',
            };
            let mut e = Enc::new(b'R')
                .u32(r.oid)
                .str(&r.namespace)
                .str(&r.name)
                .u8(identity)
                .count(r.columns.len());
            for c in &r.columns {
                e = e
                    .u8(u8::from(c.is_key))
                    .str(&c.name)
                    .u32(c.type_oid)
                    .i32(c.type_modifier);
            }
            e
        }
        PgOutputMessage::Type(t) => Enc::new(b'Y').u32(t.oid).str(&t.namespace).str(&t.name),
        PgOutputMessage::Insert(i) => Enc::new(b'I').u32(i.relation).u8(b'N').tuple(&i.new),
        PgOutputMessage::Update(u) => {
            let mut e = Enc::new(b'U').u32(u.relation);
            if let Some(old) = &u.old {
                e = e.old(old);
            }
            e.u8(b'N').tuple(&u.new)
        }
        PgOutputMessage::Delete(d) => Enc::new(b'D').u32(d.relation).old(&d.old),
        PgOutputMessage::Truncate(t) => {
            let options = u8::from(t.cascade) | (u8::from(t.restart_identity) << 1);
            let mut e = Enc::new(b'T')
                .i32(i32::try_from(t.relations.len()).unwrap())
                .u8(options);
            for &oid in &t.relations {
                e = e.u32(oid);
            }
            e
        }
        PgOutputMessage::Message(m) => Enc::new(b'M')
            .u8(u8::from(m.transactional))
            .u64(m.lsn.0)
            .str(&m.prefix)
            .len_bytes(&m.content),
    }
    .done()
}

fn text(s: &str) -> TupleValue {
    TupleValue::Text(Bytes::copy_from_slice(s.as_bytes()))
}

fn binary(b: &[u8]) -> TupleValue {
    TupleValue::Binary(Bytes::copy_from_slice(b))
}

fn ok(buf: Bytes) -> PgOutputMessage {
    match decode(buf.clone()) {
        Ok(m) => m,
        Err(e) => panic!("decoding {buf:?} failed: {e}"),
    }
}

fn err(buf: Bytes) -> DecodeError {
    match decode(buf.clone()) {
        Ok(m) => panic!("decoding {buf:?} succeeded: {m:?}"),
        Err(e) => e,
    }
}

/// Hand-built messages of every kind, for the prefix and trailing-byte tests.
fn samples() -> Vec<Bytes> {
    vec![
        Enc::new(b'B').u64(1).i64(2).u32(3).done(),
        Enc::new(b'C').u8(0).u64(1).u64(2).i64(3).done(),
        Enc::new(b'O').u64(1).str("origin").done(),
        Enc::new(b'O').u64(1).str("").done(),
        Enc::new(b'R')
            .u32(16384)
            .str("public")
            .str("t")
            .u8(b'd')
            .i16(2)
            .u8(1)
            .str("id")
            .u32(23)
            .i32(-1)
            .u8(0)
            .str("v")
            .u32(25)
            .i32(-1)
            .done(),
        Enc::new(b'R').u32(1).str("").str("").u8(b'n').i16(0).done(),
        Enc::new(b'Y').u32(16400).str("public").str("mood").done(),
        Enc::new(b'I')
            .u32(16384)
            .u8(b'N')
            .i16(4)
            .u8(b'n')
            .u8(b'u')
            .text(b"42")
            .binary(&[0, 1])
            .done(),
        Enc::new(b'I').u32(1).u8(b'N').i16(0).done(),
        Enc::new(b'I').u32(1).u8(b'N').i16(1).text(b"").done(),
        Enc::new(b'U')
            .u32(1)
            .u8(b'K')
            .i16(1)
            .text(b"1")
            .u8(b'N')
            .i16(2)
            .text(b"2")
            .u8(b'u')
            .done(),
        Enc::new(b'U')
            .u32(1)
            .u8(b'O')
            .i16(1)
            .u8(b'n')
            .u8(b'N')
            .i16(1)
            .text(b"2")
            .done(),
        Enc::new(b'U').u32(1).u8(b'N').i16(1).text(b"x").done(),
        Enc::new(b'D').u32(1).u8(b'K').i16(1).text(b"1").done(),
        Enc::new(b'D')
            .u32(1)
            .u8(b'O')
            .i16(2)
            .text(b"1")
            .u8(b'n')
            .done(),
        Enc::new(b'T').i32(2).u8(3).u32(1).u32(2).done(),
        Enc::new(b'T').i32(0).u8(0).done(),
        Enc::new(b'M')
            .u8(1)
            .u64(7)
            .str("pfx")
            .len_bytes(b"hello")
            .done(),
        Enc::new(b'M').u8(0).u64(7).str("").len_bytes(b"").done(),
    ]
}

#[test]
fn begin() {
    let m = ok(Enc::new(b'B')
        .u64(0x0000_0001_016B_3748)
        .i64(757_382_400_000_000)
        .u32(0xFFFF_FFF0)
        .done());
    assert_eq!(
        m,
        PgOutputMessage::Begin(Begin {
            final_lsn: Lsn(0x0000_0001_016B_3748),
            commit_time: 757_382_400_000_000,
            xid: 0xFFFF_FFF0,
        })
    );
}

#[test]
fn commit() {
    for flags in [0, 1, 0xFF] {
        let m = ok(Enc::new(b'C')
            .u8(flags)
            .u64(0x10)
            .u64(u64::MAX)
            .i64(-5)
            .done());
        assert_eq!(
            m,
            PgOutputMessage::Commit(Commit {
                flags,
                commit_lsn: Lsn(0x10),
                end_lsn: Lsn(u64::MAX),
                commit_time: -5,
            })
        );
    }
}

#[test]
fn origin() {
    let m = ok(Enc::new(b'O').u64(99).str("node_a ä").done());
    assert_eq!(
        m,
        PgOutputMessage::Origin(Origin {
            commit_lsn: Lsn(99),
            name: "node_a ä".into(),
        })
    );
}

#[test]
fn relation_with_keys_and_every_replica_identity() {
    for (byte, identity) in [
        (b'd', ReplicaIdentity::Default),
        (b'n', ReplicaIdentity::Nothing),
        (b'f', ReplicaIdentity::Full),
        (b'i', ReplicaIdentity::Index),
    ] {
        let m = ok(Enc::new(b'R')
            .u32(0xFFFF_0001)
            .str("my schema")
            .str("Orders")
            .u8(byte)
            .i16(3)
            .u8(1)
            .str("id")
            .u32(20)
            .i32(-1)
            .u8(0)
            .str("price")
            .u32(1700)
            .i32(655_366)
            .u8(1)
            .str("région")
            .u32(1043)
            .i32(14)
            .done());
        assert_eq!(
            m,
            PgOutputMessage::Relation(Relation {
                oid: 0xFFFF_0001,
                namespace: "my schema".into(),
                name: "Orders".into(),
                replica_identity: identity,
                columns: vec![
                    Column {
                        is_key: true,
                        name: "id".into(),
                        type_oid: 20,
                        type_modifier: -1,
                    },
                    Column {
                        is_key: false,
                        name: "price".into(),
                        type_oid: 1700,
                        type_modifier: 655_366,
                    },
                    Column {
                        is_key: true,
                        name: "région".into(),
                        type_oid: 1043,
                        type_modifier: 14,
                    },
                ],
            })
        );
        assert_eq!(identity.as_byte(), byte);
    }
}

#[test]
fn relation_with_empty_namespace_and_no_columns() {
    let m = ok(Enc::new(b'R')
        .u32(1259)
        .str("")
        .str("pg_class")
        .u8(b'n')
        .i16(0)
        .done());
    assert_eq!(
        m,
        PgOutputMessage::Relation(Relation {
            oid: 1259,
            namespace: String::new(),
            name: "pg_class".into(),
            replica_identity: ReplicaIdentity::Nothing,
            columns: vec![],
        })
    );
}

#[test]
fn type_message() {
    let m = ok(Enc::new(b'Y').u32(16500).str("").str("mood").done());
    assert_eq!(
        m,
        PgOutputMessage::Type(TypeMessage {
            oid: 16500,
            namespace: String::new(),
            name: "mood".into(),
        })
    );
}

#[test]
fn insert_with_every_value_kind() {
    let input = Enc::new(b'I')
        .u32(16384)
        .u8(b'N')
        .i16(5)
        .u8(b'n')
        .u8(b'u')
        .text(b"42")
        .binary(&[0, 0xFF, 0])
        .text(b"")
        .done();
    let m = ok(input.clone());
    assert_eq!(
        m,
        PgOutputMessage::Insert(Insert {
            relation: 16384,
            new: Tuple(vec![
                TupleValue::Null,
                TupleValue::Unchanged,
                text("42"),
                binary(&[0, 0xFF, 0]),
                text(""),
            ]),
        })
    );
    // Values are slices of the input, not copies.
    let PgOutputMessage::Insert(insert) = m else {
        unreachable!()
    };
    let TupleValue::Text(v) = &insert.new.0[2] else {
        unreachable!()
    };
    let range = input.as_ptr_range();
    assert!(range.contains(&v.as_ptr()));
}

#[test]
fn update_with_key() {
    let m = ok(Enc::new(b'U')
        .u32(7)
        .u8(b'K')
        .i16(2)
        .text(b"1")
        .u8(b'n')
        .u8(b'N')
        .i16(2)
        .text(b"2")
        .u8(b'u')
        .done());
    assert_eq!(
        m,
        PgOutputMessage::Update(Update {
            relation: 7,
            old: Some(OldTuple::Key(Tuple(vec![text("1"), TupleValue::Null]))),
            new: Tuple(vec![text("2"), TupleValue::Unchanged]),
        })
    );
}

#[test]
fn update_with_old_row() {
    let m = ok(Enc::new(b'U')
        .u32(7)
        .u8(b'O')
        .i16(2)
        .text(b"1")
        .binary(b"\x01")
        .u8(b'N')
        .i16(2)
        .text(b"1")
        .binary(b"\x02")
        .done());
    let PgOutputMessage::Update(u) = m else {
        panic!("not an update: {m:?}")
    };
    assert_eq!(u.relation, 7);
    assert_eq!(
        u.old,
        Some(OldTuple::Full(Tuple(vec![text("1"), binary(b"\x01")])))
    );
    assert_eq!(u.old.as_ref().map(|o| o.tuple().0.len()), Some(2));
    assert_eq!(u.new, Tuple(vec![text("1"), binary(b"\x02")]));
}

#[test]
fn update_without_old_tuple() {
    let m = ok(Enc::new(b'U').u32(7).u8(b'N').i16(1).text(b"x").done());
    assert_eq!(
        m,
        PgOutputMessage::Update(Update {
            relation: 7,
            old: None,
            new: Tuple(vec![text("x")]),
        })
    );
}

#[test]
fn delete_with_key_and_with_old_row() {
    let m = ok(Enc::new(b'D').u32(9).u8(b'K').i16(1).text(b"5").done());
    assert_eq!(
        m,
        PgOutputMessage::Delete(Delete {
            relation: 9,
            old: OldTuple::Key(Tuple(vec![text("5")])),
        })
    );
    let m = ok(Enc::new(b'D')
        .u32(9)
        .u8(b'O')
        .i16(3)
        .text(b"5")
        .u8(b'n')
        .binary(b"")
        .done());
    assert_eq!(
        m,
        PgOutputMessage::Delete(Delete {
            relation: 9,
            old: OldTuple::Full(Tuple(vec![text("5"), TupleValue::Null, binary(b"")])),
        })
    );
}

#[test]
fn truncate_with_options() {
    for (options, cascade, restart_identity) in [
        (0, false, false),
        (1, true, false),
        (2, false, true),
        (3, true, true),
    ] {
        let m = ok(Enc::new(b'T')
            .i32(3)
            .u8(options)
            .u32(16384)
            .u32(16390)
            .u32(u32::MAX)
            .done());
        assert_eq!(
            m,
            PgOutputMessage::Truncate(Truncate {
                cascade,
                restart_identity,
                relations: vec![16384, 16390, u32::MAX],
            })
        );
    }
}

#[test]
fn logical_messages() {
    let m = ok(Enc::new(b'M')
        .u8(0)
        .u64(0xABCD)
        .str("streamex.heartbeat")
        .len_bytes(&[0, 0xFF, 0xC3, 0x28, 0])
        .done());
    assert_eq!(
        m,
        PgOutputMessage::Message(LogicalMessage {
            transactional: false,
            lsn: Lsn(0xABCD),
            prefix: "streamex.heartbeat".into(),
            content: Bytes::from_static(&[0, 0xFF, 0xC3, 0x28, 0]),
        })
    );
    let m = ok(Enc::new(b'M').u8(1).u64(1).str("p").len_bytes(b"").done());
    assert_eq!(
        m,
        PgOutputMessage::Message(LogicalMessage {
            transactional: true,
            lsn: Lsn(1),
            prefix: "p".into(),
            content: Bytes::new(),
        })
    );
}

#[test]
fn every_proper_prefix_is_an_error() {
    for sample in samples() {
        ok(sample.clone());
        for end in 0..sample.len() {
            err(sample.slice(..end));
        }
    }
}

#[test]
fn trailing_bytes_are_an_error() {
    for sample in samples() {
        let mut longer = sample.to_vec();
        longer.push(0);
        assert!(
            matches!(
                err(Bytes::from(longer)),
                DecodeError::TrailingBytes { count: 1, .. }
            ),
            "{sample:?}"
        );
    }
}

#[test]
fn empty_and_unknown_tags() {
    assert_eq!(err(Bytes::new()), DecodeError::Empty);
    assert_eq!(
        err(Bytes::from_static(b"Z")),
        DecodeError::UnknownMessage(b'Z')
    );
    let e = err(Bytes::from_static(b"\x00\x01"));
    assert_eq!(e, DecodeError::UnknownMessage(0));
    assert_eq!(e.to_string(), "unknown pgoutput message tag 0x00");
    assert_eq!(
        err(Bytes::from_static(b"Q")).to_string(),
        "unknown pgoutput message tag 'Q'"
    );
}

#[test]
fn newer_protocol_tags_are_unsupported() {
    for tag in *b"SEcAbPKrp" {
        for body in [&b""[..], &[0; 64][..]] {
            let mut buf = vec![tag];
            buf.extend_from_slice(body);
            let e = err(Bytes::from(buf));
            assert!(
                matches!(e, DecodeError::UnsupportedMessage { tag: t, .. } if t == tag),
                "{e:?}"
            );
            let text = e.to_string();
            assert!(text.contains("needs protocol version"), "{text}");
            assert!(
                text.contains("streamex asks for protocol version 1"),
                "{text}"
            );
        }
    }
}

#[test]
fn too_large() {
    // `vec![0; n]` maps zeroed pages lazily, so this does not touch a gigabyte.
    let e = err(Bytes::from(vec![0u8; MAX_MESSAGE_SIZE + 1]));
    assert_eq!(
        e,
        DecodeError::TooLarge {
            size: MAX_MESSAGE_SIZE + 1,
            limit: MAX_MESSAGE_SIZE,
        }
    );
}

fn assert_invalid(buf: Bytes, needle: &str) {
    match err(buf) {
        DecodeError::Invalid { detail, .. } => {
            assert!(detail.contains(needle), "{detail:?} lacks {needle:?}")
        }
        e => panic!("expected an invalid-message error about {needle:?}, got {e:?}"),
    }
}

fn assert_truncated(buf: Bytes) {
    let e = err(buf);
    assert!(matches!(e, DecodeError::Truncated { .. }), "{e:?}");
}

#[test]
fn negative_and_huge_lengths_and_counts() {
    let insert = |count: i16| Enc::new(b'I').u32(1).u8(b'N').i16(count);
    for len in [-1, -2, i32::MIN] {
        assert_invalid(
            insert(1).u8(b't').i32(len).done(),
            "negative text value length",
        );
        assert_invalid(
            insert(1).u8(b'b').i32(len).done(),
            "negative binary value length",
        );
        assert_invalid(
            Enc::new(b'M').u8(0).u64(0).str("p").i32(len).done(),
            "negative content length",
        );
        assert_invalid(
            Enc::new(b'T').i32(len).u8(0).done(),
            "negative relation count",
        );
    }
    assert_invalid(insert(-1).done(), "negative tuple column count");
    assert_invalid(insert(i16::MIN).done(), "negative tuple column count");
    assert_invalid(
        Enc::new(b'R')
            .u32(1)
            .str("")
            .str("t")
            .u8(b'd')
            .i16(-1)
            .done(),
        "negative column count",
    );
    // Lengths and counts larger than the message are truncation, not allocation.
    assert_truncated(insert(1).u8(b't').i32(i32::MAX).raw(b"abc").done());
    assert_truncated(insert(1).u8(b'b').i32(i32::MAX).done());
    assert_truncated(insert(i16::MAX).u8(b'n').done());
    assert_truncated(Enc::new(b'M').u8(0).u64(0).str("p").i32(i32::MAX).done());
    assert_truncated(Enc::new(b'T').i32(i32::MAX).u8(0).u32(1).done());
    assert_truncated(
        Enc::new(b'R')
            .u32(1)
            .str("")
            .str("t")
            .u8(b'd')
            .i16(i16::MAX)
            .done(),
    );
}

#[test]
fn bad_tags_inside_messages() {
    assert_invalid(Enc::new(b'I').u32(1).u8(b'x').i16(0).done(), "expected 'N'");
    assert_invalid(
        Enc::new(b'I').u32(1).u8(b'N').i16(1).u8(b'x').done(),
        "unknown tuple value kind 'x'",
    );
    assert_invalid(
        Enc::new(b'U').u32(1).u8(b'x').i16(0).done(),
        "expected 'K', 'O' or 'N'",
    );
    // After an old tuple only 'N' may follow.
    assert_invalid(
        Enc::new(b'U').u32(1).u8(b'K').i16(0).u8(b'K').i16(0).done(),
        "expected 'N' before the new tuple after the old one, got 'K'",
    );
    assert_invalid(
        Enc::new(b'U').u32(1).u8(b'O').i16(0).u8(b'O').i16(0).done(),
        "expected 'N' before the new tuple after the old one, got 'O'",
    );
    assert_invalid(
        Enc::new(b'D').u32(1).u8(b'N').i16(0).done(),
        "expected 'K' or 'O'",
    );
    assert_invalid(
        Enc::new(b'R')
            .u32(1)
            .str("")
            .str("t")
            .u8(b'x')
            .i16(0)
            .done(),
        "unknown replica identity 'x'",
    );
}

#[test]
fn invalid_utf8_and_missing_nul() {
    let bad = Enc::new(b'R')
        .u32(1)
        .str("public")
        .raw(&[b'a', 0xC3, 0x28, 0])
        .u8(b'd')
        .i16(0)
        .done();
    assert_eq!(
        err(bad),
        DecodeError::InvalidUtf8 {
            message: "relation",
            field: "relation name",
        }
    );
    let bad = Enc::new(b'R')
        .u32(1)
        .str("")
        .str("t")
        .u8(b'd')
        .i16(1)
        .u8(0)
        .raw(&[0xFF, 0])
        .u32(1)
        .i32(-1)
        .done();
    assert!(matches!(
        err(bad),
        DecodeError::InvalidUtf8 {
            field: "column name",
            ..
        }
    ));
    assert!(matches!(
        err(Enc::new(b'Y').u32(1).str("").raw(b"mood").done()),
        DecodeError::MissingNul {
            message: "type",
            field: "type name",
        }
    ));
}

#[test]
fn error_messages_are_lowercase() {
    let errors = [
        err(Bytes::new()),
        err(Bytes::from_static(b"Z")),
        err(Bytes::from_static(b"S")),
        err(Bytes::from_static(b"B")),
        err(Enc::new(b'Y').u32(1).raw(b"x").done()),
        err(Enc::new(b'Y').u32(1).raw(b"\xFF\x00").done()),
        err(Enc::new(b'T').i32(-1).u8(0).done()),
        err(Enc::new(b'T').i32(0).u8(0).u8(0).done()),
    ];
    for e in errors {
        let text = e.to_string();
        assert!(text.starts_with(char::is_lowercase), "{text}");
    }
    assert_eq!(
        err(Bytes::from_static(b"B\x00")).to_string(),
        "truncated pgoutput begin message: final lsn needs 8 bytes but only 1 remain"
    );
}

#[test]
fn pg_epoch_conversion() {
    assert_eq!(pg_epoch_to_unix_micros(0), 946_684_800_000_000);
    // 2024-01-01T00:00:00Z.
    assert_eq!(
        pg_epoch_to_unix_micros(757_382_400_000_000),
        1_704_067_200_000_000
    );
    assert_eq!(pg_epoch_to_unix_micros(i64::MAX), i64::MAX);
    assert_eq!(
        pg_epoch_to_unix_micros(i64::MIN),
        i64::MIN + 946_684_800_000_000
    );
}

// ---- property tests ----

const TAGS: &[u8] = b"BCORYIUDTMSEcAbPKrp";

fn arb_name() -> impl Strategy<Value = String> {
    any::<String>().prop_map(|s| s.replace('\0', ""))
}

fn arb_bytes(max: usize) -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn arb_value() -> impl Strategy<Value = TupleValue> {
    prop_oneof![
        Just(TupleValue::Null),
        Just(TupleValue::Unchanged),
        arb_bytes(40).prop_map(TupleValue::Text),
        arb_bytes(40).prop_map(TupleValue::Binary),
    ]
}

fn arb_tuple() -> impl Strategy<Value = Tuple> {
    prop::collection::vec(arb_value(), 0..24).prop_map(Tuple)
}

fn arb_old() -> impl Strategy<Value = OldTuple> {
    prop_oneof![
        arb_tuple().prop_map(OldTuple::Key),
        arb_tuple().prop_map(OldTuple::Full),
    ]
}

fn arb_lsn() -> impl Strategy<Value = Lsn> {
    any::<u64>().prop_map(Lsn)
}

fn arb_identity() -> impl Strategy<Value = ReplicaIdentity> {
    prop_oneof![
        Just(ReplicaIdentity::Default),
        Just(ReplicaIdentity::Nothing),
        Just(ReplicaIdentity::Full),
        Just(ReplicaIdentity::Index),
    ]
}

fn arb_column() -> impl Strategy<Value = Column> {
    (any::<bool>(), arb_name(), any::<u32>(), any::<i32>()).prop_map(
        |(is_key, name, type_oid, type_modifier)| Column {
            is_key,
            name,
            type_oid,
            type_modifier,
        },
    )
}

fn arb_message() -> impl Strategy<Value = PgOutputMessage> {
    prop_oneof![
        (arb_lsn(), any::<i64>(), any::<u32>()).prop_map(|(final_lsn, commit_time, xid)| {
            PgOutputMessage::Begin(Begin {
                final_lsn,
                commit_time,
                xid,
            })
        }),
        (any::<u8>(), arb_lsn(), arb_lsn(), any::<i64>()).prop_map(
            |(flags, commit_lsn, end_lsn, commit_time)| {
                PgOutputMessage::Commit(Commit {
                    flags,
                    commit_lsn,
                    end_lsn,
                    commit_time,
                })
            }
        ),
        (arb_lsn(), arb_name()).prop_map(|(commit_lsn, name)| {
            PgOutputMessage::Origin(Origin { commit_lsn, name })
        }),
        (
            any::<u32>(),
            arb_name(),
            arb_name(),
            arb_identity(),
            prop::collection::vec(arb_column(), 0..12),
        )
            .prop_map(|(oid, namespace, name, replica_identity, columns)| {
                PgOutputMessage::Relation(Relation {
                    oid,
                    namespace,
                    name,
                    replica_identity,
                    columns,
                })
            }),
        (any::<u32>(), arb_name(), arb_name()).prop_map(|(oid, namespace, name)| {
            PgOutputMessage::Type(TypeMessage {
                oid,
                namespace,
                name,
            })
        }),
        (any::<u32>(), arb_tuple())
            .prop_map(|(relation, new)| PgOutputMessage::Insert(Insert { relation, new })),
        (any::<u32>(), prop::option::of(arb_old()), arb_tuple()).prop_map(
            |(relation, old, new)| PgOutputMessage::Update(Update { relation, old, new })
        ),
        (any::<u32>(), arb_old())
            .prop_map(|(relation, old)| PgOutputMessage::Delete(Delete { relation, old })),
        (
            any::<bool>(),
            any::<bool>(),
            prop::collection::vec(any::<u32>(), 0..32)
        )
            .prop_map(|(cascade, restart_identity, relations)| {
                PgOutputMessage::Truncate(Truncate {
                    cascade,
                    restart_identity,
                    relations,
                })
            }),
        (any::<bool>(), arb_lsn(), arb_name(), arb_bytes(200)).prop_map(
            |(transactional, lsn, prefix, content)| {
                PgOutputMessage::Message(LogicalMessage {
                    transactional,
                    lsn,
                    prefix,
                    content,
                })
            }
        ),
    ]
}

/// Arbitrary bytes after a tag that the decoder knows.
fn arb_tagged() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(TAGS),
        prop::collection::vec(any::<u8>(), 0..2048),
    )
        .prop_map(|(tag, rest)| {
            let mut buf = vec![tag];
            buf.extend_from_slice(&rest);
            buf
        })
}

/// A well-formed message with a few random edits: overwritten, inserted and removed
/// bytes, truncation, and extreme 16- and 32-bit integers written over lengths.
fn arb_mutated() -> impl Strategy<Value = Vec<u8>> {
    (
        arb_message(),
        prop::collection::vec((any::<Index>(), any::<u8>(), 0u8..6), 1..5),
    )
        .prop_map(|(m, edits)| {
            let mut buf = encode(&m).to_vec();
            for (at, byte, kind) in edits {
                if buf.is_empty() {
                    buf.push(byte);
                    continue;
                }
                let at = at.index(buf.len());
                let extreme: [u8; 4] = match byte % 4 {
                    0 => [0xFF; 4],
                    1 => [0x7F, 0xFF, 0xFF, 0xFF],
                    2 => [0x80, 0, 0, 0],
                    _ => [0, 0, 0x7F, 0xFF],
                };
                match kind {
                    0 => buf[at] = byte,
                    1 => buf.insert(at, byte),
                    2 => {
                        buf.remove(at);
                    }
                    3 => buf.truncate(at),
                    4 => {
                        for (i, b) in extreme.iter().enumerate() {
                            if let Some(slot) = buf.get_mut(at + i) {
                                *slot = *b;
                            }
                        }
                    }
                    _ => {
                        for (i, b) in extreme[2..].iter().enumerate() {
                            if let Some(slot) = buf.get_mut(at + i) {
                                *slot = *b;
                            }
                        }
                    }
                }
            }
            buf
        })
}

fn arb_input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..4096),
        arb_tagged(),
        arb_mutated(),
    ]
}

/// Decodes any input without panicking; whatever decodes must re-encode to something that
/// decodes to the same message, and errors must display.
fn check_any_input(buf: Vec<u8>) -> Result<(), TestCaseError> {
    match decode(Bytes::from(buf)) {
        Ok(m) => prop_assert_eq!(decode(encode(&m)), Ok(m)),
        Err(e) => prop_assert!(!e.to_string().is_empty()),
    }
    Ok(())
}

proptest! {
    #[test]
    fn never_panics_on_arbitrary_bytes(buf in prop::collection::vec(any::<u8>(), 0..4096)) {
        check_any_input(buf)?;
    }

    #[test]
    fn never_panics_after_a_known_tag(buf in arb_tagged()) {
        check_any_input(buf)?;
    }

    #[test]
    fn never_panics_on_edited_messages(buf in arb_mutated()) {
        check_any_input(buf)?;
    }

    #[test]
    fn round_trip(m in arb_message()) {
        let buf = encode(&m);
        prop_assert_eq!(decode(buf.clone()), Ok(m));
        // Every proper prefix is an error, and so is any extra byte.
        for end in 0..buf.len() {
            prop_assert!(decode(buf.slice(..end)).is_err(), "prefix of {} bytes decoded", end);
        }
        let mut longer = buf.to_vec();
        longer.push(b'x');
        let trailing = matches!(decode(Bytes::from(longer)), Err(DecodeError::TrailingBytes { count: 1, .. }));
        prop_assert!(trailing);
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
    /// `STREAMEX_FUZZ_CASES=5000000 cargo test --lib fuzz_decode_long -- --ignored`.
    #[test]
    #[ignore = "long-running fuzzing; run on demand with --ignored"]
    fn fuzz_decode_long(buf in arb_input()) {
        check_any_input(buf)?;
    }
}
