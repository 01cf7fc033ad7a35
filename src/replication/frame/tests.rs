use proptest::prelude::*;

use super::*;

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&i32::try_from(body.len() + 4).unwrap().to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn header(tag: u8, len: i32) -> BytesMut {
    let mut buf = BytesMut::from(&[tag][..]);
    buf.extend_from_slice(&len.to_be_bytes());
    buf
}

#[test]
fn waits_for_a_truncated_message() {
    let whole = frame(b'd', b"hello");
    for cut in 0..whole.len() {
        let mut buf = BytesMut::from(&whole[..cut]);
        assert!(try_frame(&mut buf).unwrap().is_none(), "{cut} bytes");
        assert_eq!(
            buf[..],
            whole[..cut],
            "{cut} bytes: the buffer is left as it was"
        );
    }
    let mut buf = BytesMut::from(&whole[..]);
    let f = try_frame(&mut buf).unwrap().unwrap();
    assert_eq!((f.tag, &f.body[..]), (b'd', &b"hello"[..]));
    assert!(buf.is_empty());
}

#[test]
fn takes_an_empty_body() {
    let mut buf = BytesMut::from(&frame(b'c', b"")[..]);
    let f = try_frame(&mut buf).unwrap().unwrap();
    assert_eq!((f.tag, f.body.len()), (b'c', 0));
    assert!(buf.is_empty());
}

#[test]
fn refuses_a_length_below_its_own_size() {
    for len in [3, 0, -1, i32::MIN] {
        let e = try_frame(&mut header(b'd', len)).unwrap_err();
        assert!(
            matches!(&e, ReplicationError::Protocol(m) if m.contains("invalid length")),
            "{len}: {e:?}"
        );
    }
}

#[test]
fn refuses_a_length_beyond_the_cap_before_the_body_comes() {
    let cap = i32::try_from(MAX_BACKEND_MESSAGE).unwrap();
    // At the cap, it waits for the body.
    assert!(try_frame(&mut header(b'd', cap)).unwrap().is_none());
    assert_eq!(
        frame_size(&header(b'd', cap)).unwrap(),
        Some(MAX_BACKEND_MESSAGE + 1)
    );
    for len in [cap + 1, i32::MAX] {
        let e = try_frame(&mut header(b'd', len)).unwrap_err();
        assert!(e.to_string().contains("more than the limit"), "{len}: {e}");
    }
}

#[test]
fn takes_several_messages_out_of_one_buffer_in_order() {
    let mut bytes = frame(b'd', b"one");
    bytes.extend(frame(b'k', b"two!"));
    bytes.extend(frame(b'c', b""));
    bytes.extend(&frame(b'd', b"partial")[..6]);
    let mut buf = BytesMut::from(&bytes[..]);
    let mut got = Vec::new();
    while let Some(f) = try_frame(&mut buf).unwrap() {
        got.push((f.tag, f.body.to_vec()));
    }
    assert_eq!(
        got,
        [
            (b'd', b"one".to_vec()),
            (b'k', b"two!".to_vec()),
            (b'c', Vec::new())
        ]
    );
    assert_eq!(buf.len(), 6, "the partial message stays for the next read");
}

#[test]
fn a_message_split_across_reads_comes_whole() {
    let mut bytes = frame(b'd', b"wxyz");
    bytes.extend(frame(b'c', b""));
    bytes.extend(frame(b'd', &[7u8; 5000]));
    for chunk in [1, 2, 3, 5, 7, 4096] {
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for read in bytes.chunks(chunk) {
            buf.extend_from_slice(read);
            while let Some(f) = try_frame(&mut buf).unwrap() {
                got.push((f.tag, f.body.len()));
            }
        }
        assert_eq!(
            got,
            [(b'd', 4), (b'c', 0), (b'd', 5000)],
            "reads of {chunk}"
        );
        assert!(buf.is_empty());
    }
}

#[test]
fn debug_shows_no_body() {
    let mut buf = BytesMut::from(&frame(b'd', b"secret")[..]);
    let text = format!("{:?}", try_frame(&mut buf).unwrap().unwrap());
    assert!(!text.contains("secret") && !text.contains("115"), "{text}");
}

proptest! {
    /// Any bytes: no panic, and what comes out plus what stays is what went in.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut buf = BytesMut::from(&bytes[..]);
        let mut taken = 0;
        while let Ok(Some(f)) = try_frame(&mut buf) {
            taken += HEADER + f.body.len();
        }
        prop_assert_eq!(taken + buf.len(), bytes.len());
    }
}
