//! Backend messages taken out of a byte buffer, without any I/O: [`try_frame`].
//!
//! Every backend message is a tag byte, an Int32 length that counts itself and the body (not
//! the tag), and the body:
//!
//! ```text
//! ┌─────┬───────────────────┬────────────────────────┐
//! │ tag │ length: Int32, BE │ body: length - 4 bytes │
//! └─────┴───────────────────┴────────────────────────┘
//! ```
//!
//! The length is checked as soon as the five header bytes are there, before any of the body
//! is waited for or room is made for it: less than 4 or more than [`MAX_BACKEND_MESSAGE`] is a
//! protocol error, so a broken or hostile server cannot make the reader allocate more than
//! the cap. Nothing here panics, whatever the bytes. The reader that fills the buffer from
//! the connection is conn.rs's.

use std::fmt;

use bytes::{Buf, Bytes, BytesMut};

use super::error::ReplicationError;

/// The largest backend message accepted: PostgreSQL's own limit on a field (1 GiB) plus room
/// for the message around it. Anything larger is a protocol error.
pub const MAX_BACKEND_MESSAGE: usize = (1 << 30) + (1 << 20);

/// The tag byte and the length.
const HEADER: usize = 5;

/// One backend message: its tag and its body (without tag and length).
pub(super) struct Frame {
    pub(super) tag: u8,
    pub(super) body: Bytes,
}

impl fmt::Debug for Frame {
    /// The tag and the size only: a body may hold row values or anything else.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frame")
            .field("tag", &char::from(self.tag))
            .field("body_len", &self.body.len())
            .finish()
    }
}

/// The whole size (tag, length and body) of the message at the start of `buf`, once its
/// header is there (`None` before), checked against [`MAX_BACKEND_MESSAGE`].
pub(super) fn frame_size(buf: &[u8]) -> Result<Option<usize>, ReplicationError> {
    let Some(&[tag, a, b, c, d]) = buf.get(..HEADER) else {
        return Ok(None);
    };
    let len = i32::from_be_bytes([a, b, c, d]);
    let len = usize::try_from(len)
        .ok()
        .filter(|&len| len >= 4)
        .ok_or_else(|| {
            ReplicationError::Protocol(format!(
                "backend message '{}' announces an invalid length {len}",
                tag.escape_ascii()
            ))
        })?;
    if len > MAX_BACKEND_MESSAGE {
        return Err(ReplicationError::Protocol(format!(
            "backend message '{}' announces {len} bytes, more than the limit of \
             {MAX_BACKEND_MESSAGE}",
            tag.escape_ascii()
        )));
    }
    Ok(Some(len + 1))
}

/// Takes the message at the start of `buf` out of it, once it is complete. `Ok(None)` leaves
/// `buf` as it was, to be called again when more bytes have come. The body is a slice of the
/// buffer's memory, not a copy.
pub(super) fn try_frame(buf: &mut BytesMut) -> Result<Option<Frame>, ReplicationError> {
    let Some(total) = frame_size(buf)? else {
        return Ok(None);
    };
    if buf.len() < total {
        return Ok(None);
    }
    let tag = buf[0];
    let mut frame = buf.split_to(total);
    frame.advance(HEADER);
    Ok(Some(Frame {
        tag,
        body: frame.freeze(),
    }))
}

#[cfg(test)]
mod tests;
