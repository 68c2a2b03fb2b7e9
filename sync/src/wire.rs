//! Wire messages exchanged by two peers, and their binary encoding.
//!
//! Every message is one frame (see [`crate::frame`]) whose first byte is a
//! tag. Two messages form a frozen *envelope* that every protocol version,
//! past and future, must encode identically: [`Hello`] (tag 1) and
//! [`Goodbye`] (tag 6). That is what lets an old laptop and a newer center
//! tell each other "we cannot talk" in words instead of misparsing each
//! other. Everything else is version 1 of the protocol.
//!
//! Decoding never trusts a length: every count and size is checked against
//! the bytes actually present and against a named limit before anything is
//! allocated. Decoding never panics on any input.

use thiserror::Error;

/// Four bytes that open every [`Hello`], so a stray client (or a different
/// program on our port) is recognised at once.
pub const HELLO_MAGIC: [u8; 4] = *b"FCSY";

/// The protocol version this build speaks. Version 2 added whole-document
/// transfer ([`Message::Want`], [`Message::CaseDoc`]) for cases the
/// receiver lacks, and listings that may start before the peer's cursor
/// arrives ([`Message::ListingStart`]); with a version-1 peer the session
/// does neither. Version 3 added [`Message::Part`]: a large case travels in
/// parts between other messages instead of holding them all back. Version
/// 4 added [`Message::CasePush`]: a listed case goes out with its changes
/// at once, one message instead of three.
pub const PROTOCOL_VERSION: u16 = 4;

/// Oldest protocol version this build still speaks.
pub const PROTOCOL_VERSION_MIN: u16 = 1;

/// Longest case identifier accepted from a peer. Case codes are
/// `PREFIX-NNNNNN`, far below this.
pub const CASE_ID_BYTES_MAX: usize = 64;

/// Most entries in one [`Message::Changes`], so one message stays well
/// below the frame limit (64 + 16 + 2 bytes per entry).
pub const CHANGES_ENTRIES_MAX: usize = 4096;

/// Most cases in one [`Message::Want`] (at most 66 bytes each, so one
/// message stays well below the frame limit).
pub const WANT_CASES_MAX: usize = 4096;

/// Length of a store identifier (see [`Message::Since`]).
pub const STORE_ID_BYTES: usize = 16;

/// Identifies one node's store: a random value made when the store is
/// created. A cursor is only meaningful for the store it was taken from; a
/// node restored from a backup or re-initialised gets a new store id, and
/// peers then start over from zero instead of skipping changes.
pub type StoreId = [u8; STORE_ID_BYTES];

/// Longest human-readable reason in a [`Goodbye`].
pub const REASON_BYTES_MAX: usize = 1024;

/// Length of the digest of one case's heads.
pub const HEADS_HASH_BYTES: usize = 16;

/// A case identifier: its code, e.g. `K7QF2M-000017`.
///
/// Only ASCII letters, digits, `-`, `_` and `.` are allowed, and at most
/// [`CASE_ID_BYTES_MAX`] bytes, so an identifier from a peer is always safe
/// to print, log and use as a database key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CaseId(String);

impl CaseId {
    /// Checks `s` against the identifier rules.
    pub fn new(s: &str) -> Result<Self, DecodeError> {
        let ok = !s.is_empty()
            && s.len() <= CASE_ID_BYTES_MAX
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if ok {
            Ok(CaseId(s.to_string()))
        } else {
            Err(DecodeError::BadCaseId)
        }
    }

    /// The identifier as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for CaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Digest of one case's Automerge heads (see [`crate::inventory`]).
pub type HeadsHash = [u8; HEADS_HASH_BYTES];

/// The first message each side sends, in the frozen envelope format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Oldest protocol version the sender speaks.
    pub version_min: u16,
    /// Newest protocol version the sender speaks.
    pub version_max: u16,
    /// Whether the sender wants the session to stay open and push live
    /// edits after the first convergence (`sync --watch`).
    pub live: bool,
}

/// Why a peer is ending the session, in the frozen envelope format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Goodbye {
    /// Machine-readable reason.
    pub code: GoodbyeCode,
    /// One line for a person to read.
    pub reason: String,
}

/// Machine-readable reasons for a [`Goodbye`]. Unknown codes from newer
/// peers decode as [`GoodbyeCode::Other`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GoodbyeCode {
    /// No protocol version in common.
    VersionMismatch,
    /// The sender received something it could not accept.
    ProtocolError,
    /// The sender's own storage failed.
    LocalFault,
    /// Any code this build does not know.
    Other(u16),
}

impl GoodbyeCode {
    fn to_u16(self) -> u16 {
        match self {
            GoodbyeCode::VersionMismatch => 1,
            GoodbyeCode::ProtocolError => 2,
            GoodbyeCode::LocalFault => 3,
            GoodbyeCode::Other(c) => c,
        }
    }
    fn from_u16(c: u16) -> Self {
        match c {
            1 => GoodbyeCode::VersionMismatch,
            2 => GoodbyeCode::ProtocolError,
            3 => GoodbyeCode::LocalFault,
            c => GoodbyeCode::Other(c),
        }
    }
}

/// The end of a change listing: the cursor covering it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangesEnd {
    /// The sender's store id.
    pub store_id: StoreId,
    /// The sender's update sequence number the listing covers.
    pub upto: u64,
}

/// Everything two peers say to each other.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Versions and mode; always first.
    Hello(Hello),
    /// "I have seen your store `store_id` up to its local sequence number
    /// `seq`; list what changed after that." A different store id than the
    /// receiver's own means "from the beginning".
    Since {
        /// The peer store the cursor was taken from.
        store_id: StoreId,
        /// The peer's update sequence number we have fully seen.
        seq: u64,
    },
    /// Opens a change listing (protocol 2): the [`Message::Changes`] that
    /// follow list the sender's changes after sequence number `after`. A
    /// node that remembers how far the peer had seen its store lists from
    /// there at once, in its first flight, without waiting for the peer's
    /// [`Message::Since`]; the receiver counts that listing's end only if
    /// `after` is not beyond the cursor it sent, and otherwise waits for
    /// the listing the sender restarts from that cursor.
    ListingStart {
        /// The sequence number after which changes are listed.
        after: u64,
    },
    /// A batch of the sender's cases that changed after the requested
    /// cursor, with a digest of their heads, in update order. The last
    /// batch carries the cursor the receiver may store once it holds
    /// everything listed.
    Changes {
        /// (case id, heads hash) pairs.
        entries: Vec<(CaseId, HeadsHash)>,
        /// Present on the last batch.
        end: Option<ChangesEnd>,
    },
    /// One Automerge sync message for one case.
    CaseSync {
        /// Which case.
        case: CaseId,
        /// The encoded `automerge::sync::Message`.
        data: Vec<u8>,
    },
    /// An Automerge sync message for a case the sender lists, sent right
    /// before its listing entry without waiting to be asked (protocol
    /// version 4). It carries the sender's changes since the heads both
    /// sides held when they last synced the case (the shared heads of the
    /// stored sync state), as if the receiver had just said it holds
    /// those. The receiver applies it like a [`Message::CaseSync`], and
    /// answers only if it holds changes the sender lacks; otherwise the
    /// exchange is complete in one message, and the sender records the
    /// receiver at its heads once the session converges. The receiver does
    /// not offer a case pushed to it.
    CasePush {
        /// Which case.
        case: CaseId,
        /// The encoded `automerge::sync::Message`.
        data: Vec<u8>,
    },
    /// "I lack these cases you listed; send each one whole." Answered by one
    /// [`Message::CaseDoc`] per case, in order. Sending a saved document
    /// costs one message and no Automerge sync state on either side, where
    /// a sync exchange from an empty document costs three messages and two
    /// document loads on the sender (protocol version 2).
    Want {
        /// The cases wanted, at most [`WANT_CASES_MAX`].
        cases: Vec<CaseId>,
    },
    /// A whole saved Automerge document, answering [`Message::Want`]. Empty
    /// `data` means "not as a whole document": the receiver falls back to
    /// an Automerge sync exchange for the case (the sender no longer shares
    /// it, its copy is damaged, or it is too large for one frame).
    CaseDoc {
        /// Which case.
        case: CaseId,
        /// The saved document (`Automerge::save` format, possibly followed
        /// by incremental chunks), or nothing.
        data: Vec<u8>,
    },
    /// One piece of a large [`Message::CaseSync`] or [`Message::CaseDoc`]
    /// (protocol version 3). The pieces of one message arrive in order and
    /// other frames may come between them, so a multi-megabyte case does
    /// not hold back the small ones queued after it. The receiver joins the
    /// pieces and handles the whole as if it had arrived in one frame, when
    /// the `last` piece arrives; only then does it count as a data message.
    /// One message is split at a time.
    Part {
        /// Where in the message these bytes go: the bytes received before
        /// them. A part out of place is refused instead of joined.
        offset: u64,
        /// This piece completes the message.
        last: bool,
        /// The next bytes of the encoded message.
        bytes: Vec<u8>,
    },
    /// "I have processed everything you sent and have nothing to send."
    /// The counts let both sides agree that the session is quiescent even
    /// though messages cross in flight.
    Idle {
        /// Data messages (Changes, CaseSync, Want, CaseDoc) the sender
        /// has received.
        received: u64,
        /// Data messages the sender has sent.
        sent: u64,
    },
    /// The sender ends the session.
    Goodbye(Goodbye),
    /// On the control stream: the sender has fetched every attachment it
    /// wanted from this peer (or fetches none). A one-shot session ends only
    /// when both sides said so, so neither closes while the other still
    /// downloads.
    BlobsDone,
    /// First frame of a blob stream: "send me the bytes of this blob from
    /// this offset". The offset is how a cut transfer resumes.
    BlobRequest {
        /// BLAKE3 hash of the blob.
        hash: [u8; 32],
        /// First byte wanted.
        offset: u64,
    },
    /// Answer to a [`Message::BlobRequest`]; exactly `size - offset` raw
    /// bytes follow on the stream, unframed, then the stream finishes.
    BlobHeader {
        /// Total size of the blob.
        size: u64,
        /// First byte that follows (echoes the request).
        offset: u64,
    },
    /// Answer to a [`Message::BlobRequest`] the sender cannot serve.
    BlobUnavailable {
        /// Why, for a person.
        reason: String,
    },
}

const TAG_HELLO: u8 = 1;
const TAG_SINCE: u8 = 2;
const TAG_CHANGES: u8 = 3;
const TAG_CASE_SYNC: u8 = 4;
const TAG_IDLE: u8 = 5;
const TAG_GOODBYE: u8 = 6;
const TAG_BLOBS_DONE: u8 = 7;
const TAG_BLOB_REQUEST: u8 = 8;
const TAG_BLOB_HEADER: u8 = 9;
const TAG_BLOB_UNAVAILABLE: u8 = 10;
const TAG_WANT: u8 = 11;
const TAG_CASE_DOC: u8 = 12;
const TAG_LISTING_START: u8 = 13;
const TAG_PART: u8 = 14;
const TAG_CASE_PUSH: u8 = 15;

/// Why a frame payload is not a valid message.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The payload ended before the message did.
    #[error("message is truncated")]
    Truncated,
    /// Bytes were left over after a complete message.
    #[error("message has {0} trailing bytes")]
    TrailingBytes(usize),
    /// The first byte names no message we know.
    #[error("unknown message tag {0}")]
    UnknownTag(u8),
    /// A Hello did not start with the fieldcase magic bytes.
    #[error("not a fieldcase peer (bad magic bytes in hello)")]
    BadMagic,
    /// A variable-length integer was longer than 10 bytes or overflowed.
    #[error("malformed variable-length integer")]
    BadVarint,
    /// A case identifier broke the identifier rules.
    #[error("malformed case identifier")]
    BadCaseId,
    /// A length or count exceeded its limit.
    #[error("{what} exceeds its limit of {limit}")]
    OverLimit {
        /// Which field.
        what: &'static str,
        /// The limit.
        limit: usize,
    },
    /// Text was not UTF-8.
    #[error("text is not valid UTF-8")]
    BadUtf8,
    /// A boolean byte was neither 0 nor 1.
    #[error("malformed boolean")]
    BadBool,
}

impl Message {
    /// Encodes the message as a frame payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Vec::new();
        match self {
            Message::Hello(h) => {
                w.push(TAG_HELLO);
                w.extend_from_slice(&HELLO_MAGIC);
                w.extend_from_slice(&h.version_min.to_be_bytes());
                w.extend_from_slice(&h.version_max.to_be_bytes());
                w.push(u8::from(h.live));
            }
            Message::Since { store_id, seq } => {
                w.push(TAG_SINCE);
                w.extend_from_slice(store_id);
                put_varint(&mut w, *seq);
            }
            Message::Changes { entries, end } => {
                w.push(TAG_CHANGES);
                match end {
                    None => w.push(0),
                    Some(e) => {
                        w.push(1);
                        w.extend_from_slice(&e.store_id);
                        put_varint(&mut w, e.upto);
                    }
                }
                put_varint(&mut w, entries.len() as u64);
                for (id, hash) in entries {
                    put_bytes(&mut w, id.as_str().as_bytes());
                    w.extend_from_slice(hash);
                }
            }
            Message::CaseSync { case, data } => {
                w.push(TAG_CASE_SYNC);
                put_bytes(&mut w, case.as_str().as_bytes());
                put_bytes(&mut w, data);
            }
            Message::CasePush { case, data } => {
                w.push(TAG_CASE_PUSH);
                put_bytes(&mut w, case.as_str().as_bytes());
                put_bytes(&mut w, data);
            }
            Message::ListingStart { after } => {
                w.push(TAG_LISTING_START);
                put_varint(&mut w, *after);
            }
            Message::Want { cases } => {
                w.push(TAG_WANT);
                put_varint(&mut w, cases.len() as u64);
                for id in cases {
                    put_bytes(&mut w, id.as_str().as_bytes());
                }
            }
            Message::CaseDoc { case, data } => {
                w.push(TAG_CASE_DOC);
                put_bytes(&mut w, case.as_str().as_bytes());
                put_bytes(&mut w, data);
            }
            Message::Part {
                offset,
                last,
                bytes,
            } => {
                w.push(TAG_PART);
                put_varint(&mut w, *offset);
                w.push(u8::from(*last));
                put_bytes(&mut w, bytes);
            }
            Message::Idle { received, sent } => {
                w.push(TAG_IDLE);
                put_varint(&mut w, *received);
                put_varint(&mut w, *sent);
            }
            Message::Goodbye(g) => {
                w.push(TAG_GOODBYE);
                w.extend_from_slice(&g.code.to_u16().to_be_bytes());
                let reason = truncate_utf8(&g.reason, REASON_BYTES_MAX);
                w.extend_from_slice(&(reason.len() as u16).to_be_bytes());
                w.extend_from_slice(reason.as_bytes());
            }
            Message::BlobsDone => w.push(TAG_BLOBS_DONE),
            Message::BlobRequest { hash, offset } => {
                w.push(TAG_BLOB_REQUEST);
                w.extend_from_slice(hash);
                put_varint(&mut w, *offset);
            }
            Message::BlobHeader { size, offset } => {
                w.push(TAG_BLOB_HEADER);
                put_varint(&mut w, *size);
                put_varint(&mut w, *offset);
            }
            Message::BlobUnavailable { reason } => {
                w.push(TAG_BLOB_UNAVAILABLE);
                put_bytes(&mut w, truncate_utf8(reason, REASON_BYTES_MAX).as_bytes());
            }
        }
        w
    }

    /// Decodes a frame payload. Never panics; every length is bounded.
    pub fn decode(payload: &[u8]) -> Result<Message, DecodeError> {
        let mut r = Reader { buf: payload };
        let msg = match r.u8()? {
            TAG_HELLO => {
                if r.take(4)? != HELLO_MAGIC {
                    return Err(DecodeError::BadMagic);
                }
                let version_min = r.u16()?;
                let version_max = r.u16()?;
                let live = r.bool()?;
                // Fields appended by newer versions are ignored, which is
                // what keeps the Hello frozen yet extensible.
                r.buf = &[];
                Message::Hello(Hello {
                    version_min,
                    version_max,
                    live,
                })
            }
            TAG_SINCE => {
                let mut store_id = [0u8; STORE_ID_BYTES];
                store_id.copy_from_slice(r.take(STORE_ID_BYTES)?);
                Message::Since {
                    store_id,
                    seq: r.varint()?,
                }
            }
            TAG_CHANGES => {
                let end = if r.bool()? {
                    let mut store_id = [0u8; STORE_ID_BYTES];
                    store_id.copy_from_slice(r.take(STORE_ID_BYTES)?);
                    Some(ChangesEnd {
                        store_id,
                        upto: r.varint()?,
                    })
                } else {
                    None
                };
                let n = r.varint()?;
                if n > CHANGES_ENTRIES_MAX as u64 {
                    return Err(DecodeError::OverLimit {
                        what: "change entries",
                        limit: CHANGES_ENTRIES_MAX,
                    });
                }
                // Each entry is at least 1 + 1 + 16 bytes, so `n` is also
                // bounded by the payload size before we allocate.
                if (n as usize) * (2 + HEADS_HASH_BYTES) > r.buf.len() {
                    return Err(DecodeError::Truncated);
                }
                let mut entries = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    let id = r.case_id()?;
                    let mut hash = [0u8; HEADS_HASH_BYTES];
                    hash.copy_from_slice(r.take(HEADS_HASH_BYTES)?);
                    entries.push((id, hash));
                }
                Message::Changes { entries, end }
            }
            TAG_CASE_SYNC => {
                let case = r.case_id()?;
                let data = r.bytes()?.to_vec();
                Message::CaseSync { case, data }
            }
            TAG_CASE_PUSH => {
                let case = r.case_id()?;
                let data = r.bytes()?.to_vec();
                Message::CasePush { case, data }
            }
            TAG_LISTING_START => Message::ListingStart { after: r.varint()? },
            TAG_WANT => {
                let n = r.varint()?;
                if n > WANT_CASES_MAX as u64 {
                    return Err(DecodeError::OverLimit {
                        what: "wanted cases",
                        limit: WANT_CASES_MAX,
                    });
                }
                // Each id is at least 2 bytes, so `n` is also bounded by the
                // payload size before we allocate.
                if (n as usize) * 2 > r.buf.len() {
                    return Err(DecodeError::Truncated);
                }
                let mut cases = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    cases.push(r.case_id()?);
                }
                Message::Want { cases }
            }
            TAG_CASE_DOC => {
                let case = r.case_id()?;
                let data = r.bytes()?.to_vec();
                Message::CaseDoc { case, data }
            }
            TAG_PART => {
                let offset = r.varint()?;
                let last = r.bool()?;
                let bytes = r.bytes()?.to_vec();
                Message::Part {
                    offset,
                    last,
                    bytes,
                }
            }
            TAG_IDLE => Message::Idle {
                received: r.varint()?,
                sent: r.varint()?,
            },
            TAG_GOODBYE => {
                let code = GoodbyeCode::from_u16(r.u16()?);
                let len = r.u16()? as usize;
                if len > REASON_BYTES_MAX {
                    return Err(DecodeError::OverLimit {
                        what: "goodbye reason",
                        limit: REASON_BYTES_MAX,
                    });
                }
                let reason = std::str::from_utf8(r.take(len)?)
                    .map_err(|_| DecodeError::BadUtf8)?
                    .to_string();
                r.buf = &[];
                Message::Goodbye(Goodbye { code, reason })
            }
            TAG_BLOBS_DONE => Message::BlobsDone,
            TAG_BLOB_REQUEST => {
                let mut hash = [0u8; 32];
                hash.copy_from_slice(r.take(32)?);
                Message::BlobRequest {
                    hash,
                    offset: r.varint()?,
                }
            }
            TAG_BLOB_HEADER => Message::BlobHeader {
                size: r.varint()?,
                offset: r.varint()?,
            },
            TAG_BLOB_UNAVAILABLE => {
                let b = r.bytes()?;
                if b.len() > REASON_BYTES_MAX {
                    return Err(DecodeError::OverLimit {
                        what: "blob unavailable reason",
                        limit: REASON_BYTES_MAX,
                    });
                }
                let reason = std::str::from_utf8(b)
                    .map_err(|_| DecodeError::BadUtf8)?
                    .to_string();
                Message::BlobUnavailable { reason }
            }
            tag => return Err(DecodeError::UnknownTag(tag)),
        };
        if !r.buf.is_empty() {
            return Err(DecodeError::TrailingBytes(r.buf.len()));
        }
        Ok(msg)
    }

    /// A short name for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Since { .. } => "since",
            Message::Changes { .. } => "changes",
            Message::CaseSync { .. } => "case-sync",
            Message::CasePush { .. } => "case-push",
            Message::ListingStart { .. } => "listing-start",
            Message::Want { .. } => "want",
            Message::CaseDoc { .. } => "case-doc",
            Message::Part { .. } => "part",
            Message::Idle { .. } => "idle",
            Message::Goodbye(_) => "goodbye",
            Message::BlobsDone => "blobs-done",
            Message::BlobRequest { .. } => "blob-request",
            Message::BlobHeader { .. } => "blob-header",
            Message::BlobUnavailable { .. } => "blob-unavailable",
        }
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn put_varint(w: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            w.push(byte);
            return;
        }
        w.push(byte | 0x80);
    }
}

fn put_bytes(w: &mut Vec<u8>, b: &[u8]) {
    put_varint(w, b.len() as u64);
    w.extend_from_slice(b);
}

/// A cursor over a payload that refuses to read past its end.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::BadBool),
        }
    }
    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let byte = self.u8()?;
            let part = u64::from(byte & 0x7f);
            if i == 9 && part > 1 {
                return Err(DecodeError::BadVarint);
            }
            v |= part << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError::BadVarint)
    }
    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.varint()?;
        if n > self.buf.len() as u64 {
            return Err(DecodeError::Truncated);
        }
        self.take(n as usize)
    }
    fn case_id(&mut self) -> Result<CaseId, DecodeError> {
        let b = self.bytes()?;
        if b.len() > CASE_ID_BYTES_MAX {
            return Err(DecodeError::OverLimit {
                what: "case identifier",
                limit: CASE_ID_BYTES_MAX,
            });
        }
        let s = std::str::from_utf8(b).map_err(|_| DecodeError::BadCaseId)?;
        CaseId::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_future_hello_with_extra_fields_still_decodes() {
        let mut bytes = Message::Hello(Hello {
            version_min: 3,
            version_max: 9,
            live: true,
        })
        .encode();
        bytes.extend_from_slice(b"fields a newer center added");
        assert_eq!(
            Message::decode(&bytes),
            Ok(Message::Hello(Hello {
                version_min: 3,
                version_max: 9,
                live: true
            }))
        );
    }

    #[test]
    fn a_change_list_claiming_a_billion_entries_is_refused_without_allocating() {
        let mut bytes = vec![TAG_CHANGES, 0];
        put_varint(&mut bytes, 1_000_000_000);
        assert!(matches!(
            Message::decode(&bytes),
            Err(DecodeError::OverLimit { .. })
        ));
        let mut bytes = vec![TAG_CHANGES, 0];
        put_varint(&mut bytes, 4000);
        assert_eq!(Message::decode(&bytes), Err(DecodeError::Truncated));
    }

    #[test]
    fn case_ids_with_control_characters_are_refused() {
        let mut bytes = vec![TAG_CASE_SYNC];
        put_bytes(&mut bytes, b"AB\x1b[2J");
        put_bytes(&mut bytes, b"");
        assert_eq!(Message::decode(&bytes), Err(DecodeError::BadCaseId));
    }

    #[test]
    fn overlong_varints_are_refused() {
        let bytes = [
            TAG_IDLE, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, 0,
        ];
        assert_eq!(Message::decode(&bytes), Err(DecodeError::BadVarint));
    }
}
