//! Durable storage of cases, peers and per-peer sync state in one SQLite file.
//!
//! Cases are Automerge documents. Each is stored as a full snapshot plus a
//! list of incremental chunks (the changes made since the snapshot), so an
//! edit writes only its own bytes; once a case has more than
//! [`COMPACT_THRESHOLD`] chunks they are folded into a new snapshot in the
//! same transaction. Next to each document the store keeps a *projection*
//! (status, village, ...) computed by a [`Projector`] supplied by the caller,
//! so listing and filtering never have to load documents.
//!
//! The CLI and a running `serve` process open the same file at once, which
//! is why the database runs in WAL mode with a busy timeout and why every
//! read-modify-write happens inside one `BEGIN IMMEDIATE` transaction.
//!
//! What this module must never do:
//! - talk to the network, or know the case model (fields come only through
//!   the projector);
//! - report success for anything whose COMMIT did not succeed;
//! - let a sync marker (per-peer sync state) become durable before the data
//!   it describes: both are written in the same transaction;
//! - panic on anything read from disk or received from a peer.
//!
//! # Schema (version 4, `PRAGMA user_version`)
//!
//! - `meta(key, value)`: free-form node settings (node name, role, ...).
//! - `counters(name, value)`: integer counters that must survive crashes:
//!   `next_case_seq` (next local case sequence number, starts at 1) and
//!   `update_seq` (bumped on every commit that changes a case). They live
//!   apart from `meta` so they are real integers updated in SQL, never
//!   parsed from blobs.
//! - `cases(code, snapshot, heads, update_seq, procedure, status, village,
//!   applicant, due_date, updated_at_ms, conflicts)`: one row per case.
//!   `heads` is the concatenation of the document's 32-byte change hashes,
//!   sorted; after loading a case the document's heads must equal it, which
//!   catches lost or damaged chunks. There is no chunk-count column: the
//!   count is taken from `case_changes` itself so the two can never disagree.
//! - `case_changes(id, code, data)`: incremental chunks in commit order.
//! - `peers(node_id, name, addr, added_at_ms, last_sync_at_ms,
//!   last_sync_seq)`: the trust list. `node_id` is opaque text here (the
//!   caller uses the displayed `NodeId` form).
//! - `peer_case_state(peer, code, sync_state)`: encoded Automerge
//!   `sync::State` per peer and case. No foreign keys: the sync layer may
//!   record state for a case it has not received yet.
//! - `case_blobs(code, hash, size)` (since version 2): the blobs (attachment
//!   files, by BLAKE3 hash) each case refers to, from
//!   [`Projection::blobs`]. Rewritten in the same transaction as the other
//!   projection columns on every write, so "which blobs do I lack" and "may
//!   I serve this blob" never load a document. Indexed by hash.
//!
//! - `peer_cursors(peer, store_id, seq)` (since version 3): how far each
//!   peer's change listing has been fully received and committed here, and
//!   which of the peer's stores that count refers to. `meta.store_id` is
//!   this store's own random identity, made once.
//!
//! - `import_rows(row_key, code)` (since version 4): one row per imported
//!   spreadsheet row, keyed by a digest of its content and how many
//!   identical rows came before it in its file (see `crate::bulk`), with
//!   the code of the case it became; written in the transaction that
//!   creates the case, so importing a file again skips what is already in.
//!
//! Older databases are migrated on open, in one transaction: version 1
//! gets `case_blobs`, filled by re-projecting every stored case; version 2
//! gets `peer_cursors` and a store id; version 3 gets `import_rows`
//! (empty: imports before it were not recorded).

use std::path::{Path, PathBuf};
use std::time::Duration;

use automerge::{Automerge, ChangeHash};
use fieldcase_sync::store::ListedUpto;
use rusqlite::{params, Connection, ErrorCode, OptionalExtension, TransactionBehavior};

/// A case gets a fresh snapshot once it has more than this many incremental
/// chunks. Loading cost grows with the chunk count; a snapshot rewrite costs
/// the whole document. 32 keeps loads fast while rewriting a case only
/// every few dozen edits.
pub const COMPACT_THRESHOLD: usize = 32;

/// How long a writer waits for another process holding the write lock
/// before giving up with [`StoreError::Busy`]. Writes are short (one case),
/// so 5 s means something is stuck rather than merely slow.
pub const BUSY_TIMEOUT_MS: u64 = 5_000;

/// Most cases [`Store::create_cases_batch`] creates in one transaction.
/// Building and writing 1,000 new cases holds the write lock for a few
/// tenths of a second; 10,000 would approach [`BUSY_TIMEOUT_MS`] on a slow
/// laptop and make a concurrent `case set` fail as busy.
pub const CREATE_BATCH_MAX: usize = 10_000;

/// Most threads [`par_map`] uses: centers run on 2- to 4-core desktops, and
/// more threads than cores only add memory.
const PAR_THREADS_MAX: usize = 4;

/// Schema version written to `PRAGMA user_version`.
pub const SCHEMA_VERSION: i64 = 4;

/// Longest accepted case code, in bytes. Codes arrive from peers; the bound
/// keeps a hostile or buggy peer from filling indexes with huge keys.
pub const CASE_CODE_BYTES_MAX: usize = 64;

/// Longest accepted peer name, in bytes (same as node names).
pub const PEER_NAME_BYTES_MAX: usize = 64;

/// Size of one Automerge change hash.
const HASH_BYTES: usize = 32;

/// Computes the listing fields of a case from its document. It doubles as a
/// validator: a document it refuses is never stored.
pub type Projector = fn(&Automerge) -> Result<Projection, String>;

/// A blob (attachment file) a case refers to. The size is part of the
/// identity: two documents may claim different sizes for one hash, and only
/// the bytes can tell which is right.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlobRef {
    /// BLAKE3 hash of the bytes, 64 lowercase hex characters.
    pub hash: String,
    /// Length of the bytes.
    pub size: u64,
}

/// Fields of a case kept in plain columns for listing and filtering.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Projection {
    /// Administrative procedure (e.g. birth registration).
    pub procedure: String,
    /// Workflow status (e.g. received, processing, done).
    pub status: String,
    /// Village (thôn/ấp) of the applicant.
    pub village: String,
    /// Applicant's name, for display.
    pub applicant: String,
    /// Due date as ISO text (`YYYY-MM-DD`), so it sorts as text.
    pub due_date: String,
    /// Last edit time claimed by the document, in ms since the Unix epoch.
    pub updated_at_ms: i64,
    /// Number of fields with concurrent conflicting values.
    pub conflicts: i64,
    /// Blobs the case refers to, kept in the `case_blobs` table. The store
    /// refuses a projection that gives one hash two sizes or a malformed
    /// hash; exact repeats are merged. Read back (in [`Store::list`])
    /// sorted by hash.
    pub blobs: Vec<BlobRef>,
}

/// Optional equality filters for [`Store::list`]; `None` matches anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    pub status: Option<String>,
    pub village: Option<String>,
    pub procedure: Option<String>,
}

/// One case as listed: code, projection, and the local update counter at
/// its last change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseRow {
    pub code: String,
    pub projection: Projection,
    pub update_seq: u64,
}

/// One trusted peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRow {
    /// The peer's node ID as text.
    pub node_id: String,
    /// Local, unique, human name for the peer.
    pub name: String,
    /// Last known address (`host:port`), if any.
    pub addr: Option<String>,
    /// When the peer was added, ms since the Unix epoch.
    pub added_at_ms: i64,
    /// When the last sync with this peer completed.
    pub last_sync_at_ms: Option<i64>,
    /// Our local `update_seq` at the last completed sync.
    pub last_sync_seq: Option<u64>,
}

/// Result of [`Store::merge_remote`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeOutcome {
    /// The stored heads changed (the peer brought something new).
    pub changed: bool,
    /// The case did not exist here before.
    pub created: bool,
    /// Heads of the stored document after the merge, sorted.
    pub heads: Vec<ChangeHash>,
}

/// Storage failures. All but the peer-list variants mean the local
/// database could not do its job; see [`StoreError::is_fault`].
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database file could not be opened or configured.
    #[error("cannot open database {path}: {reason}")]
    CannotOpen { path: PathBuf, reason: String },
    /// The file is not a SQLite database or its structure is damaged.
    #[error("database {path} is corrupt or not a fieldcase database; restore it from a backup")]
    Corrupt { path: PathBuf },
    /// One case's stored data cannot be read back into the same document.
    #[error("stored data of case {code} is damaged: {reason}")]
    CorruptCase { code: String, reason: String },
    /// The file was written by a newer fieldcase.
    #[error("database {path} has schema version {found}, this program understands up to {supported}; upgrade fieldcase")]
    TooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    /// The disk (or the database size limit) is full.
    #[error("the disk is full; free some space and try again (nothing was saved)")]
    DiskFull,
    /// The operating system reported an I/O error.
    #[error("disk I/O error on {path}: {detail}")]
    Io { path: PathBuf, detail: String },
    /// Another process held the database lock longer than the busy timeout.
    #[error("database {path} is busy (another fieldcase process is writing); try again")]
    Busy { path: PathBuf },
    /// The file or its directory is not writable.
    #[error("database {path} is read-only or access was denied")]
    ReadOnly { path: PathBuf },
    /// A peer with that name already exists with a different node ID.
    #[error("a peer named {name:?} already exists (node {node_id})")]
    DuplicatePeerName { name: String, node_id: String },
    /// That node ID is already a peer under another name.
    #[error("node {node_id} is already a peer, named {name:?}")]
    DuplicatePeerId { node_id: String, name: String },
    /// No peer with that node ID.
    #[error("node {node_id} is not a known peer")]
    UnknownPeer { node_id: String },
    /// An argument was refused before touching the database.
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    /// Any other SQLite failure (a bug or an unexpected state).
    #[error("database error: {0}")]
    Sqlite(#[source] rusqlite::Error),
}

impl StoreError {
    /// True when local storage failed (stop accepting writes, tell the
    /// user); false for refusals about the request itself (duplicate or
    /// unknown peer, invalid argument).
    pub fn is_fault(&self) -> bool {
        !matches!(
            self,
            StoreError::DuplicatePeerName { .. }
                | StoreError::DuplicatePeerId { .. }
                | StoreError::UnknownPeer { .. }
                | StoreError::Invalid { .. }
        )
    }
}

/// Failure of [`Store::create_case`].
#[derive(Debug, thiserror::Error)]
pub enum CreateError<E> {
    /// The caller's closure failed; nothing was written and the sequence number was not used.
    #[error("{0}")]
    Make(E),
    /// A case with this code already exists.
    #[error("case {0} already exists")]
    Exists(String),
    /// The new document or its code was refused by validation.
    #[error("new case refused: {0}")]
    Rejected(String),
    /// Local storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Failure of [`Store::update_case`].
#[derive(Debug, thiserror::Error)]
pub enum UpdateError<E> {
    /// No case with this code.
    #[error("case {0} not found")]
    NotFound(String),
    /// The caller's closure failed; nothing was written.
    #[error("{0}")]
    Op(E),
    /// The edited document was refused by validation; nothing was written.
    #[error("change refused: {0}")]
    Rejected(String),
    /// Local storage failed; nothing was written.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Failure of [`Store::merge_remote`]. The two variants call for different
/// reactions: `Rejected` is the peer's fault (report it, maybe drop the
/// connection), `Store` is ours (stop, tell the user).
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// The peer's document (or case code) was refused; nothing was written, sync state included.
    #[error("data from peer refused: {0}")]
    Rejected(String),
    /// Local storage failed; nothing was written.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Free space under which an I/O error while writing is reported as a
/// full disk: less than a few WAL frames' worth.
const DISK_FULL_BELOW_BYTES: u64 = 256 * 1024;

/// Bytes an unprivileged writer may still use on the file system holding
/// `path` (its directory, for a file that may not exist yet).
fn free_bytes(path: &Path) -> Option<u64> {
    let dir = if path.is_dir() { path } else { path.parent()? };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: `c` is a valid NUL-terminated path and `st` a zeroed
    // out-parameter of the right type; statvfs writes only into it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Maps a SQLite error to what it means for the user.
fn classify(e: rusqlite::Error, path: &Path) -> StoreError {
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) | Some(ErrorCode::DatabaseCorrupt) => StoreError::Corrupt {
            path: path.to_path_buf(),
        },
        Some(ErrorCode::DiskFull) => StoreError::DiskFull,
        // A write that found no room: SQLite says "disk full" only when it
        // sees ENOSPC itself; a full tmpfs or a WAL write often surfaces
        // as a plain I/O error instead.
        Some(ErrorCode::SystemIoFailure)
            if free_bytes(path).is_some_and(|f| f < DISK_FULL_BELOW_BYTES) =>
        {
            StoreError::DiskFull
        }
        Some(ErrorCode::SystemIoFailure) => StoreError::Io {
            path: path.to_path_buf(),
            detail: e.to_string(),
        },
        Some(ErrorCode::DatabaseBusy) | Some(ErrorCode::DatabaseLocked) => StoreError::Busy {
            path: path.to_path_buf(),
        },
        Some(ErrorCode::ReadOnly) | Some(ErrorCode::PermissionDenied) => StoreError::ReadOnly {
            path: path.to_path_buf(),
        },
        Some(ErrorCode::CannotOpen) => StoreError::CannotOpen {
            path: path.to_path_buf(),
            reason: e.to_string(),
        },
        _ => StoreError::Sqlite(e),
    }
}

/// Case codes come from peers too, so they are checked: 1 to
/// [`CASE_CODE_BYTES_MAX`] bytes of ASCII letters, digits, `-`, `_`, `.`.
fn validate_code(code: &str) -> Result<(), String> {
    if code.is_empty() {
        return Err("case code is empty".into());
    }
    if code.len() > CASE_CODE_BYTES_MAX {
        return Err(format!(
            "case code is longer than {CASE_CODE_BYTES_MAX} bytes"
        ));
    }
    if let Some(c) = code
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!("case code contains {c:?}"));
    }
    Ok(())
}

fn sorted_heads(doc: &Automerge) -> Vec<ChangeHash> {
    let mut heads = doc.get_heads();
    heads.sort();
    heads
}

fn encode_heads(heads: &[ChangeHash]) -> Vec<u8> {
    let mut out = Vec::with_capacity(heads.len() * HASH_BYTES);
    for h in heads {
        out.extend_from_slice(&h.0);
    }
    out
}

fn decode_heads(code: &str, bytes: &[u8]) -> Result<Vec<ChangeHash>, StoreError> {
    if !bytes.len().is_multiple_of(HASH_BYTES) {
        return Err(StoreError::CorruptCase {
            code: code.to_string(),
            reason: format!("heads column has {} bytes", bytes.len()),
        });
    }
    Ok(bytes
        .chunks_exact(HASH_BYTES)
        .map(|c| {
            let mut h = [0u8; HASH_BYTES];
            h.copy_from_slice(c);
            ChangeHash(h)
        })
        .collect())
}

fn to_u64(v: i64, path: &Path) -> Result<u64, StoreError> {
    // Counters are only ever written by this module as non-negative
    // values; a negative one means the file was tampered with or damaged.
    u64::try_from(v).map_err(|_| StoreError::Corrupt {
        path: path.to_path_buf(),
    })
}

fn to_i64(v: u64, what: &'static str) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Invalid {
        what,
        reason: format!("{v} is too large"),
    })
}

/// The stored state an edit starts from: what `write_case` needs to
/// write only the difference.
struct Prev<'a> {
    /// Heads of the stored document, sorted.
    heads: &'a [ChangeHash],
    /// Number of incremental chunks on top of the snapshot.
    chunks: usize,
}

/// A case read back from disk.
struct Loaded {
    doc: Automerge,
    /// Heads recorded in the row, verified equal to `doc`'s heads.
    heads: Vec<ChangeHash>,
    /// Number of incremental chunks on top of the snapshot.
    chunks: usize,
}

/// Reads snapshot + chunks and checks the result reaches the recorded
/// heads. `load_incremental` silently skips undecodable bytes, so the heads
/// comparison is what turns a damaged chunk into an error instead of a
/// quietly older document.
fn load_doc(conn: &Connection, path: &Path, code: &str) -> Result<Option<Loaded>, StoreError> {
    let row: Option<(Vec<u8>, Vec<u8>)> = conn
        .query_row(
            "SELECT snapshot, heads FROM cases WHERE code = ?1",
            [code],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(|e| classify(e, path))?;
    let Some((snapshot, heads_blob)) = row else {
        return Ok(None);
    };
    let corrupt = |reason: String| StoreError::CorruptCase {
        code: code.to_string(),
        reason,
    };
    let heads = decode_heads(code, &heads_blob)?;
    let mut doc =
        Automerge::load(&snapshot).map_err(|e| corrupt(format!("snapshot unreadable: {e}")))?;
    let mut stmt = conn
        .prepare_cached("SELECT id, data FROM case_changes WHERE code = ?1 ORDER BY id")
        .map_err(|e| classify(e, path))?;
    let mut rows = stmt.query([code]).map_err(|e| classify(e, path))?;
    let mut chunks = 0usize;
    while let Some(r) = rows.next().map_err(|e| classify(e, path))? {
        let id: i64 = r.get(0).map_err(|e| classify(e, path))?;
        let data: Vec<u8> = r.get(1).map_err(|e| classify(e, path))?;
        doc.load_incremental(&data)
            .map_err(|e| corrupt(format!("change chunk {id} unreadable: {e}")))?;
        chunks += 1;
    }
    if sorted_heads(&doc) != heads {
        return Err(corrupt(
            "stored changes do not add up to the recorded document version".into(),
        ));
    }
    Ok(Some(Loaded { doc, heads, chunks }))
}

/// The `meta` key of [`Store::listed_upto`] for one peer.
fn listed_key(peer: &str) -> String {
    format!("listed-upto/{peer}")
}

/// Reads one of the `counters` rows; a missing row means the file is not a
/// healthy fieldcase store.
fn read_counter(conn: &Connection, path: &Path, name: &str) -> Result<i64, StoreError> {
    conn.query_row("SELECT value FROM counters WHERE name = ?1", [name], |r| {
        r.get(0)
    })
    .optional()
    .map_err(|e| classify(e, path))?
    .ok_or_else(|| StoreError::Corrupt {
        path: path.to_path_buf(),
    })
}

/// The next local case sequence number.
fn read_next_case_seq(conn: &Connection, path: &Path) -> Result<i64, StoreError> {
    read_counter(conn, path, "next_case_seq")
}

/// Bumps and returns the local update counter.
fn bump_update_seq(conn: &Connection, path: &Path) -> Result<i64, StoreError> {
    conn.query_row(
        "UPDATE counters SET value = value + 1 WHERE name = 'update_seq' RETURNING value",
        [],
        |r| r.get(0),
    )
    .optional()
    .map_err(|e| classify(e, path))?
    .ok_or_else(|| StoreError::Corrupt {
        path: path.to_path_buf(),
    })
}

/// Is `h` 64 lowercase hex characters (a BLAKE3 hash as text)?
fn is_blob_hash(h: &str) -> bool {
    h.len() == 64
        && h.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Runs the projector and checks its blob list can be stored: well-formed
/// hashes, sizes that fit SQLite's integers, one size per hash. Exact
/// repeats are merged and the list is sorted by hash, the order it is read
/// back in.
fn project(projector: Projector, doc: &Automerge) -> Result<Projection, String> {
    check_projection(projector(doc)?)
}

/// Normalises a projection's blob list and refuses malformed entries.
fn check_projection(mut p: Projection) -> Result<Projection, String> {
    p.blobs.sort();
    p.blobs.dedup();
    for (i, b) in p.blobs.iter().enumerate() {
        if !is_blob_hash(&b.hash) {
            return Err(format!(
                "blob hash {:?} is not 64 lowercase hex characters",
                b.hash.chars().take(80).collect::<String>()
            ));
        }
        if i64::try_from(b.size).is_err() {
            return Err(format!("blob {} has an impossible size {}", b.hash, b.size));
        }
        if i > 0 && p.blobs[i - 1].hash == b.hash {
            return Err(format!(
                "blob {} is listed with two different sizes",
                b.hash
            ));
        }
    }
    Ok(p)
}

/// Replaces the `case_blobs` rows of `code` with `blobs` (already checked
/// by [`project`]).
fn write_blobs(
    conn: &Connection,
    path: &Path,
    code: &str,
    blobs: &[BlobRef],
) -> Result<(), StoreError> {
    let sql = |e| classify(e, path);
    conn.execute("DELETE FROM case_blobs WHERE code = ?1", [code])
        .map_err(sql)?;
    let mut stmt = conn
        .prepare_cached("INSERT INTO case_blobs (code, hash, size) VALUES (?1, ?2, ?3)")
        .map_err(sql)?;
    for b in blobs {
        stmt.execute(params![code, b.hash, to_i64(b.size, "blob size")?])
            .map_err(sql)?;
    }
    Ok(())
}

/// Fills `case_blobs` for every stored case (migration to version 2).
/// A case that cannot be loaded or projected is skipped: it is reported
/// when someone opens it, and gets its rows on its next successful write.
/// Database failures abort the migration.
fn backfill_blobs(conn: &Connection, path: &Path, projector: Projector) -> Result<(), StoreError> {
    let sql = |e| classify(e, path);
    let codes: Vec<String> = {
        let mut stmt = conn
            .prepare("SELECT code FROM cases ORDER BY code")
            .map_err(sql)?;
        let rows = stmt.query_map([], |r| r.get(0)).map_err(sql)?;
        rows.collect::<Result<_, _>>().map_err(sql)?
    };
    for code in codes {
        let doc = match load_doc(conn, path, &code) {
            Ok(Some(loaded)) => loaded.doc,
            Ok(None) | Err(StoreError::CorruptCase { .. }) => continue,
            Err(e) => return Err(e),
        };
        if let Ok(p) = project(projector, &doc) {
            write_blobs(conn, path, &code, &p.blobs)?;
        }
    }
    Ok(())
}

/// Writes `doc` for `code` inside the caller's transaction. `prev` is the
/// stored state it was derived from, or `None` for a new case. Appends the
/// incremental chunk, or rewrites the snapshot when the chunk count passes
/// [`COMPACT_THRESHOLD`]. Rewrites the case's `case_blobs` rows.
fn write_case(
    conn: &Connection,
    path: &Path,
    code: &str,
    doc: &Automerge,
    prev: Option<Prev<'_>>,
    p: &Projection,
) -> Result<(), StoreError> {
    let sql = |e| classify(e, path);
    let heads = encode_heads(&sorted_heads(doc));
    let Some(prev) = prev else {
        return insert_case(conn, path, code, &heads, &doc.save(), p);
    };
    let seq = bump_update_seq(conn, path)?;
    if prev.chunks + 1 > COMPACT_THRESHOLD {
        conn.execute("DELETE FROM case_changes WHERE code = ?1", [code])
            .map_err(sql)?;
        conn.execute(
            "UPDATE cases SET snapshot = ?2 WHERE code = ?1",
            params![code, doc.save()],
        )
        .map_err(sql)?;
    } else {
        conn.execute(
            "INSERT INTO case_changes (code, data) VALUES (?1, ?2)",
            params![code, doc.save_after(prev.heads)],
        )
        .map_err(sql)?;
    }
    conn.execute(
        "UPDATE cases SET heads = ?2, update_seq = ?3, procedure = ?4, status = ?5, \
         village = ?6, applicant = ?7, due_date = ?8, updated_at_ms = ?9, \
         conflicts = ?10 WHERE code = ?1",
        params![
            code,
            heads,
            seq,
            p.procedure,
            p.status,
            p.village,
            p.applicant,
            p.due_date,
            p.updated_at_ms,
            p.conflicts
        ],
    )
    .map_err(sql)?;
    write_blobs(conn, path, code, &p.blobs)
}

/// Inserts a new case row (snapshot already saved, heads encoded) with its
/// projection and blob rows, bumping `update_seq`, inside the caller's
/// transaction.
fn insert_case(
    conn: &Connection,
    path: &Path,
    code: &str,
    heads: &[u8],
    snapshot: &[u8],
    p: &Projection,
) -> Result<(), StoreError> {
    let seq = bump_update_seq(conn, path)?;
    conn.prepare_cached(
        "INSERT INTO cases (code, snapshot, heads, update_seq, procedure, status, \
         village, applicant, due_date, updated_at_ms, conflicts) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )
    .and_then(|mut stmt| {
        stmt.execute(params![
            code,
            snapshot,
            heads,
            seq,
            p.procedure,
            p.status,
            p.village,
            p.applicant,
            p.due_date,
            p.updated_at_ms,
            p.conflicts
        ])
    })
    .map_err(|e| classify(e, path))?;
    write_blobs(conn, path, code, &p.blobs)
}

/// Maps `f` over `items` on up to [`PAR_THREADS_MAX`] scoped threads (the
/// machine's parallelism), keeping the order. Used for the CPU-heavy part
/// of batch work (building, projecting and saving documents), which would
/// otherwise leave the second core of a center's desktop idle.
pub(crate) fn par_map<T: Sync, U: Send>(items: &[T], f: impl Fn(&T) -> U + Sync) -> Vec<U> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(PAR_THREADS_MAX);
    if threads < 2 || items.len() < 32 {
        return items.iter().map(f).collect();
    }
    let chunk = items.len().div_ceil(threads);
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|part| s.spawn(move || part.iter().map(f).collect::<Vec<U>>()))
            .collect();
        let mut out = Vec::with_capacity(items.len());
        for h in handles {
            match h.join() {
                Ok(part) => out.extend(part),
                // `f` panicked: re-raise it here rather than lose results.
                Err(p) => std::panic::resume_unwind(p),
            }
        }
        out
    })
}

fn put_sync_state(
    conn: &Connection,
    path: &Path,
    peer: &str,
    code: &str,
    state: &[u8],
) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO peer_case_state (peer, code, sync_state) VALUES (?1, ?2, ?3) \
         ON CONFLICT (peer, code) DO UPDATE SET sync_state = excluded.sync_state",
        params![peer, code, state],
    )
    .map_err(|e| classify(e, path))?;
    Ok(())
}

const SCHEMA_V1: &str = "
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO counters (name, value) VALUES ('next_case_seq', 1), ('update_seq', 0);
CREATE TABLE cases (
    code          TEXT PRIMARY KEY,
    snapshot      BLOB NOT NULL,
    heads         BLOB NOT NULL,
    update_seq    INTEGER NOT NULL,
    procedure     TEXT NOT NULL,
    status        TEXT NOT NULL,
    village       TEXT NOT NULL,
    applicant     TEXT NOT NULL,
    due_date      TEXT NOT NULL,
    updated_at_ms INTEGER NOT NULL,
    conflicts     INTEGER NOT NULL
);
CREATE INDEX cases_status ON cases (status);
CREATE INDEX cases_village ON cases (village);
CREATE INDEX cases_procedure ON cases (procedure);
CREATE INDEX cases_update_seq ON cases (update_seq);
CREATE TABLE case_changes (
    id   INTEGER PRIMARY KEY AUTOINCREMENT,
    code TEXT NOT NULL REFERENCES cases (code) ON DELETE CASCADE,
    data BLOB NOT NULL
);
CREATE INDEX case_changes_code ON case_changes (code, id);
CREATE TABLE peers (
    node_id         TEXT PRIMARY KEY,
    name            TEXT NOT NULL UNIQUE,
    addr            TEXT,
    added_at_ms     INTEGER NOT NULL,
    last_sync_at_ms INTEGER,
    last_sync_seq   INTEGER
);
CREATE TABLE peer_case_state (
    peer       TEXT NOT NULL,
    code       TEXT NOT NULL,
    sync_state BLOB NOT NULL,
    PRIMARY KEY (peer, code)
) WITHOUT ROWID;
PRAGMA user_version = 1;
";

/// Version 1 -> 2: blob references per case (filled by [`backfill_blobs`]).
const SCHEMA_V2: &str = "
CREATE TABLE case_blobs (
    code TEXT NOT NULL REFERENCES cases (code) ON DELETE CASCADE,
    hash TEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (code, hash)
) WITHOUT ROWID;
CREATE INDEX case_blobs_hash ON case_blobs (hash);
PRAGMA user_version = 2;
";

/// Version 2 -> 3: per-peer change cursors (the random store id that
/// cursors refer to is added to `meta` by [`Store::migrate`]).
const SCHEMA_V3: &str = "
CREATE TABLE peer_cursors (
    peer     TEXT PRIMARY KEY,
    store_id BLOB NOT NULL,
    seq      INTEGER NOT NULL
) WITHOUT ROWID;
PRAGMA user_version = 3;
";

/// Version 3 -> 4: imported rows (see [`Store::create_cases_batch_keyed`]).
const SCHEMA_V4: &str = "
CREATE TABLE import_rows (
    row_key BLOB PRIMARY KEY,
    code    TEXT NOT NULL
) WITHOUT ROWID;
PRAGMA user_version = 4;
";

/// Identifies one imported row: see `crate::bulk`.
pub type RowKey = [u8; 32];

/// Meta key of this store's random identity (16 bytes).
const META_STORE_ID: &str = "store_id";

/// The node's database. One per process; not shared between threads
/// (wrap it in a mutex or give it to one task).
pub struct Store {
    conn: Connection,
    /// Kept for error messages.
    path: PathBuf,
    /// Computes listing fields and validates documents; see [`Projector`].
    projector: Projector,
    /// A batch transaction is open (see [`Store::begin_batch`]).
    in_batch: bool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens (creating if needed) the database at `path`.
    ///
    /// WAL lets the CLI read while `serve` writes; `synchronous=FULL`
    /// makes a COMMIT durable across power loss, which matters on laptops
    /// running off failing batteries. A garbage file gives
    /// [`StoreError::Corrupt`] rather than a crash; a full integrity check
    /// is not run because it is too slow on a large database.
    pub fn open(path: &Path, projector: Projector) -> Result<Store, StoreError> {
        let conn = Connection::open(path).map_err(|e| match classify(e, path) {
            StoreError::Sqlite(e) => StoreError::CannotOpen {
                path: path.to_path_buf(),
                reason: e.to_string(),
            },
            other => other,
        })?;
        let sql = |e| classify(e, path);
        conn.busy_timeout(Duration::from_millis(BUSY_TIMEOUT_MS))
            .map_err(sql)?;
        // Cheap probe: reading the schema fails with NOTADB on a foreign file.
        conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
            r.get::<_, i64>(0)
        })
        .map_err(sql)?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(sql)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::CannotOpen {
                path: path.to_path_buf(),
                reason: format!(
                    "cannot enable WAL journaling (got {mode}); is the file on a network drive?"
                ),
            });
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(sql)?;
        let mut store = Store {
            conn,
            path: path.to_path_buf(),
            projector,
            in_batch: false,
        };
        store.migrate()?;
        Ok(store)
    }

    /// Creates the schema on a fresh file, or upgrades an older one, step
    /// by step, in one transaction. The version is re-read inside an
    /// IMMEDIATE transaction so two processes opening a file at the same
    /// moment cannot both create or upgrade it.
    fn migrate(&mut self) -> Result<(), StoreError> {
        let path = self.path.clone();
        let projector = self.projector;
        let sql = |e| classify(e, &path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql)?;
        let found: i64 = tx
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(sql)?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::TooNew {
                path: path.clone(),
                found,
                supported: SCHEMA_VERSION,
            });
        }
        if found < 0 {
            return Err(StoreError::Corrupt { path: path.clone() });
        }
        if found == SCHEMA_VERSION {
            return Ok(());
        }
        if found == 0 {
            let tables: i64 = tx
                .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
                .map_err(sql)?;
            if tables != 0 {
                // Some other application's database: do not scribble on it.
                return Err(StoreError::Corrupt { path: path.clone() });
            }
            tx.execute_batch(SCHEMA_V1).map_err(sql)?;
        }
        // Now at version 1 or later.
        if found < 2 {
            tx.execute_batch(SCHEMA_V2).map_err(sql)?;
            backfill_blobs(&tx, &path, projector)?;
        }
        if found < 3 {
            tx.execute_batch(SCHEMA_V3).map_err(sql)?;
            let mut id = [0u8; 16];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id).map_err(
                |_| StoreError::CannotOpen {
                    path: path.clone(),
                    reason: "no randomness for the store id".into(),
                },
            )?;
            tx.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO NOTHING",
                params![META_STORE_ID, &id[..]],
            )
            .map_err(sql)?;
        }
        if found < 4 {
            tx.execute_batch(SCHEMA_V4).map_err(sql)?;
        }
        tx.commit().map_err(sql)?;
        Ok(())
    }

    /// The database file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sql(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        move |e| classify(e, &self.path)
    }

    /// Reads a free-form setting.
    pub fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(self.sql())
    }

    /// Writes a free-form setting (insert or replace).
    pub fn meta_set(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )
            .map_err(self.sql())?;
        Ok(())
    }

    /// Allocates the next local case sequence number and inserts the new
    /// case in one transaction, so a crash can never hand out the same code
    /// twice or lose the counter. `make` gets the sequence number and
    /// returns the code and initial document; if it fails, the number is
    /// not consumed. Returns the code once the COMMIT has succeeded.
    pub fn create_case<F, E>(&mut self, make: F) -> Result<String, CreateError<E>>
    where
        F: FnOnce(u64) -> Result<(String, Automerge), E>,
    {
        let path = self.path.clone();
        let sql = |e| classify(e, &path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql)?;
        let seq: i64 = read_next_case_seq(&tx, &path)?;
        let seq_u = to_u64(seq, &path)?;
        let (code, doc) = make(seq_u).map_err(CreateError::Make)?;
        validate_code(&code).map_err(CreateError::Rejected)?;
        if doc.get_heads().is_empty() {
            return Err(CreateError::Rejected("the new document is empty".into()));
        }
        let exists: Option<i64> = tx
            .query_row("SELECT 1 FROM cases WHERE code = ?1", [&code], |r| r.get(0))
            .optional()
            .map_err(sql)?;
        if exists.is_some() {
            return Err(CreateError::Exists(code));
        }
        let projection = project(self.projector, &doc).map_err(CreateError::Rejected)?;
        tx.execute(
            "UPDATE counters SET value = ?1 WHERE name = 'next_case_seq'",
            [seq + 1],
        )
        .map_err(sql)?;
        write_case(&tx, &path, &code, &doc, None, &projection)?;
        tx.commit().map_err(sql)?;
        Ok(code)
    }

    /// Creates `count` new cases in ONE transaction: allocates the `count`
    /// consecutive sequence numbers starting at the counter, calls
    /// `make(i, seq)` for each (`i` from 0), validates and inserts every
    /// document exactly as [`Store::create_case`] does, and advances the
    /// counter past them. All or nothing: if `make` fails, a code is taken
    /// (also by an earlier case of the same batch) or a document is
    /// refused, nothing is written and no number is consumed. Returns the
    /// codes, in order, once the COMMIT has succeeded.
    ///
    /// Why a batch: every COMMIT is an fsync (WAL, `synchronous=FULL`), so
    /// one transaction per case makes a 100,000-row import take minutes.
    /// Why bounded ([`CREATE_BATCH_MAX`]): the write lock is held while the
    /// batch is built, and other processes (`serve`, `case set`) wait for
    /// it at most [`BUSY_TIMEOUT_MS`]; the caller's documents for one
    /// batch are also all in memory.
    pub fn create_cases_batch<F, E>(
        &mut self,
        count: usize,
        make: F,
    ) -> Result<Vec<String>, CreateError<E>>
    where
        F: FnMut(usize, u64) -> Result<(String, Automerge), E>,
    {
        self.create_cases_batch_keyed(count, None, make)
    }

    /// [`Store::create_cases_batch`] for imported rows: `row_keys[i]` is
    /// recorded with the code of case `i` in the same transaction, so a
    /// crash leaves either both or neither, and [`Store::imported_codes`]
    /// finds the row if its file is imported again.
    pub fn create_cases_batch_keyed<F, E>(
        &mut self,
        count: usize,
        row_keys: Option<&[RowKey]>,
        mut make: F,
    ) -> Result<Vec<String>, CreateError<E>>
    where
        F: FnMut(usize, u64) -> Result<(String, Automerge), E>,
    {
        if row_keys.is_some_and(|k| k.len() != count) {
            return Err(CreateError::Store(StoreError::Invalid {
                what: "row keys",
                reason: format!("one per case: {count} cases"),
            }));
        }
        if count > CREATE_BATCH_MAX {
            return Err(CreateError::Store(StoreError::Invalid {
                what: "batch size",
                reason: format!("{count} cases; at most {CREATE_BATCH_MAX} per transaction"),
            }));
        }
        if count == 0 {
            return Ok(Vec::new());
        }
        let path = self.path.clone();
        let sql = |e| classify(e, &path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql)?;
        let first: i64 = read_next_case_seq(&tx, &path)?;
        let first_u = to_u64(first, &path)?;
        // `count` is at most CREATE_BATCH_MAX, so these cannot overflow
        // unless the stored counter is absurd, which `checked_add` reports.
        let next = first
            .checked_add(count as i64)
            .ok_or_else(|| StoreError::Corrupt { path: path.clone() })?;
        let mut made = Vec::with_capacity(count);
        for i in 0..count {
            let (code, doc) = make(i, first_u + i as u64).map_err(CreateError::Make)?;
            validate_code(&code).map_err(CreateError::Rejected)?;
            if doc.get_heads().is_empty() {
                return Err(CreateError::Rejected("the new document is empty".into()));
            }
            let exists: Option<i64> = tx
                .prepare_cached("SELECT 1 FROM cases WHERE code = ?1")
                .and_then(|mut s| s.query_row([&code], |r| r.get(0)).optional())
                .map_err(sql)?;
            if exists.is_some() || made.iter().any(|(c, _)| *c == code) {
                return Err(CreateError::Exists(code));
            }
            made.push((code, doc));
        }
        // Projecting (which validates) and saving are most of the cost of
        // a new case and touch no database: do them on every core.
        let projector = self.projector;
        let prepared = par_map(&made, |(_, doc)| {
            project(projector, doc).map(|p| (p, encode_heads(&sorted_heads(doc)), doc.save()))
        });
        let mut codes = Vec::with_capacity(count);
        for (i, ((code, _), prepared)) in made.into_iter().zip(prepared).enumerate() {
            let (projection, heads, snapshot) = prepared.map_err(CreateError::Rejected)?;
            insert_case(&tx, &path, &code, &heads, &snapshot, &projection)?;
            if let Some(keys) = row_keys {
                tx.prepare_cached("INSERT INTO import_rows (row_key, code) VALUES (?1, ?2)")
                    .and_then(|mut st| st.execute(params![&keys[i][..], &code]))
                    .map_err(sql)?;
            }
            codes.push(code);
        }
        tx.execute(
            "UPDATE counters SET value = ?1 WHERE name = 'next_case_seq'",
            [next],
        )
        .map_err(sql)?;
        tx.commit().map_err(sql)?;
        Ok(codes)
    }

    /// For each row key, the code of the case it was imported as, if it
    /// was (see [`Store::create_cases_batch_keyed`]).
    pub fn imported_codes(&self, keys: &[RowKey]) -> Result<Vec<Option<String>>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT code FROM import_rows WHERE row_key = ?1")
            .map_err(self.sql())?;
        keys.iter()
            .map(|k| {
                st.query_row([&k[..]], |r| r.get(0))
                    .optional()
                    .map_err(self.sql())
            })
            .collect()
    }

    /// The sequence number the next created case will get (read only; a
    /// concurrent writer may take it first). Lets a bulk import build its
    /// documents, whose codes contain the number, before the transaction.
    pub fn next_case_seq(&self) -> Result<u64, StoreError> {
        let v = read_counter(&self.conn, &self.path, "next_case_seq")?;
        to_u64(v, &self.path)
    }

    /// Up to `limit` case codes greater than `after` (all codes when
    /// `None`), in code order, from the projection table. Keyset paging
    /// lets an export walk every case without loading them all and
    /// without holding one read transaction open for the whole walk.
    pub fn codes_page(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT code FROM cases WHERE code > ?1 ORDER BY code LIMIT ?2")
            .map_err(self.sql())?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt
            .query_map(params![after.unwrap_or(""), limit], |r| r.get(0))
            .map_err(self.sql())?;
        rows.collect::<Result<_, _>>().map_err(self.sql())
    }

    /// Edits a case: `BEGIN IMMEDIATE`, load the current document, run `f`
    /// on it, and if its heads changed validate it, append the incremental
    /// chunk, update heads, projection and `update_seq` (compacting if
    /// needed), then COMMIT. `f`'s value is returned only after the COMMIT
    /// succeeded. Loading inside the write transaction means two processes
    /// editing the same case are serialised and neither loses the other's
    /// edit.
    ///
    /// The document `f` receives has a random actor ID; set the node's own
    /// (`NodeId::actor_id`) inside `f` if history should name the node.
    pub fn update_case<T, E, F>(&mut self, code: &str, f: F) -> Result<T, UpdateError<E>>
    where
        F: FnOnce(&mut Automerge) -> Result<T, E>,
    {
        let path = self.path.clone();
        let sql = |e| classify(e, &path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql)?;
        let Loaded {
            mut doc,
            heads,
            chunks,
        } = load_doc(&tx, &path, code)?.ok_or_else(|| UpdateError::NotFound(code.to_string()))?;
        let value = f(&mut doc).map_err(UpdateError::Op)?;
        if sorted_heads(&doc) != heads {
            let projection = project(self.projector, &doc).map_err(UpdateError::Rejected)?;
            let prev = Prev {
                heads: &heads,
                chunks,
            };
            write_case(&tx, &path, code, &doc, Some(prev), &projection)?;
        }
        tx.commit().map_err(sql)?;
        Ok(value)
    }

    /// Loads a case's document, or `None` if there is no such case. Runs in
    /// a read transaction so a concurrent writer cannot be seen half-done.
    pub fn load_case(&self, code: &str) -> Result<Option<Automerge>, StoreError> {
        if self.in_batch {
            // Already inside our own transaction: reads are consistent.
            return Ok(load_doc(&self.conn, &self.path, code)?.map(|l| l.doc));
        }
        let tx = self.conn.unchecked_transaction().map_err(self.sql())?;
        let loaded = load_doc(&tx, &self.path, code)?;
        Ok(loaded.map(|l| l.doc))
    }

    /// Opens a write transaction that groups many merges (and sync-state
    /// writes) into one fsync. A sync session wraps the handling of each
    /// batch of received frames in one, and queues no reply before
    /// [`Store::end_batch`] returned: replies still never run ahead of the
    /// disk, but a first sync of 10,000 cases costs a few dozen fsyncs
    /// instead of 10,000.
    pub fn begin_batch(&mut self) -> Result<(), StoreError> {
        if self.in_batch {
            return Ok(());
        }
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(self.sql())?;
        self.in_batch = true;
        Ok(())
    }

    /// Commits the batch opened by [`Store::begin_batch`]. On error the
    /// batch is rolled back: none of its merges happened.
    pub fn end_batch(&mut self) -> Result<(), StoreError> {
        if !self.in_batch {
            return Ok(());
        }
        self.in_batch = false;
        if let Err(e) = self.conn.execute_batch("COMMIT") {
            let _ = self.conn.execute_batch("ROLLBACK");
            return Err(classify(e, &self.path));
        }
        Ok(())
    }

    /// Abandons the batch opened by [`Store::begin_batch`].
    pub fn abort_batch(&mut self) {
        if self.in_batch {
            self.in_batch = false;
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }

    /// This store's random identity, which peers' cursors refer to.
    pub fn store_id(&self) -> Result<[u8; 16], StoreError> {
        let raw = self.meta_get(META_STORE_ID)?.unwrap_or_default();
        <[u8; 16]>::try_from(raw.as_slice()).map_err(|_| StoreError::Corrupt {
            path: self.path.clone(),
        })
    }

    /// Cases whose last change has an update sequence number in
    /// `(after, upto]`, in that order, at most `limit`: (seq, code, heads).
    /// Reads the heads column only; no document is loaded.
    pub fn changes_page(
        &self,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<(u64, String, Vec<ChangeHash>)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT update_seq, code, heads FROM cases \
                 WHERE update_seq > ?1 AND update_seq <= ?2 ORDER BY update_seq LIMIT ?3",
            )
            .map_err(self.sql())?;
        let rows = stmt
            .query_map(params![after as i64, upto as i64, limit as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                ))
            })
            .map_err(self.sql())?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, code, heads) = row.map_err(self.sql())?;
            let heads = decode_heads(&code, &heads)?;
            out.push((seq as u64, code, heads));
        }
        Ok(out)
    }

    /// The cursor held for `peer`: its store id and the update sequence
    /// number up to which everything it listed is held here.
    pub fn peer_cursor(&self, peer: &str) -> Result<Option<([u8; 16], u64)>, StoreError> {
        let row: Option<(Vec<u8>, i64)> = self
            .conn
            .query_row(
                "SELECT store_id, seq FROM peer_cursors WHERE peer = ?1",
                [peer],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(self.sql())?;
        Ok(row.and_then(|(id, seq)| {
            <[u8; 16]>::try_from(id.as_slice())
                .ok()
                .map(|id| (id, seq.max(0) as u64))
        }))
    }

    /// Stores the cursor for `peer`. The session calls it only after every
    /// case the peer listed is committed here.
    pub fn save_peer_cursor(
        &mut self,
        peer: &str,
        store_id: [u8; 16],
        seq: u64,
    ) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO peer_cursors (peer, store_id, seq) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (peer) DO UPDATE SET store_id = excluded.store_id, seq = excluded.seq",
                params![peer, &store_id[..], seq as i64],
            )
            .map_err(self.sql())?;
        Ok(())
    }

    /// How far `peer` had seen this store at the last convergence (see
    /// `CaseStore::listed_upto` in `fieldcase-sync`): a hint kept in `meta`.
    /// Stored as the sequence number and the protocol version (8 + 2 bytes,
    /// big-endian); 8 bytes alone were written by builds that spoke at most
    /// protocol 3, when only version 2 and up could be remembered, so they
    /// read as version 2.
    pub fn listed_upto(&self, peer: &str) -> Result<Option<ListedUpto>, StoreError> {
        let Some(v) = self.meta_get(&listed_key(peer))? else {
            return Ok(None);
        };
        let seq = |b: &[u8]| <[u8; 8]>::try_from(b).ok().map(u64::from_be_bytes);
        Ok(match v.len() {
            8 => seq(&v).map(|seq| ListedUpto { seq, version: 2 }),
            10 => seq(&v[..8]).map(|seq| ListedUpto {
                seq,
                version: u16::from_be_bytes([v[8], v[9]]),
            }),
            _ => None,
        })
    }

    /// Remembers or forgets [`Store::listed_upto`].
    pub fn save_listed_upto(
        &mut self,
        peer: &str,
        upto: Option<ListedUpto>,
    ) -> Result<(), StoreError> {
        match upto {
            Some(ListedUpto { seq, version }) => {
                let mut v = seq.to_be_bytes().to_vec();
                v.extend_from_slice(&version.to_be_bytes());
                self.meta_set(&listed_key(peer), &v)
            }
            None => {
                self.conn
                    .execute("DELETE FROM meta WHERE key = ?1", [listed_key(peer)])
                    .map_err(self.sql())?;
                Ok(())
            }
        }
    }

    /// Marks a case whose stored bytes failed to load as damaged, by
    /// clearing its recorded heads. Its inventory entry then differs from
    /// every peer's, so the next sync with a peer that holds it sends the
    /// whole case, and [`Store::merge_remote`] rebuilds it. The damaged
    /// bytes are kept until then (nothing is deleted on a read).
    pub fn mark_damaged(&mut self, code: &str) -> Result<(), StoreError> {
        self.conn
            .execute("UPDATE cases SET heads = X'' WHERE code = ?1", [code])
            .map_err(self.sql())?;
        Ok(())
    }

    /// A case's stored bytes (snapshot, then its incremental chunks in
    /// order), which `Automerge::load` reads as one document, for sending
    /// whole to a peer. Not loaded here: the peer verifies by loading. A
    /// case marked damaged has none.
    pub fn case_saved(&self, code: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let row: Option<(Vec<u8>, Vec<u8>)> = self
            .conn
            .prepare_cached("SELECT snapshot, heads FROM cases WHERE code = ?1")
            .and_then(|mut stmt| {
                stmt.query_row([code], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
            })
            .map_err(self.sql())?;
        let Some((mut bytes, heads)) = row else {
            return Ok(None);
        };
        if heads.is_empty() {
            return Ok(None);
        }
        let mut stmt = self
            .conn
            .prepare_cached("SELECT data FROM case_changes WHERE code = ?1 ORDER BY id")
            .map_err(self.sql())?;
        let mut rows = stmt.query([code]).map_err(self.sql())?;
        while let Some(r) = rows.next().map_err(self.sql())? {
            let chunk: Vec<u8> = r.get(0).map_err(self.sql())?;
            bytes.extend_from_slice(&chunk);
        }
        Ok(Some(bytes))
    }

    /// The recorded heads of a case (sorted), without loading it.
    pub fn case_heads(&self, code: &str) -> Result<Option<Vec<ChangeHash>>, StoreError> {
        let blob: Option<Vec<u8>> = self
            .conn
            .query_row("SELECT heads FROM cases WHERE code = ?1", [code], |r| {
                r.get(0)
            })
            .optional()
            .map_err(self.sql())?;
        blob.map(|b| decode_heads(code, &b)).transpose()
    }

    /// The number of conflicted fields recorded in a case's projection, so
    /// a sync can report how many conflicts a merge introduced.
    pub fn case_conflicts(&self, code: &str) -> Result<Option<i64>, StoreError> {
        self.conn
            .query_row("SELECT conflicts FROM cases WHERE code = ?1", [code], |r| {
                r.get(0)
            })
            .optional()
            .map_err(self.sql())
    }

    /// Merges a document received from `peer` into the stored case (or
    /// stores it as a new case), and saves the peer's sync state, all in
    /// one transaction so the sync marker never runs ahead of the data.
    ///
    /// The merged result must pass the projector; if it does not, or the
    /// changes cannot be applied, the call returns
    /// [`MergeError::Rejected`] and writes nothing, not even sync state.
    pub fn merge_remote(
        &mut self,
        peer: &str,
        code: &str,
        incoming: &Automerge,
        sync_state: &[u8],
    ) -> Result<MergeOutcome, MergeError> {
        validate_code(code).map_err(MergeError::Rejected)?;
        // The merge runs in a savepoint inside a batch transaction (see
        // [`Store::begin_batch`]): a refused document rolls back only
        // itself, and the batch's one COMMIT makes every merge durable
        // together. Outside a batch, the merge is its own batch.
        self.in_some_batch(|store| store.merge_in_savepoint(peer, code, incoming, sync_state))
    }

    /// Stores a case the peer sent whole, when it is new here: `saved`
    /// (the bytes it was loaded from) becomes its snapshot as it is, which
    /// spares an `Automerge::save` (compressing every column) per case on a
    /// first sync; the heads check on every read verifies them. The caller
    /// loaded the document and projected it with this store's projector
    /// (in parallel, for a batch). Returns `false`, writing nothing, if the
    /// case exists (it arrived meanwhile, or a damaged copy is here): merge
    /// it with [`Store::merge_remote`] instead.
    pub fn insert_whole(
        &mut self,
        peer: &str,
        code: &str,
        saved: &[u8],
        heads: &[ChangeHash],
        projection: &Projection,
        sync_state: &[u8],
    ) -> Result<bool, MergeError> {
        validate_code(code).map_err(MergeError::Rejected)?;
        let projection = check_projection(projection.clone()).map_err(MergeError::Rejected)?;
        if heads.is_empty() {
            return Err(MergeError::Rejected(format!(
                "case {code} arrived as an empty document"
            )));
        }
        self.in_some_batch(|store| {
            store.insert_whole_in_savepoint(peer, code, saved, heads, &projection, sync_state)
        })
    }

    fn insert_whole_in_savepoint(
        &mut self,
        peer: &str,
        code: &str,
        saved: &[u8],
        heads: &[ChangeHash],
        projection: &Projection,
        sync_state: &[u8],
    ) -> Result<bool, MergeError> {
        let path = self.path.clone();
        let sql = |e| classify(e, &path);
        let tx = self.conn.savepoint().map_err(sql)?;
        let exists = tx
            .prepare_cached("SELECT 1 FROM cases WHERE code = ?1")
            .and_then(|mut stmt| stmt.exists([code]))
            .map_err(sql)?;
        if exists {
            return Ok(false);
        }
        let mut sorted = heads.to_vec();
        sorted.sort();
        insert_case(&tx, &path, code, &encode_heads(&sorted), saved, projection)?;
        put_sync_state(&tx, &path, peer, code, sync_state)?;
        tx.commit().map_err(sql)?;
        Ok(true)
    }

    /// Runs `write` inside the caller's batch, or, outside one, in a batch
    /// of its own that commits on success and rolls back on failure.
    fn in_some_batch<T>(
        &mut self,
        write: impl FnOnce(&mut Self) -> Result<T, MergeError>,
    ) -> Result<T, MergeError> {
        let own_batch = !self.in_batch;
        if own_batch {
            self.begin_batch()?;
        }
        let result = write(self);
        if own_batch {
            match &result {
                Ok(_) => self.end_batch()?,
                Err(_) => self.abort_batch(),
            }
        }
        result
    }

    fn merge_in_savepoint(
        &mut self,
        peer: &str,
        code: &str,
        incoming: &Automerge,
        sync_state: &[u8],
    ) -> Result<MergeOutcome, MergeError> {
        let path = self.path.clone();
        let sql = |e| classify(e, &path);
        let tx = self.conn.savepoint().map_err(sql)?;
        let (mut doc, before, chunks, created) = match load_doc(&tx, &path, code) {
            Ok(Some(l)) => (l.doc, l.heads, l.chunks, false),
            Ok(None) => (Automerge::new(), Vec::new(), 0, true),
            // Our stored copy is damaged: rebuild the case from what the
            // peer sends, replacing the damaged rows in this transaction.
            Err(StoreError::CorruptCase { .. }) => {
                tx.execute("DELETE FROM case_changes WHERE code = ?1", [code])
                    .map_err(sql)?;
                tx.execute("DELETE FROM cases WHERE code = ?1", [code])
                    .map_err(sql)?;
                (Automerge::new(), Vec::new(), 0, true)
            }
            Err(e) => return Err(e.into()),
        };
        doc.merge(&mut incoming.clone())
            .map_err(|e| MergeError::Rejected(format!("changes cannot be applied: {e}")))?;
        let heads = sorted_heads(&doc);
        let changed = heads != before;
        if created && heads.is_empty() {
            return Err(MergeError::Rejected(format!(
                "case {code} arrived as an empty document"
            )));
        }
        if changed {
            let projection = project(self.projector, &doc).map_err(MergeError::Rejected)?;
            let prev = (!created).then_some(Prev {
                heads: &before,
                chunks,
            });
            write_case(&tx, &path, code, &doc, prev, &projection)?;
        }
        put_sync_state(&tx, &path, peer, code, sync_state)?;
        tx.commit().map_err(sql)?;
        Ok(MergeOutcome {
            changed,
            created,
            heads,
        })
    }

    /// Saves the encoded Automerge sync state for (`peer`, `code`).
    pub fn save_sync_state(
        &mut self,
        peer: &str,
        code: &str,
        state: &[u8],
    ) -> Result<(), StoreError> {
        put_sync_state(&self.conn, &self.path, peer, code, state)
    }

    /// Reads the encoded sync state for (`peer`, `code`).
    pub fn load_sync_state(&self, peer: &str, code: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.conn
            .query_row(
                "SELECT sync_state FROM peer_case_state WHERE peer = ?1 AND code = ?2",
                [peer, code],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.sql())
    }

    /// Every case with its heads, sorted by code, read from the heads
    /// column (no document is loaded). This is what sync compares first.
    pub fn inventory(&self) -> Result<Vec<(String, Vec<ChangeHash>)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT code, heads FROM cases ORDER BY code")
            .map_err(self.sql())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .map_err(self.sql())?;
        let mut out = Vec::new();
        for row in rows {
            let (code, blob) = row.map_err(self.sql())?;
            let heads = decode_heads(&code, &blob)?;
            out.push((code, heads));
        }
        Ok(out)
    }

    /// Cases matching `filter`, ordered by code.
    pub fn list(&self, filter: &ListFilter) -> Result<Vec<CaseRow>, StoreError> {
        let mut sql = String::from(
            "SELECT code, procedure, status, village, applicant, due_date, updated_at_ms, \
             conflicts, update_seq FROM cases",
        );
        let mut args: Vec<&str> = Vec::new();
        for (column, value) in [
            ("status", &filter.status),
            ("village", &filter.village),
            ("procedure", &filter.procedure),
        ] {
            if let Some(v) = value {
                sql.push_str(if args.is_empty() { " WHERE " } else { " AND " });
                args.push(v);
                sql.push_str(&format!("{column} = ?{}", args.len()));
            }
        }
        sql.push_str(" ORDER BY code");
        let mut stmt = self.conn.prepare(&sql).map_err(self.sql())?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(args), |r| {
                Ok((
                    CaseRow {
                        code: r.get(0)?,
                        projection: Projection {
                            procedure: r.get(1)?,
                            status: r.get(2)?,
                            village: r.get(3)?,
                            applicant: r.get(4)?,
                            due_date: r.get(5)?,
                            updated_at_ms: r.get(6)?,
                            conflicts: r.get(7)?,
                            blobs: Vec::new(),
                        },
                        update_seq: 0,
                    },
                    r.get::<_, i64>(8)?,
                ))
            })
            .map_err(self.sql())?;
        let mut out = Vec::new();
        for row in rows {
            let (mut case, seq) = row.map_err(self.sql())?;
            case.update_seq = to_u64(seq, &self.path)?;
            case.projection.blobs = self.case_blobs(&case.code)?;
            out.push(case);
        }
        Ok(out)
    }

    /// The `case_blobs` rows of one case, sorted by hash.
    fn case_blobs(&self, code: &str) -> Result<Vec<BlobRef>, StoreError> {
        self.blob_query(
            "SELECT hash, size FROM case_blobs WHERE code = ?1 ORDER BY hash",
            &[code],
        )
    }

    /// Runs a `SELECT hash, size ...` query.
    fn blob_query(&self, sql: &str, args: &[&str]) -> Result<Vec<BlobRef>, StoreError> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(self.sql())?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(args), |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
            })
            .map_err(self.sql())?;
        let mut out = Vec::new();
        for row in rows {
            let (hash, size) = row.map_err(self.sql())?;
            out.push(BlobRef {
                hash,
                size: to_u64(size, &self.path)?,
            });
        }
        Ok(out)
    }

    /// Every blob any case refers to: distinct `(hash, size)` pairs ordered
    /// by hash, then size. A hash that hostile or buggy documents give
    /// different sizes in different cases appears once per size; the
    /// fetcher treats the size as part of the identity.
    pub fn referenced_blobs(&self) -> Result<Vec<BlobRef>, StoreError> {
        self.blob_query(
            "SELECT DISTINCT hash, size FROM case_blobs ORDER BY hash, size",
            &[],
        )
    }

    /// The size recorded for `hash` if any case refers to it, else `None`:
    /// whether this node may serve the blob to a peer, and what size an
    /// offered copy must have. If cases disagree about the size (see
    /// [`Store::referenced_blobs`]) the smallest is returned.
    pub fn blob_referenced(&self, hash: &str) -> Result<Option<u64>, StoreError> {
        let size: Option<i64> = self
            .conn
            .query_row(
                "SELECT min(size) FROM case_blobs WHERE hash = ?1",
                [hash],
                |r| r.get(0),
            )
            .map_err(self.sql())?;
        size.map(|s| to_u64(s, &self.path)).transpose()
    }

    /// Codes of the cases that refer to blob `hash`, sorted.
    pub fn cases_referencing(&self, hash: &str) -> Result<Vec<String>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT code FROM case_blobs WHERE hash = ?1 ORDER BY code")
            .map_err(self.sql())?;
        let rows = stmt.query_map([hash], |r| r.get(0)).map_err(self.sql())?;
        rows.collect::<Result<_, _>>().map_err(self.sql())
    }

    /// The current local update counter: the `update_seq` of the most
    /// recent change to any case (0 if none).
    pub fn update_seq(&self) -> Result<u64, StoreError> {
        let v = read_counter(&self.conn, &self.path, "update_seq")?;
        to_u64(v, &self.path)
    }

    /// Number of cases changed after local counter value `seq`.
    pub fn changed_since(&self, seq: u64) -> Result<u64, StoreError> {
        let n: i64 = self
            .conn
            .query_row(
                "SELECT count(*) FROM cases WHERE update_seq > ?1",
                [to_i64(seq, "sequence number")?],
                |r| r.get(0),
            )
            .map_err(self.sql())?;
        to_u64(n, &self.path)
    }

    /// Adds a trusted peer.
    ///
    /// Re-adding the same node ID under the same name is allowed and only
    /// updates the address (when one is given), so "add the peer again
    /// with its new IP" just works. A name or node ID already used by a
    /// *different* peer is refused with [`StoreError::DuplicatePeerName`]
    /// or [`StoreError::DuplicatePeerId`]: silently renaming or re-keying a
    /// trusted peer would hide a mistake or an impersonation attempt.
    pub fn add_peer(
        &mut self,
        node_id: &str,
        name: &str,
        addr: Option<&str>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        if node_id.is_empty() {
            return Err(StoreError::Invalid {
                what: "node ID",
                reason: "it is empty".into(),
            });
        }
        if name.trim().is_empty() || name.len() > PEER_NAME_BYTES_MAX {
            return Err(StoreError::Invalid {
                what: "peer name",
                reason: format!("it must be 1 to {PEER_NAME_BYTES_MAX} bytes"),
            });
        }
        let path = self.path.clone();
        let sql = |e| classify(e, &path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql)?;
        let by_id: Option<String> = tx
            .query_row(
                "SELECT name FROM peers WHERE node_id = ?1",
                [node_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql)?;
        match by_id {
            Some(existing) if existing == name => {
                tx.execute(
                    "UPDATE peers SET addr = coalesce(?2, addr) WHERE node_id = ?1",
                    params![node_id, addr],
                )
                .map_err(sql)?;
            }
            Some(existing) => {
                return Err(StoreError::DuplicatePeerId {
                    node_id: node_id.to_string(),
                    name: existing,
                })
            }
            None => {
                let by_name: Option<String> = tx
                    .query_row("SELECT node_id FROM peers WHERE name = ?1", [name], |r| {
                        r.get(0)
                    })
                    .optional()
                    .map_err(sql)?;
                if let Some(other) = by_name {
                    return Err(StoreError::DuplicatePeerName {
                        name: name.to_string(),
                        node_id: other,
                    });
                }
                tx.execute(
                    "INSERT INTO peers (node_id, name, addr, added_at_ms) VALUES (?1, ?2, ?3, ?4)",
                    params![node_id, name, addr, now_ms],
                )
                .map_err(sql)?;
            }
        }
        tx.commit().map_err(sql)?;
        Ok(())
    }

    /// Removes a peer and its per-case sync states. Returns whether it existed.
    pub fn remove_peer(&mut self, node_id: &str) -> Result<bool, StoreError> {
        let path = self.path.clone();
        let sql = |e| classify(e, &path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql)?;
        tx.execute("DELETE FROM peer_case_state WHERE peer = ?1", [node_id])
            .map_err(sql)?;
        tx.execute("DELETE FROM meta WHERE key = ?1", [listed_key(node_id)])
            .map_err(sql)?;
        let n = tx
            .execute("DELETE FROM peers WHERE node_id = ?1", [node_id])
            .map_err(sql)?;
        tx.commit().map_err(sql)?;
        Ok(n > 0)
    }

    fn peer_query(&self, where_sql: &str, arg: Option<&str>) -> Result<Vec<PeerRow>, StoreError> {
        let sql = format!(
            "SELECT node_id, name, addr, added_at_ms, last_sync_at_ms, last_sync_seq \
             FROM peers {where_sql} ORDER BY name"
        );
        let mut stmt = self.conn.prepare_cached(&sql).map_err(self.sql())?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(arg), |r| {
                Ok((
                    PeerRow {
                        node_id: r.get(0)?,
                        name: r.get(1)?,
                        addr: r.get(2)?,
                        added_at_ms: r.get(3)?,
                        last_sync_at_ms: r.get(4)?,
                        last_sync_seq: None,
                    },
                    r.get::<_, Option<i64>>(5)?,
                ))
            })
            .map_err(self.sql())?;
        let mut out = Vec::new();
        for row in rows {
            let (mut peer, seq) = row.map_err(self.sql())?;
            peer.last_sync_seq = seq.map(|s| to_u64(s, &self.path)).transpose()?;
            out.push(peer);
        }
        Ok(out)
    }

    /// All peers, ordered by name.
    pub fn peers(&self) -> Result<Vec<PeerRow>, StoreError> {
        self.peer_query("", None)
    }

    /// The peer with this local name.
    pub fn peer_by_name(&self, name: &str) -> Result<Option<PeerRow>, StoreError> {
        Ok(self
            .peer_query("WHERE name = ?1", Some(name))?
            .into_iter()
            .next())
    }

    /// The peer with this node ID (the trust-list check after a handshake).
    pub fn peer_by_id(&self, node_id: &str) -> Result<Option<PeerRow>, StoreError> {
        Ok(self
            .peer_query("WHERE node_id = ?1", Some(node_id))?
            .into_iter()
            .next())
    }

    /// Records a completed sync with a peer: when, and our `update_seq` at
    /// that point (so "N cases changed since last sync" can be shown).
    pub fn record_sync(&mut self, node_id: &str, at_ms: i64, seq: u64) -> Result<(), StoreError> {
        let n = self
            .conn
            .execute(
                "UPDATE peers SET last_sync_at_ms = ?2, last_sync_seq = ?3 WHERE node_id = ?1",
                params![node_id, at_ms, to_i64(seq, "sequence number")?],
            )
            .map_err(self.sql())?;
        if n == 0 {
            return Err(StoreError::UnknownPeer {
                node_id: node_id.to_string(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{AutomergeError, ReadDoc, ROOT};

    /// Reads `status` (required), `village` (optional) and `blobs`
    /// (optional list of `hash:size` strings) from the root.
    fn projector(doc: &Automerge) -> Result<Projection, String> {
        let text = |key: &str| -> Result<Option<String>, String> {
            match doc.get(ROOT, key).map_err(|e| e.to_string())? {
                Some((v, _)) => Ok(v.as_str().map(str::to_string)),
                None => Ok(None),
            }
        };
        let status = text("status")?.ok_or("missing status")?;
        let conflicts = doc
            .get_all(ROOT, "status")
            .map_err(|e| e.to_string())?
            .len()
            .saturating_sub(1);
        Ok(Projection {
            procedure: text("procedure")?.unwrap_or_default(),
            status,
            village: text("village")?.unwrap_or_default(),
            applicant: String::new(),
            due_date: String::new(),
            updated_at_ms: 0,
            conflicts: i64::try_from(conflicts).map_err(|e| e.to_string())?,
            blobs: blobs_of(doc)?,
        })
    }

    fn blobs_of(doc: &Automerge) -> Result<Vec<BlobRef>, String> {
        let Some((_, list)) = doc.get(ROOT, "blobs").map_err(|e| e.to_string())? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for i in 0..doc.length(&list) {
            let (v, _) = doc
                .get(&list, i)
                .map_err(|e| e.to_string())?
                .ok_or("hole")?;
            let text = v.as_str().ok_or("blob entry is not text")?;
            let (hash, size) = text.split_once(':').ok_or("blob entry has no size")?;
            out.push(BlobRef {
                hash: hash.to_string(),
                size: size.parse().map_err(|_| "bad blob size")?,
            });
        }
        Ok(out)
    }

    /// Appends `hash:size` entries to the root `blobs` list.
    fn add_blobs(doc: &mut Automerge, entries: &[(&str, u64)]) -> Result<(), AutomergeError> {
        doc.transact::<_, _, AutomergeError>(|tx| {
            let list = match tx.get(ROOT, "blobs")? {
                Some((_, id)) => id,
                None => tx.put_object(ROOT, "blobs", automerge::ObjType::List)?,
            };
            for (hash, size) in entries {
                let idx = tx.length(&list);
                tx.insert(&list, idx, format!("{hash}:{size}"))?;
            }
            Ok(())
        })
        .map(|_| ())
        .map_err(|f| f.error)
    }

    fn hash(n: u8) -> String {
        blake3::hash(&[n]).to_hex().to_string()
    }

    fn blob_rows(store: &Store) -> Vec<(String, String, i64)> {
        let mut stmt = store
            .conn
            .prepare("SELECT code, hash, size FROM case_blobs ORDER BY code, hash")
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    fn put(doc: &mut Automerge, key: &str, value: &str) -> Result<(), AutomergeError> {
        doc.transact::<_, _, AutomergeError>(|tx| {
            tx.put(ROOT, key, value)?;
            Ok(())
        })
        .map(|_| ())
        .map_err(|f| f.error)
    }

    fn new_doc(status: &str, village: &str) -> Automerge {
        let mut doc = Automerge::new();
        put(&mut doc, "status", status).unwrap();
        put(&mut doc, "village", village).unwrap();
        doc
    }

    fn open(dir: &tempfile::TempDir) -> Store {
        Store::open(&dir.path().join("node.db"), projector).unwrap()
    }

    fn create(store: &mut Store, village: &str) -> String {
        store
            .create_case(|seq| {
                Ok::<_, AutomergeError>((format!("K7QF2M-{seq:04}"), new_doc("received", village)))
            })
            .unwrap()
    }

    fn status_of(doc: &Automerge) -> String {
        projector(doc).unwrap().status
    }

    #[test]
    fn pragmas_are_wal_and_full_sync() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let mode: String = store
            .conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = store
            .conn
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "synchronous=FULL");
        let fk: i64 = store
            .conn
            .pragma_query_value(None, "foreign_keys", |r| r.get(0))
            .unwrap();
        assert_eq!(fk, 1);
        let version: i64 = store
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }

    #[test]
    fn create_update_load_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(&dir);
        assert_eq!(store.update_seq().unwrap(), 0);
        let code = create(&mut store, "Thôn 1");
        assert_eq!(code, "K7QF2M-0001");
        assert_eq!(store.update_seq().unwrap(), 1);

        let returned = store
            .update_case(&code, |doc| {
                put(doc, "status", "processing")?;
                Ok::<_, AutomergeError>(42)
            })
            .unwrap();
        assert_eq!(returned, 42);
        let doc = store.load_case(&code).unwrap().unwrap();
        assert_eq!(status_of(&doc), "processing");
        assert_eq!(
            store.case_heads(&code).unwrap().unwrap(),
            sorted_heads(&doc)
        );
        assert_eq!(store.update_seq().unwrap(), 2);

        // A no-op edit writes nothing and does not bump the counter.
        store
            .update_case(&code, |_| Ok::<_, AutomergeError>(()))
            .unwrap();
        assert_eq!(store.update_seq().unwrap(), 2);

        let rows = store.list(&ListFilter::default()).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].projection.status, "processing");
        assert_eq!(rows[0].projection.village, "Thôn 1");
        assert_eq!(rows[0].update_seq, 2);

        assert!(matches!(
            store.update_case("nope", |_| Ok::<_, AutomergeError>(())),
            Err(UpdateError::NotFound(_))
        ));
        // A failing closure writes nothing.
        let err = store.update_case(&code, |doc| {
            put(doc, "status", "lost")?;
            Err::<(), _>(AutomergeError::Fail)
        });
        assert!(matches!(err, Err(UpdateError::Op(_))));
        assert_eq!(
            status_of(&store.load_case(&code).unwrap().unwrap()),
            "processing"
        );
        assert!(store.load_case("nope").unwrap().is_none());
    }

    #[test]
    fn update_refused_by_projector_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(&dir);
        let code = create(&mut store, "Thôn 1");
        let before = store.case_heads(&code).unwrap();
        let err = store.update_case(&code, |doc| {
            doc.transact::<_, _, AutomergeError>(|tx| {
                tx.delete(ROOT, "status")?;
                Ok(())
            })
            .map_err(|f| f.error)?;
            Ok::<_, AutomergeError>(())
        });
        assert!(matches!(err, Err(UpdateError::Rejected(_))));
        assert_eq!(store.case_heads(&code).unwrap(), before);
        assert_eq!(store.update_seq().unwrap(), 1);
    }

    #[test]
    fn compaction_past_threshold_keeps_document() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(&dir);
        let code = create(&mut store, "Thôn 2");
        let chunk_count = |s: &Store| -> i64 {
            s.conn
                .query_row(
                    "SELECT count(*) FROM case_changes WHERE code = ?1",
                    [&code],
                    |r| r.get(0),
                )
                .unwrap()
        };
        for i in 0..COMPACT_THRESHOLD {
            store
                .update_case(&code, |doc| put(doc, "status", &format!("s{i}")))
                .unwrap();
        }
        assert_eq!(chunk_count(&store), COMPACT_THRESHOLD as i64);
        let before = store.load_case(&code).unwrap().unwrap();
        store
            .update_case(&code, |doc| put(doc, "status", "final"))
            .unwrap();
        assert_eq!(chunk_count(&store), 0, "compacted into the snapshot");
        let after = store.load_case(&code).unwrap().unwrap();
        assert_eq!(status_of(&after), "final");
        // Full history kept: the old heads are ancestors of the new ones.
        assert_eq!(
            after.get_changes(&[]).len(),
            before.get_changes(&[]).len() + 1
        );
        assert_eq!(
            store.case_heads(&code).unwrap().unwrap(),
            sorted_heads(&after)
        );
        // Edits continue to work after compaction.
        store
            .update_case(&code, |doc| put(doc, "status", "again"))
            .unwrap();
        assert_eq!(chunk_count(&store), 1);
        assert_eq!(
            status_of(&store.load_case(&code).unwrap().unwrap()),
            "again"
        );
    }

    #[test]
    fn merge_remote_converges_and_saves_sync_state() {
        let dir_a = tempfile::tempdir().unwrap();
        let dir_b = tempfile::tempdir().unwrap();
        let mut a = open(&dir_a);
        let mut b = open(&dir_b);
        let code = create(&mut a, "Thôn 3");

        // B receives the new case.
        let doc = a.load_case(&code).unwrap().unwrap();
        let out = b.merge_remote("peer-a", &code, &doc, b"state1").unwrap();
        assert!(out.created && out.changed);
        assert_eq!(
            b.load_sync_state("peer-a", &code).unwrap().unwrap(),
            b"state1"
        );

        // Concurrent edits on both sides.
        a.update_case(&code, |d| put(d, "procedure", "khai sinh"))
            .unwrap();
        b.update_case(&code, |d| put(d, "status", "processing"))
            .unwrap();
        let doc_a = a.load_case(&code).unwrap().unwrap();
        let doc_b = b.load_case(&code).unwrap().unwrap();
        let out_b = b.merge_remote("peer-a", &code, &doc_a, b"state2").unwrap();
        let out_a = a.merge_remote("peer-b", &code, &doc_b, b"s").unwrap();
        assert!(out_a.changed && out_b.changed && !out_a.created);
        assert_eq!(out_a.heads, out_b.heads);
        assert_eq!(a.case_heads(&code).unwrap(), b.case_heads(&code).unwrap());
        let merged = a.load_case(&code).unwrap().unwrap();
        assert_eq!(status_of(&merged), "processing");
        assert_eq!(
            a.list(&ListFilter::default()).unwrap()[0]
                .projection
                .procedure,
            "khai sinh"
        );
        assert_eq!(
            b.load_sync_state("peer-a", &code).unwrap().unwrap(),
            b"state2"
        );

        // Merging again changes nothing but still records sync state.
        let seq = b.update_seq().unwrap();
        let again = b.merge_remote("peer-a", &code, &merged, b"state3").unwrap();
        assert!(!again.changed && !again.created);
        assert_eq!(b.update_seq().unwrap(), seq);
        assert_eq!(
            b.load_sync_state("peer-a", &code).unwrap().unwrap(),
            b"state3"
        );
        assert_eq!(b.inventory().unwrap(), a.inventory().unwrap());
    }

    #[test]
    fn rejected_merge_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(&dir);
        let code = create(&mut store, "Thôn 4");
        store.save_sync_state("p", &code, b"old").unwrap();
        let before = store.case_heads(&code).unwrap();
        let seq = store.update_seq().unwrap();

        // A concurrent deletion of the required field makes the merge invalid.
        let mut bad = store.load_case(&code).unwrap().unwrap();
        bad.transact::<_, _, AutomergeError>(|tx| {
            tx.delete(ROOT, "status")?;
            Ok(())
        })
        .unwrap();
        let err = store.merge_remote("p", &code, &bad, b"new");
        assert!(matches!(err, Err(MergeError::Rejected(_))), "{err:?}");
        assert_eq!(store.case_heads(&code).unwrap(), before);
        assert_eq!(store.update_seq().unwrap(), seq);
        assert_eq!(store.load_sync_state("p", &code).unwrap().unwrap(), b"old");

        // A new case without the required field is refused too.
        let mut no_status = Automerge::new();
        put(&mut no_status, "village", "x").unwrap();
        assert!(matches!(
            store.merge_remote("p", "NEW-1", &no_status, b"s"),
            Err(MergeError::Rejected(_))
        ));
        assert!(store.case_heads("NEW-1").unwrap().is_none());
        assert!(store.load_sync_state("p", "NEW-1").unwrap().is_none());
        // So are empty documents and hostile codes.
        assert!(matches!(
            store.merge_remote("p", "NEW-2", &Automerge::new(), b"s"),
            Err(MergeError::Rejected(_))
        ));
        assert!(matches!(
            store.merge_remote("p", "../etc'; DROP", &new_doc("a", "b"), b"s"),
            Err(MergeError::Rejected(_))
        ));
        assert_eq!(store.inventory().unwrap().len(), 1);
    }

    #[test]
    fn reopen_keeps_everything_and_sequences_never_repeat() {
        let dir = tempfile::tempdir().unwrap();
        let (code1, heads1) = {
            let mut store = open(&dir);
            let code = create(&mut store, "Thôn 5");
            store
                .update_case(&code, |d| put(d, "status", "done"))
                .unwrap();
            store.meta_set("role", b"field").unwrap();
            store
                .add_peer("NODE-A", "center", Some("10.0.0.1:4433"), 7)
                .unwrap();
            store.save_sync_state("NODE-A", &code, b"st").unwrap();
            // A failed make does not consume a number.
            assert!(matches!(
                store.create_case(|_| Err::<(String, Automerge), _>("no")),
                Err(CreateError::Make("no"))
            ));
            let heads = store.case_heads(&code).unwrap();
            (code, heads)
        };
        let mut store = open(&dir);
        assert_eq!(store.case_heads(&code1).unwrap(), heads1);
        assert_eq!(
            status_of(&store.load_case(&code1).unwrap().unwrap()),
            "done"
        );
        assert_eq!(store.meta_get("role").unwrap().unwrap(), b"field");
        assert_eq!(store.meta_get("missing").unwrap(), None);
        assert_eq!(store.peers().unwrap().len(), 1);
        assert_eq!(
            store.load_sync_state("NODE-A", &code1).unwrap().unwrap(),
            b"st"
        );
        assert_eq!(store.update_seq().unwrap(), 2);

        let code2 = create(&mut store, "Thôn 5");
        assert_eq!(code1, "K7QF2M-0001");
        assert_eq!(code2, "K7QF2M-0002");
        // A code collision is reported, not overwritten, and the number is not consumed.
        assert!(matches!(
            store.create_case(|_| Ok::<_, AutomergeError>((code2.clone(), new_doc("x", "y")))),
            Err(CreateError::Exists(_))
        ));
        drop(store);
        let mut store = open(&dir);
        assert_eq!(create(&mut store, "Thôn 5"), "K7QF2M-0003");
        assert_eq!(store.changed_since(2).unwrap(), 2);
        assert_eq!(store.changed_since(0).unwrap(), 3);
    }

    #[test]
    fn garbage_file_is_corrupt_not_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let err = Store::open(&path, projector).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
        assert!(err.to_string().contains("corrupt"));

        // Somebody else's SQLite database is refused too.
        let other = dir.path().join("other.db");
        let conn = Connection::open(&other).unwrap();
        conn.execute_batch("CREATE TABLE x (y)").unwrap();
        drop(conn);
        assert!(matches!(
            Store::open(&other, projector),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn schema_from_the_future_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        drop(Store::open(&path, projector).unwrap());
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 9).unwrap();
        drop(conn);
        assert!(matches!(
            Store::open(&path, projector),
            Err(StoreError::TooNew { found: 9, .. })
        ));
    }

    #[test]
    fn corrupted_chunk_is_corrupt_case() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(&dir);
        let code = create(&mut store, "Thôn 6");
        store.update_case(&code, |d| put(d, "status", "a")).unwrap();
        store.update_case(&code, |d| put(d, "status", "b")).unwrap();
        for garbage in [&b"\x85\x6f\x4a\x83garbage"[..], &b""[..], &[0u8; 3][..]] {
            store
                .conn
                .execute(
                    "UPDATE case_changes SET data = ?2 WHERE id = \
                     (SELECT max(id) FROM case_changes WHERE code = ?1)",
                    params![code, garbage],
                )
                .unwrap();
            let err = store.load_case(&code).unwrap_err();
            assert!(matches!(err, StoreError::CorruptCase { .. }), "{err:?}");
            assert!(matches!(
                store.update_case(&code, |_| Ok::<_, AutomergeError>(())),
                Err(UpdateError::Store(StoreError::CorruptCase { .. }))
            ));
        }
        // A damaged snapshot too.
        store
            .conn
            .execute(
                "UPDATE cases SET snapshot = x'00010203' WHERE code = ?1",
                [&code],
            )
            .unwrap();
        assert!(matches!(
            store.load_case(&code),
            Err(StoreError::CorruptCase { .. })
        ));
    }

    #[test]
    fn imported_row_keys_are_written_with_their_cases_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(&dir);
        let keys = [[1u8; 32], [2u8; 32]];
        let codes = store
            .create_cases_batch_keyed(2, Some(&keys), |i, seq| {
                Ok::<_, AutomergeError>((
                    format!("K7QF2M-{seq:04}"),
                    new_doc("received", &format!("Thôn {i}")),
                ))
            })
            .unwrap();
        let unknown = [3u8; 32];
        assert_eq!(
            store.imported_codes(&[keys[1], unknown, keys[0]]).unwrap(),
            [Some(codes[1].clone()), None, Some(codes[0].clone())]
        );
        // A batch refused half-way records no key either.
        let err = store.create_cases_batch_keyed(2, Some(&[[4u8; 32], [5u8; 32]]), |i, seq| {
            if i == 1 {
                return Err("bad row");
            }
            Ok((format!("K7QF2M-{seq:04}"), new_doc("received", "x")))
        });
        assert!(matches!(err, Err(CreateError::Make("bad row"))));
        assert_eq!(
            store.imported_codes(&[[4u8; 32]]).unwrap(),
            [None::<String>]
        );
        // One key per case.
        let err = store.create_cases_batch_keyed(2, Some(&[[6u8; 32]]), |_, seq| {
            Ok::<_, AutomergeError>((format!("K7QF2M-{seq:04}"), new_doc("received", "x")))
        });
        assert!(matches!(
            err,
            Err(CreateError::Store(StoreError::Invalid { .. }))
        ));
    }

    #[test]
    fn batch_create_is_one_all_or_nothing_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(&dir);
        let first = create(&mut store, "Thôn 1");
        let make = |i: usize, seq: u64| {
            Ok::<_, AutomergeError>((
                format!("K7QF2M-{seq:04}"),
                new_doc("received", &format!("Thôn {i}")),
            ))
        };
        let codes = store.create_cases_batch(3, make).unwrap();
        assert_eq!(codes, ["K7QF2M-0002", "K7QF2M-0003", "K7QF2M-0004"]);
        assert_eq!(store.update_seq().unwrap(), 4);
        assert_eq!(store.list(&ListFilter::default()).unwrap().len(), 4);
        assert_eq!(
            store.list(&ListFilter::default()).unwrap()[3]
                .projection
                .village,
            "Thôn 2"
        );

        // The third document is refused by the projector: nothing of the
        // batch is written and no number is consumed.
        let err = store.create_cases_batch(3, |i, seq| {
            let status = if i == 2 { None } else { Some("received") };
            let mut doc = Automerge::new();
            if let Some(s) = status {
                put(&mut doc, "status", s)?;
            } else {
                put(&mut doc, "village", "x")?;
            }
            Ok::<_, AutomergeError>((format!("K7QF2M-{seq:04}"), doc))
        });
        assert!(matches!(err, Err(CreateError::Rejected(_))), "{err:?}");
        // The closure failing half-way writes nothing either.
        let err = store.create_cases_batch(3, |i, seq| {
            if i == 1 {
                return Err("bad row");
            }
            Ok((format!("K7QF2M-{seq:04}"), new_doc("received", "x")))
        });
        assert!(matches!(err, Err(CreateError::Make("bad row"))));
        // A code repeated inside the batch, or already taken, is refused.
        let err = store.create_cases_batch(2, |_, _| {
            Ok::<_, AutomergeError>(("K7QF2M-9999".to_string(), new_doc("received", "x")))
        });
        assert!(matches!(err, Err(CreateError::Exists(_))), "{err:?}");
        let err = store.create_cases_batch(1, |_, _| {
            Ok::<_, AutomergeError>((first.clone(), new_doc("received", "x")))
        });
        assert!(matches!(err, Err(CreateError::Exists(_))), "{err:?}");
        assert_eq!(store.list(&ListFilter::default()).unwrap().len(), 4);
        assert_eq!(store.update_seq().unwrap(), 4);
        assert_eq!(create(&mut store, "Thôn 9"), "K7QF2M-0005");

        // Bounded, and an empty batch is a no-op.
        assert!(matches!(
            store.create_cases_batch(CREATE_BATCH_MAX + 1, make),
            Err(CreateError::Store(StoreError::Invalid { .. }))
        ));
        assert!(store.create_cases_batch(0, make).unwrap().is_empty());

        // Keyset paging walks every code once, in order.
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = store.codes_page(after.as_deref(), 2).unwrap();
            if page.is_empty() {
                break;
            }
            after = page.last().cloned();
            seen.extend(page);
        }
        assert_eq!(
            seen,
            [
                "K7QF2M-0001",
                "K7QF2M-0002",
                "K7QF2M-0003",
                "K7QF2M-0004",
                "K7QF2M-0005"
            ]
        );
    }

    #[test]
    fn peers_add_lookup_and_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(&dir);
        store.add_peer("ID-1", "center", None, 100).unwrap();
        // Same id + same name: only the address is updated.
        store
            .add_peer("ID-1", "center", Some("10.0.0.2:4433"), 200)
            .unwrap();
        let p = store.peer_by_name("center").unwrap().unwrap();
        assert_eq!(p.addr.as_deref(), Some("10.0.0.2:4433"));
        assert_eq!(p.added_at_ms, 100);
        assert!(matches!(
            store.add_peer("ID-2", "center", None, 1),
            Err(StoreError::DuplicatePeerName { .. })
        ));
        assert!(matches!(
            store.add_peer("ID-1", "other", None, 1),
            Err(StoreError::DuplicatePeerId { .. })
        ));
        assert!(!StoreError::UnknownPeer {
            node_id: String::new()
        }
        .is_fault());
        store.add_peer("ID-2", "laptop 2", None, 1).unwrap();
        let names: Vec<_> = store.peers().unwrap().into_iter().map(|p| p.name).collect();
        assert_eq!(names, ["center", "laptop 2"]);

        store.record_sync("ID-2", 555, 9).unwrap();
        let p = store.peer_by_id("ID-2").unwrap().unwrap();
        assert_eq!((p.last_sync_at_ms, p.last_sync_seq), (Some(555), Some(9)));
        assert!(matches!(
            store.record_sync("ID-9", 1, 1),
            Err(StoreError::UnknownPeer { .. })
        ));
        assert!(store.peer_by_id("ID-9").unwrap().is_none());
        assert!(store.remove_peer("ID-2").unwrap());
        assert!(!store.remove_peer("ID-2").unwrap());
    }

    #[test]
    fn list_filters() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(&dir);
        let a = create(&mut store, "Thôn 1");
        let _b = create(&mut store, "Thôn 2");
        store.update_case(&a, |d| put(d, "status", "done")).unwrap();
        let by_village = store
            .list(&ListFilter {
                village: Some("Thôn 2".into()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(by_village.len(), 1);
        let both = store
            .list(&ListFilter {
                village: Some("Thôn 1".into()),
                status: Some("done".into()),
                procedure: None,
            })
            .unwrap();
        assert_eq!(both.len(), 1);
        assert_eq!(both[0].code, a);
        let inv = store.inventory().unwrap();
        assert_eq!(inv.len(), 2);
        assert!(inv[0].0 < inv[1].0);
    }

    #[test]
    fn full_disk_is_reported_and_nothing_is_consumed() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(&dir);
        // Simulate a full disk: forbid the file from growing.
        let pages: i64 = store
            .conn
            .pragma_query_value(None, "page_count", |r| r.get(0))
            .unwrap();
        store
            .conn
            .pragma_update(None, "max_page_count", pages)
            .unwrap();
        // Incompressible text, so the snapshot really is large.
        let mut x: u32 = 1;
        let big: String = (0..256 * 1024)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                char::from(b'a' + ((x >> 16) % 26) as u8)
            })
            .collect();
        let err = store.create_case(|seq| {
            let mut doc = new_doc("received", "Thôn 9");
            put(&mut doc, "notes", &big)?;
            Ok::<_, AutomergeError>((format!("C-{seq}"), doc))
        });
        assert!(
            matches!(err, Err(CreateError::Store(StoreError::DiskFull))),
            "{err:?}"
        );
        store
            .conn
            .pragma_update(None, "max_page_count", 1_000_000)
            .unwrap();
        assert_eq!(create(&mut store, "Thôn 9"), "K7QF2M-0001");
    }

    #[test]
    fn lock_held_too_long_is_busy() {
        let dir = tempfile::tempdir().unwrap();
        let holder = open(&dir);
        let mut waiter = open(&dir);
        waiter.conn.busy_timeout(Duration::from_millis(50)).unwrap();
        holder.conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        let err = waiter.meta_set("k", b"v").unwrap_err();
        assert!(matches!(err, StoreError::Busy { .. }), "{err:?}");
        assert!(err.is_fault());
        holder.conn.execute_batch("ROLLBACK").unwrap();
        waiter.meta_set("k", b"v").unwrap();
    }

    #[test]
    fn two_connections_share_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut cli = open(&dir);
        let mut serve = open(&dir);
        let code = create(&mut cli, "Thôn 7");
        serve
            .update_case(&code, |d| put(d, "status", "seen by serve"))
            .unwrap();
        cli.update_case(&code, |d| put(d, "village", "Thôn 8"))
            .unwrap();
        let doc = serve.load_case(&code).unwrap().unwrap();
        let p = projector(&doc).unwrap();
        assert_eq!(
            (p.status.as_str(), p.village.as_str()),
            ("seen by serve", "Thôn 8")
        );
        assert_eq!(create(&mut serve, "x"), "K7QF2M-0002");
    }

    #[test]
    fn blob_refs_follow_every_write_path() {
        let dir_a = tempfile::tempdir().unwrap();
        let dir_b = tempfile::tempdir().unwrap();
        let mut a = open(&dir_a);
        let mut b = open(&dir_b);
        let (h1, h2, h3) = (hash(1), hash(2), hash(3));

        // create_case
        let c1 = a
            .create_case(|seq| {
                let mut doc = new_doc("received", "Thôn 1");
                add_blobs(&mut doc, &[(&h2, 20), (&h1, 10), (&h2, 20)])?;
                Ok::<_, AutomergeError>((format!("K7QF2M-{seq:04}"), doc))
            })
            .unwrap();
        let c2 = create(&mut a, "Thôn 2");
        let r = |h: &str, size| BlobRef {
            hash: h.to_string(),
            size,
        };
        assert_eq!(a.referenced_blobs().unwrap(), [r(&h1, 10), r(&h2, 20)]);
        assert_eq!(a.blob_referenced(&h2).unwrap(), Some(20));
        assert_eq!(a.blob_referenced(&h3).unwrap(), None);
        assert_eq!(a.cases_referencing(&h1).unwrap(), std::slice::from_ref(&c1));
        assert!(a.cases_referencing(&h3).unwrap().is_empty());

        // update_case: the second case refers to h1 too (deduplicated) and h3.
        a.update_case(&c2, |d| add_blobs(d, &[(&h3, 30), (&h1, 10)]))
            .unwrap();
        assert_eq!(
            a.referenced_blobs().unwrap(),
            [r(&h1, 10), r(&h2, 20), r(&h3, 30)]
        );
        assert_eq!(a.cases_referencing(&h1).unwrap(), [c1.clone(), c2.clone()]);
        let rows = a.list(&ListFilter::default()).unwrap();
        assert_eq!(rows[0].projection.blobs, [r(&h1, 10), r(&h2, 20)]);
        assert_eq!(rows[1].projection.blobs, [r(&h1, 10), r(&h3, 30)]);
        assert_eq!(blob_rows(&a).len(), 4);

        // merge_remote: new case, then a change to it.
        let doc = a.load_case(&c2).unwrap().unwrap();
        b.merge_remote("peer-a", &c2, &doc, b"s").unwrap();
        assert_eq!(b.referenced_blobs().unwrap(), [r(&h1, 10), r(&h3, 30)]);
        let mut doc = a.load_case(&c2).unwrap().unwrap();
        add_blobs(&mut doc, &[(&h2, 20)]).unwrap();
        b.merge_remote("peer-a", &c2, &doc, b"s").unwrap();
        assert_eq!(b.cases_referencing(&h2).unwrap(), std::slice::from_ref(&c2));
        assert_eq!(b.referenced_blobs().unwrap().len(), 3);

        // Rows survive compaction (the snapshot rewrite path).
        for i in 0..=COMPACT_THRESHOLD {
            a.update_case(&c1, |d| put(d, "status", &format!("s{i}")))
                .unwrap();
        }
        assert_eq!(a.cases_referencing(&h2).unwrap(), std::slice::from_ref(&c1));

        // Hostile documents giving one hash different sizes in different
        // cases: both pairs are listed; the smallest is the answer to "is it
        // referenced".
        a.update_case(&c1, |d| add_blobs(d, &[(&h2, 7)]))
            .unwrap_err();
        let c3 = create(&mut a, "Thôn 3");
        a.update_case(&c3, |d| add_blobs(d, &[(&h2, 7)])).unwrap();
        assert_eq!(
            a.referenced_blobs().unwrap(),
            [r(&h1, 10), r(&h2, 7), r(&h2, 20), r(&h3, 30)]
        );
        assert_eq!(a.blob_referenced(&h2).unwrap(), Some(7));
    }

    #[test]
    fn bad_blob_refs_are_refused_and_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(&dir);
        let code = create(&mut store, "Thôn 1");
        let before = store.case_heads(&code).unwrap();
        let h = hash(1);
        let long = format!("{h}0");
        let upper = h.to_uppercase();
        let too_big = format!("{}", u64::MAX);
        let bad: [Vec<(&str, u64)>; 4] = [
            vec![(&h, 1), (&h, 2)],
            vec![("", 1)],
            vec![(&long, 1)],
            vec![(&upper, 1)],
        ];
        for entries in bad {
            let err = store.update_case(&code, |d| add_blobs(d, &entries));
            assert!(
                matches!(err, Err(UpdateError::Rejected(_))),
                "{entries:?}: {err:?}"
            );
            let mut doc = store.load_case(&code).unwrap().unwrap();
            add_blobs(&mut doc, &entries).unwrap();
            assert!(matches!(
                store.merge_remote("p", &code, &doc, b"s"),
                Err(MergeError::Rejected(_))
            ));
        }
        let err = store.update_case(&code, |d| {
            d.transact::<_, _, AutomergeError>(|tx| {
                let l = tx.put_object(ROOT, "blobs", automerge::ObjType::List)?;
                tx.insert(&l, 0, format!("{h}:{too_big}"))?;
                Ok(())
            })
            .map(|_| ())
            .map_err(|f| f.error)
        });
        assert!(matches!(err, Err(UpdateError::Rejected(_))), "{err:?}");
        assert_eq!(store.case_heads(&code).unwrap(), before);
        assert!(store.referenced_blobs().unwrap().is_empty());
        assert!(blob_rows(&store).is_empty());
    }

    /// The version 1 schema exactly as it shipped (`SCHEMA_V1`), filled with
    /// real cases, is upgraded on open: `case_blobs` gets every case's
    /// attachments.
    #[test]
    fn version_1_database_is_migrated_and_backfilled() {
        use crate::case::{self, AttachmentMeta, Author, NewCase};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.db");
        let author = Author {
            actor: automerge::ActorId::from([7u8; 16]),
            node_id: "node-a".into(),
            name: "Laptop A".into(),
        };
        let new = NewCase {
            procedure: "birth-registration".into(),
            applicant: "Nguyễn Thị Mai".into(),
            village: "Thôn 3".into(),
            fields: vec![],
        };
        let t0 = 1_741_572_000_000;
        let mut with_files = case::create("K7QF2M-000001", &new, &author, t0).unwrap();
        let scan = |bytes: &[u8], item: &str| AttachmentMeta {
            hash: blake3::hash(bytes).to_hex().to_string(),
            size: bytes.len() as u64,
            media_type: "image/jpeg".into(),
            name: "scan.jpg".into(),
            item: item.into(),
            note: String::new(),
        };
        case::attach(
            &mut with_files,
            &scan(b"notice", "birth-notice"),
            true,
            &author,
            t0,
        )
        .unwrap();
        case::attach(
            &mut with_files,
            &scan(b"id", "mother-id"),
            false,
            &author,
            t0,
        )
        .unwrap();
        // The same file for a second item is one blob.
        case::attach(
            &mut with_files,
            &scan(b"id", "father-id"),
            false,
            &author,
            t0,
        )
        .unwrap();
        let plain = case::create("K7QF2M-000002", &new, &author, t0).unwrap();
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(SCHEMA_V1).unwrap();
            for (code, doc) in [("K7QF2M-000001", &with_files), ("K7QF2M-000002", &plain)] {
                conn.execute(
                    "INSERT INTO cases (code, snapshot, heads, update_seq, procedure, status, \
                     village, applicant, due_date, updated_at_ms, conflicts) \
                     VALUES (?1, ?2, ?3, 1, 'birth-registration', 'received', 'Thôn 3', \
                     'Nguyễn Thị Mai', '2025-03-12', 0, 0)",
                    params![code, doc.save(), encode_heads(&sorted_heads(doc))],
                )
                .unwrap();
            }
            // A damaged case does not block the upgrade.
            conn.execute(
                "INSERT INTO cases (code, snapshot, heads, update_seq, procedure, status, \
                 village, applicant, due_date, updated_at_ms, conflicts) \
                 VALUES ('K7QF2M-000003', x'00', x'', 1, '', '', '', '', '', 0, 0)",
                [],
            )
            .unwrap();
            let v: i64 = conn
                .pragma_query_value(None, "user_version", |r| r.get(0))
                .unwrap();
            assert_eq!(v, 1);
        }
        let store = Store::open(&path, crate::node::project).unwrap();
        let version: i64 = store
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        // Version 4's record of imported rows is there, empty.
        assert_eq!(
            store.imported_codes(&[[0u8; 32]]).unwrap(),
            [None::<String>]
        );
        let notice = blake3::hash(b"notice").to_hex().to_string();
        let id = blake3::hash(b"id").to_hex().to_string();
        let mut want = vec![
            BlobRef {
                hash: notice.clone(),
                size: 6,
            },
            BlobRef {
                hash: id.clone(),
                size: 2,
            },
        ];
        want.sort();
        assert_eq!(store.referenced_blobs().unwrap(), want);
        assert_eq!(store.cases_referencing(&id).unwrap(), ["K7QF2M-000001"]);
        assert_eq!(store.blob_referenced(&notice).unwrap(), Some(6));
        assert_eq!(blob_rows(&store).len(), 2);
        drop(store);
        // Opening again is a no-op.
        let mut store = Store::open(&path, crate::node::project).unwrap();
        assert_eq!(store.referenced_blobs().unwrap(), want);
        // And later writes keep the table current.
        let mut more = store.load_case("K7QF2M-000002").unwrap().unwrap();
        case::attach(
            &mut more,
            &scan(b"form", "declaration-form"),
            true,
            &author,
            t0,
        )
        .unwrap();
        store
            .merge_remote("peer", "K7QF2M-000002", &more, b"s")
            .unwrap();
        assert_eq!(store.referenced_blobs().unwrap().len(), 3);
    }
}
