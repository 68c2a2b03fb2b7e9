//! Length-prefixed framing of the byte stream between two peers.
//!
//! A frame is a 4-byte big-endian payload length followed by the payload.
//! The length is checked against [`FRAME_BYTES_MAX`] *before* any payload is
//! buffered, so a hostile peer can never make us allocate more than one
//! frame's worth of memory. "Not enough bytes yet" is `Ok(None)`, not an
//! error, because QUIC delivers streams in arbitrary chunk sizes.
//!
//! This module never does I/O: the caller feeds bytes in and takes frames out.

use thiserror::Error;

/// Largest payload a peer may send in one frame.
///
/// Case documents are small (tens of kilobytes even after years of edits);
/// 8 MiB leaves ample room for an Automerge sync message carrying a whole
/// case history while bounding what one frame can cost us.
pub const FRAME_BYTES_MAX: usize = 8 * 1024 * 1024;

/// Size of the length prefix.
pub const FRAME_HEADER_BYTES: usize = 4;

/// Why a byte stream could not be split into frames.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The peer announced a frame larger than we accept.
    #[error("peer announced a {announced_bytes}-byte frame; the limit is {limit_bytes} bytes")]
    TooLarge {
        /// What the length prefix said.
        announced_bytes: u64,
        /// Our limit.
        limit_bytes: usize,
    },
    /// The stream ended in the middle of a frame.
    #[error("stream ended in the middle of a frame ({buffered_bytes} bytes buffered)")]
    Truncated {
        /// How many bytes of the unfinished frame had arrived.
        buffered_bytes: usize,
    },
}

/// Prepends the length header to `payload`.
///
/// Callers only encode payloads they built themselves, which are always
/// below the limit; the assertion documents and enforces that pairing with
/// the decoder's check.
pub fn encode_frame(payload: &[u8]) -> Vec<u8> {
    assert!(
        payload.len() <= FRAME_BYTES_MAX,
        "we never build frames above the limit"
    );
    let mut out = Vec::with_capacity(FRAME_HEADER_BYTES + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Incremental frame decoder with a bounded buffer.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    /// Bytes received but not yet returned as a frame. Never longer than one
    /// header plus one maximal frame plus the last chunk pushed.
    buf: Vec<u8>,
    /// Read offset into `buf`, so consuming a frame does not shift memory.
    start: usize,
}

impl FrameDecoder {
    /// A decoder with an empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes. Call [`FrameDecoder::next_frame`] until it
    /// returns `Ok(None)` afterwards.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > FRAME_BYTES_MAX / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Returns the next complete frame payload, `Ok(None)` if more bytes are
    /// needed, or an error if the announced length is over the limit.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        let pending = &self.buf[self.start..];
        if pending.len() < FRAME_HEADER_BYTES {
            return Ok(None);
        }
        let mut header = [0u8; FRAME_HEADER_BYTES];
        header.copy_from_slice(&pending[..FRAME_HEADER_BYTES]);
        let len = u32::from_be_bytes(header) as usize;
        if len > FRAME_BYTES_MAX {
            return Err(FrameError::TooLarge {
                announced_bytes: len as u64,
                limit_bytes: FRAME_BYTES_MAX,
            });
        }
        if pending.len() < FRAME_HEADER_BYTES + len {
            return Ok(None);
        }
        let payload = pending[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len].to_vec();
        self.start += FRAME_HEADER_BYTES + len;
        Ok(Some(payload))
    }

    /// Bytes buffered that do not yet form a complete frame.
    pub fn buffered_bytes(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Hands back the bytes buffered after the last complete frame. A blob
    /// stream switches from frames to raw bytes after its header, and the
    /// first raw bytes may have arrived in the same read as the header.
    pub fn take_remaining(&mut self) -> Vec<u8> {
        let rest = self.buf[self.start..].to_vec();
        self.buf.clear();
        self.start = 0;
        rest
    }

    /// Call when the peer finished its stream: leftover bytes mean the peer
    /// stopped mid-frame.
    pub fn finish(&self) -> Result<(), FrameError> {
        match self.buffered_bytes() {
            0 => Ok(()),
            buffered_bytes => Err(FrameError::Truncated { buffered_bytes }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_at_every_byte_boundary_come_out_whole() {
        let a = encode_frame(b"hello");
        let b = encode_frame(b"");
        let c = encode_frame(&[7u8; 300]);
        let stream: Vec<u8> = [a, b, c].concat();
        for split in 0..stream.len() {
            let mut dec = FrameDecoder::new();
            let mut got = Vec::new();
            for part in [&stream[..split], &stream[split..]] {
                dec.push(part);
                while let Some(f) = dec.next_frame().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(got, vec![b"hello".to_vec(), vec![], vec![7u8; 300]]);
            dec.finish().unwrap();
        }
    }

    #[test]
    fn an_oversized_header_is_refused_before_buffering_the_payload() {
        let mut dec = FrameDecoder::new();
        dec.push(&u32::MAX.to_be_bytes());
        assert_eq!(
            dec.next_frame(),
            Err(FrameError::TooLarge {
                announced_bytes: u32::MAX as u64,
                limit_bytes: FRAME_BYTES_MAX
            })
        );
    }

    #[test]
    fn a_stream_cut_mid_frame_is_reported_as_truncated() {
        let mut dec = FrameDecoder::new();
        dec.push(&encode_frame(b"abcdef")[..7]);
        assert_eq!(dec.next_frame(), Ok(None));
        assert_eq!(
            dec.finish(),
            Err(FrameError::Truncated { buffered_bytes: 7 })
        );
    }
}
