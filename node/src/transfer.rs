//! Attachment transfer over QUIC: each blob on its own stream, after the
//! case records, resumable from the bytes already kept.
//!
//! A blob stream is a bidirectional QUIC stream opened by the side that
//! wants bytes. It sends one framed [`Message::BlobRequest`] (hash and
//! offset); the other side answers with a framed [`Message::BlobHeader`]
//! followed by exactly `size - offset` raw bytes, or with
//! [`Message::BlobUnavailable`]. Case sync has its own stream with a higher
//! priority, so a 20 MB scan never delays a case record.
//!
//! Memory is bounded on both sides: bytes move in chunks of
//! [`IO_CHUNK_BYTES`] between the stream and the file, and QUIC flow
//! control stops a fast sender. A receiver verifies the BLAKE3 hash before
//! the blob becomes visible; bytes that do not match are discarded and the
//! peer is reported as misbehaving.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fieldcase_sync::frame::{encode_frame, FrameDecoder};
use fieldcase_sync::Message;
use thiserror::Error;

use crate::blobs::{hash_hex, parse_hash, BlobError, BlobHash, BlobStore, IO_CHUNK_BYTES};
use crate::config::{self, FetchPolicy};
use crate::node::open_store;
use crate::share::SharePolicy;
use crate::store::{PeerRow, StoreError};

/// Longest a blob request or header frame may be; both are tiny.
const HEADER_BYTES_MAX: usize = 2048;

/// How long a blob stream may wait for its request or header.
const HEADER_TIMEOUT_MS: u64 = 15_000;

/// A transfer that receives nothing for this long is abandoned (the kept
/// bytes resume it next time). Edge-of-coverage blackouts last seconds.
const STALL_TIMEOUT_MS: u64 = 45_000;

/// Blob streams one peer may have us serve at once.
pub const SERVE_STREAMS_MAX: usize = 4;

/// Counts attachment bytes moved on one connection, in either direction.
/// The session's stall detector reads it: a control stream that is quiet
/// for minutes is fine while a large scan is still flowing.
#[derive(Clone, Debug, Default)]
pub struct Activity(Arc<std::sync::atomic::AtomicU64>);

impl Activity {
    /// Records `n` bytes moved.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Bytes moved so far.
    pub fn get(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Progress of one blob, for bars and log lines.
#[derive(Clone, Debug)]
pub enum BlobProgress {
    /// A download starts (possibly resuming at `offset`).
    Started {
        /// The blob.
        hash: String,
        /// Total size.
        size: u64,
        /// Bytes already kept from an earlier attempt.
        offset: u64,
        /// The peer it comes from.
        peer: String,
    },
    /// More bytes arrived.
    Advanced {
        /// The blob.
        hash: String,
        /// Bytes held now.
        done: u64,
        /// Total size.
        size: u64,
    },
    /// The download ended.
    Finished {
        /// The blob.
        hash: String,
        /// Whether it was verified and stored.
        ok: bool,
        /// What happened, for a person.
        message: String,
    },
}

/// Where progress goes.
pub type ProgressSink = Arc<dyn Fn(&BlobProgress) + Send + Sync>;

/// A sink that ignores progress.
pub fn no_progress() -> ProgressSink {
    Arc::new(|_: &BlobProgress| {})
}

/// Why a blob transfer failed.
#[derive(Debug, Error)]
pub enum TransferError {
    /// The peer sent something that breaks the blob protocol, or bytes
    /// that do not match their hash.
    #[error("misbehaving peer: {0}")]
    Misbehaved(String),
    /// The peer does not have the blob or may not share it.
    #[error("peer cannot serve the blob: {0}")]
    Unavailable(String),
    /// The link failed; kept bytes resume the transfer later.
    #[error("transfer interrupted: {0}")]
    Interrupted(String),
    /// Local blob storage failed.
    #[error(transparent)]
    Blob(#[from] BlobError),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What one fetch round did.
#[derive(Clone, Debug, Default)]
pub struct FetchReport {
    /// Blobs downloaded and verified.
    pub fetched: u64,
    /// Payload bytes received (including resumed transfers' new bytes).
    pub bytes: u64,
    /// Blobs the peer could not serve.
    pub unavailable: u64,
    /// Blobs skipped for being over this node's limit.
    pub over_limit: u64,
    /// Set when the peer misbehaved; the caller closes the connection.
    pub misbehaved: Option<String>,
    /// Set when the link failed mid-transfer.
    pub interrupted: Option<String>,
}

fn interrupted(e: impl std::fmt::Display) -> TransferError {
    TransferError::Interrupted(e.to_string())
}

/// Runs blocking file or database work off the async workers.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Reads one small frame from the start of a blob stream and returns it
/// with any raw bytes that arrived behind it.
async fn read_header(recv: &mut quinn::RecvStream) -> Result<(Message, Vec<u8>), TransferError> {
    let mut dec = FrameDecoder::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            if let Some(frame) = dec
                .next_frame()
                .map_err(|e| TransferError::Misbehaved(e.to_string()))?
            {
                let msg = Message::decode(&frame)
                    .map_err(|e| TransferError::Misbehaved(e.to_string()))?;
                return Ok((msg, dec.take_remaining()));
            }
            if dec.buffered_bytes() > HEADER_BYTES_MAX {
                return Err(TransferError::Misbehaved("oversized blob header".into()));
            }
            match recv.read(&mut buf).await.map_err(interrupted)? {
                Some(n) => dec.push(&buf[..n]),
                None => return Err(interrupted("stream ended before its header")),
            }
        }
    };
    tokio::time::timeout(Duration::from_millis(HEADER_TIMEOUT_MS), read)
        .await
        .map_err(|_| interrupted("no blob header in time"))?
}

/// Downloads one blob from `conn`, resuming from kept bytes, and publishes
/// it after verifying its hash. Returns the payload bytes received.
pub async fn fetch_one(
    conn: &quinn::Connection,
    blobs: &BlobStore,
    hash: &BlobHash,
    size: u64,
    peer: &str,
    progress: &ProgressSink,
    activity: &Activity,
) -> Result<u64, TransferError> {
    let hex = hash_hex(hash);
    let mut partial = blocking(|| blobs.resume_download(hash, size))?;
    let offset = partial.len();
    progress(&BlobProgress::Started {
        hash: hex.clone(),
        size,
        offset,
        peer: peer.to_string(),
    });
    let (mut send, mut recv) = conn.open_bi().await.map_err(interrupted)?;
    send.write_all(&encode_frame(
        &Message::BlobRequest {
            hash: *hash,
            offset,
        }
        .encode(),
    ))
    .await
    .map_err(interrupted)?;
    let _ = send.finish();
    let (header, first) = read_header(&mut recv).await?;
    match header {
        Message::BlobHeader {
            size: their_size,
            offset: their_offset,
        } => {
            if their_size != size || their_offset != offset {
                return Err(TransferError::Misbehaved(format!(
                    "blob {hex} announced as {their_size} bytes from {their_offset}, expected {size} from {offset}"
                )));
            }
        }
        Message::BlobUnavailable { reason } => return Err(TransferError::Unavailable(reason)),
        other => {
            return Err(TransferError::Misbehaved(format!(
                "unexpected {} on a blob stream",
                other.kind()
            )))
        }
    }
    let mut received = 0u64;
    let write =
        |bytes: &[u8], partial: &mut crate::blobs::PartialBlob| -> Result<(), TransferError> {
            blocking(|| partial.write(bytes)).map_err(|e| match e {
                BlobError::Overrun { .. } => TransferError::Misbehaved(e.to_string()),
                other => TransferError::Blob(other),
            })
        };
    if !first.is_empty() {
        write(&first, &mut partial)?;
        received += first.len() as u64;
        activity.add(first.len() as u64);
    }
    let mut last_report = partial.len();
    while partial.len() < size {
        let chunk = tokio::time::timeout(
            Duration::from_millis(STALL_TIMEOUT_MS),
            recv.read_chunk(IO_CHUNK_BYTES, true),
        )
        .await;
        let chunk = match chunk {
            Err(_) => {
                let _ = blocking(|| partial.sync());
                return Err(interrupted("peer stopped sending"));
            }
            Ok(Err(e)) => {
                let _ = blocking(|| partial.sync());
                return Err(interrupted(e));
            }
            Ok(Ok(None)) => {
                let _ = blocking(|| partial.sync());
                return Err(interrupted(format!(
                    "stream ended at {} of {size} bytes",
                    partial.len()
                )));
            }
            Ok(Ok(Some(chunk))) => chunk,
        };
        write(&chunk.bytes, &mut partial)?;
        received += chunk.bytes.len() as u64;
        activity.add(chunk.bytes.len() as u64);
        if partial.len() - last_report >= 256 * 1024 || partial.len() == size {
            last_report = partial.len();
            progress(&BlobProgress::Advanced {
                hash: hex.clone(),
                done: partial.len(),
                size,
            });
        }
    }
    // The peer must not send more than the blob.
    if let Ok(Ok(Some(_))) =
        tokio::time::timeout(Duration::from_millis(2_000), recv.read_chunk(1, true)).await
    {
        blobs.discard_partial(hash);
        return Err(TransferError::Misbehaved(format!(
            "sent more than the {size} bytes of blob {hex}"
        )));
    }
    match blocking(|| blobs.finish_download(partial)) {
        Ok(()) => Ok(received),
        Err(e @ BlobError::HashMismatch { .. }) => Err(TransferError::Misbehaved(e.to_string())),
        Err(e) => Err(e.into()),
    }
}

/// Downloads every referenced blob this node lacks, per its fetch policy.
/// Stops at the first sign of a misbehaving peer or a broken link; kept
/// bytes resume on the next connection.
pub async fn fetch_wanted(
    conn: quinn::Connection,
    home: PathBuf,
    peer: String,
    progress: ProgressSink,
    only: Option<String>,
    activity: Activity,
) -> FetchReport {
    let mut report = FetchReport::default();
    let setup = blocking(|| {
        let store = open_store(&home).map_err(|e| e.to_string())?;
        let policy = config::fetch_policy(&store).map_err(|e| e.to_string())?;
        let max = config::blob_max_bytes(&store).map_err(|e| e.to_string())?;
        let wanted = store.referenced_blobs().map_err(|e| e.to_string())?;
        let blobs = BlobStore::open(&home).map_err(|e| e.to_string())?;
        Ok::<_, String>((policy, max, wanted, blobs))
    });
    let (policy, max, wanted, blobs) = match setup {
        Ok(s) => s,
        Err(e) => {
            report.interrupted = Some(e);
            return report;
        }
    };
    if policy == FetchPolicy::OnDemand && only.is_none() {
        return report;
    }
    for blob in wanted {
        if only.as_ref().is_some_and(|h| *h != blob.hash) {
            continue;
        }
        let Ok(hash) = parse_hash(&blob.hash) else {
            continue;
        };
        if blobs.has(&hash) {
            continue;
        }
        if blob.size > max {
            report.over_limit += 1;
            progress(&BlobProgress::Finished {
                hash: blob.hash.clone(),
                ok: false,
                message: format!(
                    "skipped: {} bytes is over this node's limit of {max} bytes",
                    blob.size
                ),
            });
            continue;
        }
        // One retry from zero after a verification failure, but only when
        // the failed attempt resumed from kept bytes (which an earlier
        // peer may have sent): from zero, the same peer would only send
        // the same bad bytes again.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let resumed = blobs.partial_len(&hash) > 0;
            match fetch_one(&conn, &blobs, &hash, blob.size, &peer, &progress, &activity).await {
                Ok(bytes) => {
                    report.fetched += 1;
                    report.bytes += bytes;
                    progress(&BlobProgress::Finished {
                        hash: blob.hash.clone(),
                        ok: true,
                        message: "verified".into(),
                    });
                }
                Err(TransferError::Unavailable(reason)) => {
                    report.unavailable += 1;
                    progress(&BlobProgress::Finished {
                        hash: blob.hash.clone(),
                        ok: false,
                        message: format!("not available from {peer}: {reason}"),
                    });
                }
                Err(TransferError::Misbehaved(reason)) => {
                    blobs.discard_partial(&hash);
                    progress(&BlobProgress::Finished {
                        hash: blob.hash.clone(),
                        ok: false,
                        message: format!("rejected bytes from {peer}: {reason}"),
                    });
                    if attempts < 2 && resumed {
                        continue;
                    }
                    report.misbehaved = Some(reason);
                    return report;
                }
                Err(e) => {
                    progress(&BlobProgress::Finished {
                        hash: blob.hash.clone(),
                        ok: false,
                        message: format!("{e}; kept bytes resume it next time"),
                    });
                    report.interrupted = Some(e.to_string());
                    return report;
                }
            }
            break;
        }
    }
    report
}

/// Serves blob requests arriving on `conn` from `peer` until the
/// connection closes, at most [`SERVE_STREAMS_MAX`] at a time.
pub async fn serve_blob_streams(
    conn: quinn::Connection,
    home: PathBuf,
    peer: PeerRow,
    activity: Activity,
) {
    let limit = Arc::new(tokio::sync::Semaphore::new(SERVE_STREAMS_MAX));
    let mut tasks = tokio::task::JoinSet::new();
    while let Ok((send, recv)) = conn.accept_bi().await {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break;
        };
        let home = home.clone();
        let peer = peer.clone();
        let conn = conn.clone();
        let activity = activity.clone();
        tasks.spawn(async move {
            if let Err(TransferError::Misbehaved(reason)) =
                serve_one(send, recv, &home, &peer, &activity).await
            {
                conn.close(
                    crate::net::CLOSE_MISBEHAVED.into(),
                    format!("misbehaving peer: {reason}").as_bytes(),
                );
            }
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    }
    tasks.abort_all();
}

async fn serve_one(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    home: &Path,
    peer: &PeerRow,
    activity: &Activity,
) -> Result<(), TransferError> {
    let (request, _) = read_header(&mut recv).await?;
    let Message::BlobRequest { hash, offset } = request else {
        return Err(TransferError::Misbehaved(format!(
            "unexpected {} opening a stream",
            request.kind()
        )));
    };
    let hex = hash_hex(&hash);
    let policy = SharePolicy::for_peer(peer);
    let lookup = blocking(|| {
        let store = open_store(home).map_err(|e| e.to_string())?;
        let codes = store.cases_referencing(&hex).map_err(|e| e.to_string())?;
        let shared = codes.iter().any(|c| policy.shares_code(c));
        let blobs = BlobStore::open(home).map_err(|e| e.to_string())?;
        let file = if shared {
            blobs.open_blob(&hash).ok()
        } else {
            None
        };
        Ok::<_, String>((shared, file))
    });
    let unavailable = |reason: String| Message::BlobUnavailable { reason };
    let answer = match lookup {
        Err(e) => Err(unavailable(format!("local error: {e}"))),
        Ok((false, _)) => Err(unavailable("no shared case refers to this blob".into())),
        Ok((true, None)) => Err(unavailable("this node does not hold the bytes".into())),
        Ok((true, Some((_, size)))) if offset > size => Err(unavailable(format!(
            "offset {offset} is past the end ({size} bytes)"
        ))),
        Ok((true, Some(found))) => Ok(found),
    };
    let (mut file, size) = match answer {
        Err(msg) => {
            let _ = send.write_all(&encode_frame(&msg.encode())).await;
            let _ = send.finish();
            return Ok(());
        }
        Ok(found) => found,
    };
    send.write_all(&encode_frame(
        &Message::BlobHeader { size, offset }.encode(),
    ))
    .await
    .map_err(interrupted)?;
    blocking(|| file.seek(SeekFrom::Start(offset))).map_err(interrupted)?;
    let mut buf = vec![0u8; IO_CHUNK_BYTES];
    let mut left = size - offset;
    while left > 0 {
        let want = (left as usize).min(buf.len());
        let n = blocking(|| file.read(&mut buf[..want])).map_err(interrupted)?;
        if n == 0 {
            return Err(interrupted("blob file shorter than recorded"));
        }
        send.write_all(&buf[..n]).await.map_err(interrupted)?;
        left -= n as u64;
        activity.add(n as u64);
    }
    let _ = send.finish();
    // Wait (bounded) until the peer has the bytes before dropping the stream.
    let _ = tokio::time::timeout(Duration::from_secs(30), send.stopped()).await;
    Ok(())
}
