//! Content-addressed attachment bytes, beside the SQLite file.
//!
//! Scans of ID cards, birth notices and land certificates are megabytes
//! each. They live as plain files under `HOME/blobs/`, named by their BLAKE3
//! hash, not inside SQLite: a 20 MB scan written through SQLite would pass
//! through the WAL (written twice, fsynced with every case edit), and could
//! not be appended to in small durable steps while a weak link trickles it
//! in. Files give constant-memory streaming, resumable partial downloads
//! (`partial/HASH.part`, whose length is the resume offset) and an atomic
//! publish: a blob becomes visible only by `rename` after its hash was
//! verified, so nothing corrupt is ever present under a hash.
//!
//! The case document holds only metadata (see `case::attach`); the store's
//! `case_blobs` table says which hashes are referenced.
//!
//! This module never talks to the network and never holds a whole blob in
//! memory.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Default largest attachment, configurable per node (`blob-max-mb`).
/// Phone photos and flatbed scans of a few pages stay well below it.
pub const DEFAULT_BLOB_MAX_BYTES: u64 = 50 * 1024 * 1024;

/// Size of the buffer used to stream blob bytes.
pub const IO_CHUNK_BYTES: usize = 64 * 1024;

/// Name of the blob folder inside a node home.
const BLOBS_DIR: &str = "blobs";

/// Why a blob operation failed.
#[derive(Debug, Error)]
pub enum BlobError {
    /// A file is larger than this node accepts.
    #[error("{what} is {size} bytes; the limit is {limit} bytes ({} MB); raise it with `fieldcase config set blob-max-mb N`", limit / (1024 * 1024))]
    TooLarge {
        /// What was too large.
        what: String,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A hash is not 64 hex characters.
    #[error("'{0}' is not a blob hash (64 hex characters)")]
    BadHash(String),
    /// The bytes do not hash to the expected value.
    #[error("blob {expected} failed verification: the bytes hash to {actual}")]
    HashMismatch {
        /// The hash the bytes should have.
        expected: String,
        /// What they hash to.
        actual: String,
    },
    /// The blob's bytes are not on this node.
    #[error("the bytes of blob {0} are not on this node")]
    Missing(String),
    /// More bytes arrived than the blob has.
    #[error("blob {hash} is {size} bytes but more arrived")]
    Overrun {
        /// The blob.
        hash: String,
        /// Its size.
        size: u64,
    },
    /// The disk is full.
    #[error("the disk is full while writing {0}; free some space and try again")]
    DiskFull(PathBuf),
    /// Any other I/O failure.
    #[error("{action} {path}: {source}")]
    Io {
        /// What we were doing.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> BlobError + 'a {
    move |source| {
        // ENOSPC and EDQUOT mean the same to a person: the disk is full.
        if matches!(source.raw_os_error(), Some(28) | Some(122)) {
            BlobError::DiskFull(path.to_path_buf())
        } else {
            BlobError::Io {
                action,
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

/// A BLAKE3 hash.
pub type BlobHash = [u8; 32];

/// Lowercase hex of a hash.
pub fn hash_hex(hash: &BlobHash) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses 64 hex characters.
pub fn parse_hash(s: &str) -> Result<BlobHash, BlobError> {
    let bad = || BlobError::BadHash(s.chars().take(80).collect());
    if s.len() != 64 || !s.is_ascii() {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// What an imported file turned out to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobInfo {
    /// Its hash.
    pub hash: BlobHash,
    /// Its size in bytes.
    pub size: u64,
    /// Its media type, from its first bytes (or its name).
    pub media_type: String,
}

/// Guesses a media type from magic bytes, then from the file name.
pub fn sniff_media_type(head: &[u8], name: &str) -> String {
    let by_magic = if head.starts_with(&[0xff, 0xd8, 0xff]) {
        Some("image/jpeg")
    } else if head.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if head.starts_with(b"%PDF-") {
        Some("application/pdf")
    } else if head.starts_with(b"II*\0") || head.starts_with(b"MM\0*") {
        Some("image/tiff")
    } else if head.len() >= 12
        && &head[4..8] == b"ftyp"
        && (&head[8..12] == b"heic" || &head[8..12] == b"heix" || &head[8..12] == b"mif1")
    {
        Some("image/heic")
    } else if head.len() >= 12 && head.starts_with(b"RIFF") && &head[8..12] == b"WEBP" {
        Some("image/webp")
    } else if head.starts_with(b"GIF8") {
        Some("image/gif")
    } else {
        None
    };
    if let Some(t) = by_magic {
        return t.to_string();
    }
    let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("txt") => "text/plain",
        Some("docx") => "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        Some("xlsx") => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        _ => "application/octet-stream",
    }
    .to_string()
}

/// fsyncs a directory so a rename in it survives a power cut.
fn sync_dir(dir: &Path) -> Result<(), BlobError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync folder", dir))
}

/// Streams `reader` through BLAKE3 without holding it in memory.
fn hash_reader(mut reader: impl Read, path: &Path) -> Result<(BlobHash, u64), BlobError> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; IO_CHUNK_BYTES];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf).map_err(io("read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((*hasher.finalize().as_bytes(), total))
}

/// The blob folder of one node.
#[derive(Clone, Debug)]
pub struct BlobStore {
    root: PathBuf,
}

impl BlobStore {
    /// Opens (creating if needed) the blob folder of `home`.
    pub fn open(home: &Path) -> Result<BlobStore, BlobError> {
        let root = home.join(BLOBS_DIR);
        for dir in [root.clone(), root.join("partial"), root.join("tmp")] {
            fs::create_dir_all(&dir).map_err(io("create folder", &dir))?;
        }
        Ok(BlobStore { root })
    }

    /// Where a complete blob lives.
    pub fn path_of(&self, hash: &BlobHash) -> PathBuf {
        let hex = hash_hex(hash);
        self.root.join(&hex[..2]).join(hex)
    }

    fn partial_path(&self, hash: &BlobHash) -> PathBuf {
        self.root
            .join("partial")
            .join(format!("{}.part", hash_hex(hash)))
    }

    /// Whether the verified bytes of `hash` are here.
    pub fn has(&self, hash: &BlobHash) -> bool {
        self.path_of(hash).is_file()
    }

    /// How many bytes of an interrupted download are kept.
    pub fn partial_len(&self, hash: &BlobHash) -> u64 {
        fs::metadata(self.partial_path(hash))
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// Copies a local file into the store (hashing it on the way), unless
    /// identical bytes are already stored. Refuses files over `max_bytes`
    /// before reading them.
    pub fn import_file(&self, src: &Path, max_bytes: u64) -> Result<BlobInfo, BlobError> {
        let mut file = File::open(src).map_err(io("open", src))?;
        let size = file.metadata().map_err(io("read", src))?.len();
        if size > max_bytes {
            return Err(BlobError::TooLarge {
                what: src.display().to_string(),
                size,
                limit: max_bytes,
            });
        }
        let mut head = [0u8; 16];
        let head_len = file.read(&mut head).map_err(io("read", src))?;
        file.seek(SeekFrom::Start(0)).map_err(io("read", src))?;
        let name = src
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let media_type = sniff_media_type(&head[..head_len], &name);

        let tmp = self
            .root
            .join("tmp")
            .join(format!("import-{}-{}", std::process::id(), unique()));
        let result = (|| {
            let mut out = File::create(&tmp).map_err(io("create", &tmp))?;
            let mut hasher = blake3::Hasher::new();
            let mut buf = vec![0u8; IO_CHUNK_BYTES];
            let mut total = 0u64;
            loop {
                let n = file.read(&mut buf).map_err(io("read", src))?;
                if n == 0 {
                    break;
                }
                total += n as u64;
                if total > max_bytes {
                    // The file grew while we read it.
                    return Err(BlobError::TooLarge {
                        what: src.display().to_string(),
                        size: total,
                        limit: max_bytes,
                    });
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n]).map_err(io("write", &tmp))?;
            }
            out.sync_all().map_err(io("sync", &tmp))?;
            let hash = *hasher.finalize().as_bytes();
            self.publish(&tmp, &hash)?;
            Ok(BlobInfo {
                hash,
                size: total,
                media_type,
            })
        })();
        let _ = fs::remove_file(&tmp);
        result
    }

    /// Moves a verified file into its place (or drops it if identical bytes
    /// are already there) and makes the rename durable.
    fn publish(&self, verified: &Path, hash: &BlobHash) -> Result<(), BlobError> {
        let dest = self.path_of(hash);
        if dest.is_file() {
            let _ = fs::remove_file(verified);
            return Ok(());
        }
        let dir = dest
            .parent()
            .expect("blob paths have a parent")
            .to_path_buf();
        fs::create_dir_all(&dir).map_err(io("create folder", &dir))?;
        fs::rename(verified, &dest).map_err(io("move into place", &dest))?;
        sync_dir(&dir)
    }

    /// Opens a download of `hash`, keeping the durable prefix already
    /// received. Returns the writer positioned at the resume offset.
    pub fn resume_download(&self, hash: &BlobHash, size: u64) -> Result<PartialBlob, BlobError> {
        let path = self.partial_path(hash);
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io("open", &path))?;
        let mut len = file.metadata().map_err(io("read", &path))?.len();
        if len > size {
            // A partial longer than the blob cannot be right: start over.
            file.set_len(0).map_err(io("truncate", &path))?;
            len = 0;
        }
        file.seek(SeekFrom::Start(len)).map_err(io("seek", &path))?;
        Ok(PartialBlob {
            hash: *hash,
            size,
            len,
            synced_len: len,
            file,
            path,
        })
    }

    /// Verifies a finished download and publishes it. On a mismatch the
    /// partial bytes are deleted (they came from a misbehaving peer) and
    /// the error says so.
    pub fn finish_download(&self, partial: PartialBlob) -> Result<(), BlobError> {
        let PartialBlob {
            hash,
            size,
            len,
            file,
            path,
            ..
        } = partial;
        if len != size {
            return Err(BlobError::Io {
                action: "finish",
                path,
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "download incomplete",
                ),
            });
        }
        file.sync_all().map_err(io("sync", &path))?;
        drop(file);
        let reader = File::open(&path).map_err(io("open", &path))?;
        let (actual, _) = hash_reader(reader, &path)?;
        if actual != hash {
            let _ = fs::remove_file(&path);
            return Err(BlobError::HashMismatch {
                expected: hash_hex(&hash),
                actual: hash_hex(&actual),
            });
        }
        self.publish(&path, &hash)
    }

    /// Drops an interrupted download.
    pub fn discard_partial(&self, hash: &BlobHash) {
        let _ = fs::remove_file(self.partial_path(hash));
    }

    /// Opens a stored blob for reading, for serving it to a peer.
    pub fn open_blob(&self, hash: &BlobHash) -> Result<(File, u64), BlobError> {
        let path = self.path_of(hash);
        let file = File::open(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                BlobError::Missing(hash_hex(hash))
            } else {
                io("open", &path)(e)
            }
        })?;
        let size = file.metadata().map_err(io("read", &path))?.len();
        Ok((file, size))
    }

    /// Writes a stored blob to `out`, verifying its hash on the way: the
    /// copy goes to a temporary file beside `out` and is renamed into place
    /// only if the bytes hash correctly, so a damaged store never yields a
    /// damaged export.
    pub fn export(&self, hash: &BlobHash, out: &Path) -> Result<u64, BlobError> {
        let (mut file, _) = self.open_blob(hash)?;
        let dir = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let tmp = dir.join(format!(
            ".fieldcase-export-{}-{}",
            std::process::id(),
            unique()
        ));
        let result = (|| {
            let mut dest = File::create(&tmp).map_err(io("create", &tmp))?;
            let mut hasher = blake3::Hasher::new();
            let mut buf = vec![0u8; IO_CHUNK_BYTES];
            let mut total = 0u64;
            loop {
                let n = file
                    .read(&mut buf)
                    .map_err(io("read", &self.path_of(hash)))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                dest.write_all(&buf[..n]).map_err(io("write", &tmp))?;
                total += n as u64;
            }
            let actual = *hasher.finalize().as_bytes();
            if &actual != hash {
                return Err(BlobError::HashMismatch {
                    expected: hash_hex(hash),
                    actual: hash_hex(&actual),
                });
            }
            dest.sync_all().map_err(io("sync", &tmp))?;
            fs::rename(&tmp, out).map_err(io("write", out))?;
            Ok(total)
        })();
        let _ = fs::remove_file(&tmp);
        result
    }
}

/// A per-process counter for unique temporary names.
fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Bytes fsynced between progress marks of a download: the most a power
/// cut can cost us to re-fetch.
pub const SYNC_EVERY_BYTES: u64 = 1024 * 1024;

/// An interrupted or ongoing download. Its on-disk length after
/// [`PartialBlob::sync`] is the durable resume offset.
pub struct PartialBlob {
    hash: BlobHash,
    size: u64,
    len: u64,
    synced_len: u64,
    file: File,
    path: PathBuf,
}

impl PartialBlob {
    /// Bytes received so far (the offset to request from).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when nothing was received yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The blob's total size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends received bytes; refuses bytes beyond the blob's size.
    /// fsyncs every [`SYNC_EVERY_BYTES`] so a resume after a power cut
    /// loses at most that much.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), BlobError> {
        if self.len + bytes.len() as u64 > self.size {
            return Err(BlobError::Overrun {
                hash: hash_hex(&self.hash),
                size: self.size,
            });
        }
        self.file
            .write_all(bytes)
            .map_err(io("write", &self.path))?;
        self.len += bytes.len() as u64;
        if self.len - self.synced_len >= SYNC_EVERY_BYTES {
            self.sync()?;
        }
        Ok(())
    }

    /// Makes everything received so far durable.
    pub fn sync(&mut self) -> Result<(), BlobError> {
        self.file.sync_data().map_err(io("sync", &self.path))?;
        self.synced_len = self.len;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_scans_are_stored_once_and_export_verified() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let scan = dir.path().join("id-card.jpg");
        let mut bytes = vec![0xff, 0xd8, 0xff, 0xe0];
        bytes.extend((0..300_000u32).map(|i| (i % 251) as u8));
        fs::write(&scan, &bytes).unwrap();
        let a = store.import_file(&scan, DEFAULT_BLOB_MAX_BYTES).unwrap();
        let b = store.import_file(&scan, DEFAULT_BLOB_MAX_BYTES).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.media_type, "image/jpeg");
        assert_eq!(a.hash, *blake3::hash(&bytes).as_bytes());
        let out = dir.path().join("out.jpg");
        assert_eq!(store.export(&a.hash, &out).unwrap(), bytes.len() as u64);
        assert_eq!(fs::read(&out).unwrap(), bytes);
    }

    #[test]
    fn an_over_limit_file_is_refused_before_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let big = dir.path().join("scan.pdf");
        fs::write(&big, vec![0u8; 2048]).unwrap();
        let err = store.import_file(&big, 1024).unwrap_err();
        assert!(
            matches!(
                err,
                BlobError::TooLarge {
                    size: 2048,
                    limit: 1024,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_download_cut_midway_resumes_from_its_durable_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
        let hash = *blake3::hash(&bytes).as_bytes();
        let mut part = store.resume_download(&hash, bytes.len() as u64).unwrap();
        part.write(&bytes[..2_000_000]).unwrap();
        part.sync().unwrap();
        drop(part); // the process dies here
        let mut part = store.resume_download(&hash, bytes.len() as u64).unwrap();
        assert_eq!(part.len(), 2_000_000);
        part.write(&bytes[2_000_000..]).unwrap();
        assert!(
            part.write(&[0]).is_err(),
            "no byte beyond the size is accepted"
        );
        store.finish_download(part).unwrap();
        assert!(store.has(&hash));
        assert_eq!(store.partial_len(&hash), 0);
    }

    #[test]
    fn bytes_that_do_not_match_the_hash_never_become_visible() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let good = vec![1u8; 10_000];
        let hash = *blake3::hash(&good).as_bytes();
        let mut part = store.resume_download(&hash, good.len() as u64).unwrap();
        part.write(&[2u8; 10_000]).unwrap();
        let err = store.finish_download(part).unwrap_err();
        assert!(matches!(err, BlobError::HashMismatch { .. }), "{err}");
        assert!(!store.has(&hash));
        assert_eq!(store.partial_len(&hash), 0, "the bad bytes are discarded");
    }

    #[test]
    fn hashes_parse_only_from_64_hex_characters() {
        let h = [0xabu8; 32];
        assert_eq!(parse_hash(&hash_hex(&h)).unwrap(), h);
        assert!(parse_hash("abc").is_err());
        assert!(parse_hash(&"zz".repeat(32)).is_err());
    }
}
