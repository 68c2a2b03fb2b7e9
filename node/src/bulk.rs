//! Bulk import and export of cases: CSV with a header row, or JSON Lines.
//!
//! Commune centers start with backlogs kept in spreadsheets or on paper;
//! this is how those rows become cases, and how cases go back out to a
//! spreadsheet (or to another node's import).
//!
//! # Columns
//!
//! The writable columns are exactly what `case new` takes: `procedure`,
//! `applicant`, `village`, and every name `case set` accepts — `birth-date`,
//! `id-number`, `phone`, `assignee`, any procedure's own fields, and
//! `doc:ITEM` for checklist states. A blank cell (or a JSON `null`) means
//! "not set". A procedure field that belongs to another procedure must be
//! blank (the case model refuses it otherwise, naming the valid fields).
//!
//! Export adds the read-only columns [`READ_ONLY_COLUMNS`] (`code`,
//! `status`, `due_date`, `created_at_ms`, `conflicts`, and `updated_at_ms`
//! is accepted too). Import accepts them, so an export file can be imported
//! into another node unchanged, but ignores them and says so once: a new
//! case gets its own code from this node's counter, starts `received`, and
//! its due date is counted from the import. Carrying a status over would
//! forge a history of moves nobody made here; cases that must keep their
//! history travel by sync, not by file.
//!
//! Export carries the fields of a case, not its journal: notes, questions,
//! status history, resolutions and attachments stay out of a spreadsheet.
//! A case with an unresolved conflict exports its current (winning) value
//! and a non-zero `conflicts` count.
//!
//! # Rows and errors
//!
//! Every row is checked by the case model itself ([`case::create`]), so an
//! import refuses exactly what `case new` refuses, with the same reasons.
//! Each invalid row is reported with its line number — the physical line
//! where the row starts, the CSV header being line 1 (a quoted cell may
//! span lines) — and is not imported; the valid rows are. CSV problems of
//! the whole file (unknown, duplicated or missing columns) stop the import
//! before anything is written. JSON Lines has no header: an unknown key
//! makes that line invalid.
//!
//! Importing a file again imports only what is not in yet. No column
//! identifies a case — the same citizen (same ID number) legitimately
//! files several applications, even of the same procedure — so a row is
//! known by its content (procedure, applicant, village and every field,
//! whatever the format or column order) and by how many identical rows
//! came before it in its file: the first copy of a row, the second copy,
//! and so on. Each imported row's key is stored with the case it became,
//! in the same transaction ([`crate::store::Store::create_cases_batch_keyed`]).
//! So after a crash or a full disk halfway, or after fixing the invalid rows
//! of a spreadsheet, the same (or the fixed) file is simply imported again,
//! and each row already in is reported with its case code instead of being
//! created twice. Two identical rows in one file are two applications; an
//! identical row in a later file is taken for one already imported, unless
//! the import is told `again`.
//!
//! # Bounds
//!
//! One row (CSV record or JSON line) is at most [`MAX_ROW_BYTES`]; a longer
//! one is skipped without being held in memory and reported as invalid.
//! At most [`MAX_COLUMNS`] columns. Valid rows are written in transactions
//! of at most [`IMPORT_BATCH_ROWS`] rows (and [`IMPORT_BATCH_BYTES`] of
//! values), each committed before the next is read, so memory does not grow
//! with the file. At most [`MAX_LISTED_INVALID`] invalid rows are listed
//! (all are counted). Export walks the codes page by page and loads one
//! document at a time.
//!
//! # Why our own CSV reader
//!
//! The `csv` crate grows a record's buffer without limit, so a 1 GB line
//! would be read into memory; bounding it means driving `csv-core` by hand,
//! which is no smaller than the RFC 4180 state machine below. Ours also
//! knows the physical line each record starts on, skips an over-long row
//! and carries on, and strips the byte-order mark Excel writes.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::path::Path;

use serde::Serialize;
use thiserror::Error;

use crate::case::{self, procedures, CaseView, NewCase};
use crate::node::{create_error, now_ms, Node, NodeError};
use crate::store::{par_map, RowKey};
use automerge::Automerge;

/// Longest accepted row (CSV record or JSON line), in bytes. A case has
/// fewer than 60 fields of at most 1,000 characters, so real rows are far
/// shorter; the bound keeps a damaged file (a missing closing quote, a
/// binary file) from being read into memory.
pub const MAX_ROW_BYTES: usize = 1024 * 1024;

/// Most columns a CSV header (or cells a row) may have. The export has
/// about 60; spreadsheets add a few empty ones.
pub const MAX_COLUMNS: usize = 256;

/// Most rows written in one transaction. One COMMIT (one fsync) per batch
/// instead of per case is what makes a large import fast; the bound keeps
/// the write lock short for a concurrent `serve` or `case set`.
pub const IMPORT_BATCH_ROWS: usize = 1000;

/// A batch is also written once its values add up to this many bytes, so
/// a file of long rows does not hold 1,000 of them in memory.
pub const IMPORT_BATCH_BYTES: usize = 8 * 1024 * 1024;

/// Most invalid rows listed in an [`ImportReport`] (all are counted). A
/// person fixes the first thousands and runs `--dry-run` again; listing a
/// million broken rows of a wrong file helps nobody and costs memory.
pub const MAX_LISTED_INVALID: usize = 10_000;

/// Longest reason kept for an invalid row, in characters: reasons quote
/// the offending value, which may be up to a row long.
pub const MAX_REASON_CHARS: usize = 300;

/// Most damaged cases listed in an [`ExportReport`] (all are counted).
pub const MAX_LISTED_DAMAGED: usize = 1000;

/// Codes fetched per page while exporting.
const EXPORT_PAGE: usize = 256;

/// Columns an export writes that an import ignores.
pub const READ_ONLY_COLUMNS: [&str; 6] = [
    "code",
    "status",
    "due_date",
    "created_at_ms",
    "updated_at_ms",
    "conflicts",
];

/// The read-only columns an export writes, in order.
const EXPORTED_READ_ONLY: [&str; 5] = ["code", "status", "due_date", "created_at_ms", "conflicts"];

/// Applicant and assignee columns, after `procedure`, in export order.
const COMMON_COLUMNS: [&str; 6] = [
    "applicant",
    "village",
    "birth-date",
    "id-number",
    "phone",
    "assignee",
];

/// Excel writes (and needs, to read Vietnamese as UTF-8) a byte-order mark.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// File format of an import or export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// RFC 4180 CSV, UTF-8, with a header row.
    Csv,
    /// JSON Lines: one JSON object per line.
    Jsonl,
}

impl Format {
    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Jsonl => "jsonl",
        }
    }

    /// The format a file name's extension implies: `.csv`, or `.jsonl` /
    /// `.ndjson`. `None` for anything else (`.json` included: a JSON array
    /// is not JSON Lines).
    pub fn from_path(path: &Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "csv" => Some(Format::Csv),
            "jsonl" | "ndjson" => Some(Format::Jsonl),
            _ => None,
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Format {
    type Err = BulkError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "csv" => Ok(Format::Csv),
            "jsonl" | "ndjson" => Ok(Format::Jsonl),
            _ => Err(BulkError::BadFormat(s.chars().take(40).collect())),
        }
    }
}

/// Why an import or export failed as a whole. Invalid rows are not errors;
/// they are listed in the [`ImportReport`].
#[derive(Debug, Error)]
pub enum BulkError {
    /// `--format` named no known format.
    #[error("unknown format '{0}'; valid formats: csv, jsonl")]
    BadFormat(String),
    /// The CSV header names columns nothing knows; nothing was imported.
    #[error(
        "unknown column(s) {}; nothing was imported. Columns are procedure, applicant, \
         village, birth-date, id-number, phone, assignee, a procedure's own fields \
         and doc:ITEM (see `fieldcase case fields PROCEDURE`), plus the read-only \
         columns of an export",
        quoted(.0)
    )]
    UnknownColumns(Vec<String>),
    /// The CSV header lacks a column every case needs; nothing was imported.
    #[error("missing column(s) {}; nothing was imported", quoted(.0))]
    MissingColumns(Vec<String>),
    /// A CSV column appears twice; which one would win is a guess.
    #[error("column '{0}' appears more than once in the header; nothing was imported")]
    DuplicateColumn(String),
    /// The CSV header row itself is unusable.
    #[error("the header row (line 1) is unusable: {0}; nothing was imported")]
    BadHeader(String),
    /// A CSV file without even a header row.
    #[error("the file is empty; a CSV import needs a header row naming the columns")]
    Empty,
    /// Reading the input failed.
    #[error("cannot read the input: {0}")]
    Read(#[source] io::Error),
    /// Writing the export failed.
    #[error("cannot write the export: {0}")]
    Write(#[source] io::Error),
    /// The import stopped part-way after some batches were committed. The
    /// rows before `line` (that were valid) are imported, the rows from
    /// `line` on are not: import the file again, which skips the first.
    #[error(
        "import stopped at line {line}: {source}. {imported} case(s) from the valid rows \
         before line {line} were imported; rows from line {line} on were not. Import the \
         file again once this is fixed: the rows already imported are skipped"
    )]
    Interrupted {
        /// First line not imported.
        line: u64,
        /// Cases committed before the failure.
        imported: u64,
        /// What went wrong.
        #[source]
        source: Box<BulkError>,
    },
    /// The node (its store) failed.
    #[error(transparent)]
    Node(#[from] NodeError),
}

fn quoted(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A row skipped because it was imported before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AlreadyImported {
    /// Line where the row starts.
    pub line: u64,
    /// The case it became then.
    pub code: String,
}

/// One invalid row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RowError {
    /// Line where the row starts (CSV: the header is line 1).
    pub line: u64,
    /// Why it was refused, one line (at most [`MAX_REASON_CHARS`]).
    pub reason: String,
}

/// What an import did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImportReport {
    /// The format read.
    pub format: Format,
    /// Nothing was written.
    pub dry_run: bool,
    /// Data rows read (not counting the header and blank rows).
    pub rows: u64,
    /// Rows that passed validation.
    pub valid: u64,
    /// Cases created (0 in a dry run).
    pub imported: u64,
    /// Rows refused.
    pub invalid_count: u64,
    /// Valid rows skipped because they were imported before (0 when
    /// imported `again`).
    pub already_imported_count: u64,
    /// The first [`MAX_LISTED_INVALID`] of those, in file order.
    pub already_imported: Vec<AlreadyImported>,
    /// The first [`MAX_LISTED_INVALID`] refused rows, in file order.
    pub invalid: Vec<RowError>,
    /// Read-only columns (or JSON keys) that were present and ignored.
    pub ignored_columns: Vec<String>,
    /// Rows whose cells were all blank, skipped.
    pub blank_rows: u64,
    /// Code of the first case created.
    pub first_code: Option<String>,
    /// Code of the last case created.
    pub last_code: Option<String>,
    /// Transactions committed.
    pub batches: u64,
}

impl ImportReport {
    fn new(format: Format, dry_run: bool) -> ImportReport {
        ImportReport {
            format,
            dry_run,
            rows: 0,
            valid: 0,
            imported: 0,
            invalid_count: 0,
            already_imported_count: 0,
            already_imported: Vec::new(),
            invalid: Vec::new(),
            ignored_columns: Vec::new(),
            blank_rows: 0,
            first_code: None,
            last_code: None,
            batches: 0,
        }
    }

    fn already(&mut self, line: u64, code: String) {
        self.already_imported_count += 1;
        if self.already_imported.len() < MAX_LISTED_INVALID {
            self.already_imported.push(AlreadyImported { line, code });
        }
    }

    fn refuse(&mut self, line: u64, reason: &str) {
        self.invalid_count += 1;
        if self.invalid.len() < MAX_LISTED_INVALID {
            let one_line = reason.replace(['\n', '\r'], " ");
            let mut reason: String = one_line.chars().take(MAX_REASON_CHARS).collect();
            if one_line.chars().count() > MAX_REASON_CHARS {
                reason.push('…');
            }
            self.invalid.push(RowError { line, reason });
        }
    }

    fn ignore(&mut self, column: &str) {
        if !self.ignored_columns.iter().any(|c| c == column) {
            self.ignored_columns.push(column.to_string());
        }
    }
}

/// What an export did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExportReport {
    /// The format written.
    pub format: Format,
    /// Cases written.
    pub exported: u64,
    /// Cases skipped because their stored copy is damaged (they are marked
    /// for repair from a peer at the next sync).
    pub damaged_count: u64,
    /// The first [`MAX_LISTED_DAMAGED`] of them.
    pub damaged: Vec<String>,
}

/// Every writable column, in export order: `procedure`, the applicant
/// fields, `assignee`, every procedure's own fields (first use order), and
/// `doc:ITEM` for every checklist item of any procedure.
pub fn writable_columns() -> Vec<String> {
    let mut out: Vec<String> = std::iter::once("procedure")
        .chain(COMMON_COLUMNS)
        .map(str::to_string)
        .collect();
    for p in procedures() {
        for f in p.fields {
            if !out.iter().any(|c| c == f.id) {
                out.push(f.id.to_string());
            }
        }
    }
    for p in procedures() {
        for i in p.checklist {
            let name = format!("{}{}", case::DOC_PREFIX, i.id);
            if !out.contains(&name) {
                out.push(name);
            }
        }
    }
    out
}

/// Every column an export writes: the read-only ones, then
/// [`writable_columns`].
pub fn export_columns() -> Vec<String> {
    EXPORTED_READ_ONLY
        .iter()
        .map(|c| c.to_string())
        .chain(writable_columns())
        .collect()
}

/// What a header name (or JSON key) means for an import.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Column {
    /// Read from an export; ignored.
    ReadOnly(String),
    /// `procedure`, `applicant`, `village` or a `--set` field.
    Field(String),
    /// An empty header cell: spreadsheets add these. Its cells must be blank.
    Unnamed,
}

/// Header names are compared trimmed and in lower case: spreadsheet users
/// write `Procedure ` as readily as `procedure`.
fn normalize(name: &str) -> String {
    name.trim().to_ascii_lowercase()
}

fn classify(name: &str, writable: &[String]) -> Option<Column> {
    if name.is_empty() {
        Some(Column::Unnamed)
    } else if READ_ONLY_COLUMNS.contains(&name) {
        Some(Column::ReadOnly(name.to_string()))
    } else if writable.iter().any(|c| c == name) {
        Some(Column::Field(name.to_string()))
    } else {
        None
    }
}

/// Builds the `NewCase` of one row from `(column, value)` pairs. Blank
/// values are "not set"; `procedure`, `applicant` and `village` may still
/// be blank here, and [`case::create`] says what is wrong with that.
fn new_case<N: AsRef<str>>(cells: impl IntoIterator<Item = (N, String)>) -> (NewCase, usize) {
    let mut new = NewCase::default();
    let mut bytes = 0;
    for (name, value) in cells {
        bytes += value.len();
        match name.as_ref() {
            "procedure" => new.procedure = value.trim().to_string(),
            "applicant" => new.applicant = value,
            "village" => new.village = value,
            _ if value.trim().is_empty() => {}
            n => new.fields.push((n.to_string(), value)),
        }
    }
    (new, bytes)
}

/// A row as read: its line, and the row or why it could not be read.
type ReadRow = (u64, Result<NewCase, String>);

/// Rows read and waiting to be checked and written together.
struct Pending {
    rows: Vec<ReadRow>,
    /// Bytes of values held.
    bytes: usize,
}

impl Pending {
    fn new() -> Pending {
        Pending {
            rows: Vec::new(),
            bytes: 0,
        }
    }
    fn full(&self) -> bool {
        self.rows.len() >= IMPORT_BATCH_ROWS || self.bytes >= IMPORT_BATCH_BYTES
    }
}

/// A document built ahead of its transaction, with the code it was built
/// for.
type Prebuilt = Option<(String, Automerge)>;

/// The import loop shared by both formats: queue rows, then check a batch
/// of them on every core and write the valid ones in one transaction.
struct Importer<'n> {
    node: &'n mut Node,
    report: ImportReport,
    pending: Pending,
    /// Valid rows seen so far per content digest: the occurrence number
    /// that is part of a row's key.
    seen: HashMap<[u8; 32], u64>,
    /// Import rows even if they were imported before (and record none).
    again: bool,
}

/// A digest of what a row says, the same whatever the format, the order
/// of the columns or the spreadsheet it came from.
fn row_content(new: &NewCase) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"fieldcase import row 1\0");
    let mut fields: Vec<&(String, String)> = new.fields.iter().collect();
    fields.sort();
    let parts = [&new.procedure, &new.applicant, &new.village]
        .into_iter()
        .chain(fields.into_iter().flat_map(|(k, v)| [k, v]));
    for part in parts {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    *h.finalize().as_bytes()
}

/// The key of the `occurrence`-th row (from 0) with this content in a file.
fn row_key(content: &[u8; 32], occurrence: u64) -> RowKey {
    let mut h = blake3::Hasher::new();
    h.update(content);
    h.update(&occurrence.to_le_bytes());
    *h.finalize().as_bytes()
}

impl Importer<'_> {
    /// Queues one row (already counted in `rows`), or the reason it could
    /// not be read, so that reasons are reported in line order.
    fn row(
        &mut self,
        line: u64,
        row: Result<NewCase, String>,
        bytes: usize,
    ) -> Result<(), BulkError> {
        self.pending.rows.push((line, row));
        self.pending.bytes += bytes;
        if self.pending.full() {
            self.flush()?;
        }
        Ok(())
    }

    /// Checks the pending rows by building their documents — the case
    /// model is the one judge of a row — and creates the valid ones.
    ///
    /// A document contains its code, and the code contains the sequence
    /// number the store hands out inside the transaction. To build each
    /// document once, the numbers are predicted from the counter (valid
    /// rows take consecutive numbers); a row whose prediction turns out
    /// wrong (an invalid row before it in the batch, or another process
    /// creating a case meanwhile) is simply built again in the transaction.
    fn flush(&mut self) -> Result<(), BulkError> {
        let batch = std::mem::replace(&mut self.pending, Pending::new());
        if batch.rows.is_empty() {
            return Ok(());
        }
        let first_line = batch.rows[0].0;
        let base = match self.report.dry_run {
            true => 1,
            false => self
                .node
                .store
                .next_case_seq()
                .map_err(|e| self.interrupted(first_line, NodeError::from(e).into()))?,
        };
        let prefix = self.node.node_id().short_prefix();
        let author = self.node.author.clone();
        let now = now_ms();
        let indexed: Vec<(u64, &ReadRow)> = (base..).zip(batch.rows.iter()).collect();
        let built = par_map(&indexed, |(seq, (_, row))| {
            let new = row.as_ref().map_err(String::clone)?;
            if new.procedure.is_empty() {
                let valid: Vec<&str> = procedures().iter().map(|p| p.id).collect();
                return Err(format!(
                    "procedure is blank; valid procedures: {}",
                    valid.join(", ")
                ));
            }
            let code = format!("{prefix}-{seq:06}");
            case::create(&code, new, &author, now)
                .map(|doc| (code, doc))
                .map_err(|e| e.to_string())
        });
        drop(indexed);
        let mut lines = Vec::new();
        let mut cases = Vec::new();
        let mut prebuilt: Vec<Prebuilt> = Vec::new();
        for ((line, row), doc) in batch.rows.into_iter().zip(built) {
            match (row, doc) {
                (Ok(new), Ok(doc)) => {
                    lines.push(line);
                    cases.push(new);
                    prebuilt.push(Some(doc));
                }
                (_, Err(reason)) => self.report.refuse(line, &reason),
                (Err(reason), _) => self.report.refuse(line, &reason),
            }
        }
        self.report.valid += cases.len() as u64;
        if cases.is_empty() {
            return Ok(());
        }
        // Which of them are in already, from an earlier import.
        let keys: Vec<RowKey> = cases
            .iter()
            .map(|new| {
                let content = row_content(new);
                let n = self.seen.entry(content).or_insert(0);
                *n += 1;
                row_key(&content, *n - 1)
            })
            .collect();
        let (mut lines, mut cases, mut prebuilt, mut keys) = (lines, cases, prebuilt, keys);
        if !self.again {
            let found = self
                .node
                .store
                .imported_codes(&keys)
                .map_err(|e| self.interrupted(lines[0], NodeError::from(e).into()))?;
            if found.iter().any(Option::is_some) {
                let rows = lines.into_iter().zip(cases).zip(prebuilt).zip(keys);
                (lines, cases, prebuilt, keys) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
                for ((((line, new), doc), key), code) in rows.zip(found) {
                    match code {
                        Some(code) => self.report.already(line, code),
                        None => {
                            lines.push(line);
                            cases.push(new);
                            prebuilt.push(doc);
                            keys.push(key);
                        }
                    }
                }
            }
        }
        if self.report.dry_run || cases.is_empty() {
            return Ok(());
        }
        let keys = (!self.again).then_some(keys);
        let codes = self
            .node
            .create_prebuilt(&cases, prebuilt, keys.as_deref(), now)
            .map_err(|e| self.interrupted(lines[0], e.into()))?;
        self.report.imported += codes.len() as u64;
        self.report.batches += 1;
        if self.report.first_code.is_none() {
            self.report.first_code = codes.first().cloned();
        }
        self.report.last_code = codes.last().cloned();
        Ok(())
    }

    /// Wraps a failure so that the caller learns what was committed.
    fn interrupted(&self, line: u64, e: BulkError) -> BulkError {
        if self.report.imported == 0 {
            e
        } else {
            BulkError::Interrupted {
                line,
                imported: self.report.imported,
                source: Box::new(e),
            }
        }
    }

    /// A read error: the pending rows are not written, since a file that
    /// cannot be read to the end should not be imported past the last
    /// committed batch.
    fn read_failed(&self, line: u64, e: io::Error) -> BulkError {
        let line = self.pending.rows.first().map_or(line, |r| r.0);
        self.interrupted(line, BulkError::Read(e))
    }
}

impl Node {
    /// Creates cases in one store transaction (see
    /// [`crate::store::Store::create_cases_batch`]): consecutive codes from
    /// the node's counter, all or nothing — one invalid case fails the
    /// batch with its [`NodeError::Case`]. At most
    /// [`crate::store::CREATE_BATCH_MAX`] at once. Returns the codes in
    /// the order of `cases` once the COMMIT has succeeded, and tells
    /// running sync processes (see [`crate::notify`]).
    pub fn create_cases(&mut self, cases: &[NewCase]) -> Result<Vec<String>, NodeError> {
        let prefix = self.node_id().short_prefix();
        let author = self.author.clone();
        let now = now_ms();
        let base = self.store.next_case_seq()?;
        let indexed: Vec<(u64, &NewCase)> = (base..).zip(cases).collect();
        let prebuilt = par_map(&indexed, |(seq, new)| {
            let code = format!("{prefix}-{seq:06}");
            case::create(&code, new, &author, now)
                .ok()
                .map(|doc| (code, doc))
        });
        self.create_prebuilt(cases, prebuilt, None, now)
    }

    /// [`Node::create_cases`] with documents built ahead for predicted
    /// codes; a document whose code is not the one the store hands out is
    /// built again (with the same `now`).
    fn create_prebuilt(
        &mut self,
        cases: &[NewCase],
        mut prebuilt: Vec<Prebuilt>,
        row_keys: Option<&[RowKey]>,
        now: i64,
    ) -> Result<Vec<String>, NodeError> {
        let prefix = self.node_id().short_prefix();
        let author = self.author.clone();
        let codes = self
            .store
            .create_cases_batch_keyed(cases.len(), row_keys, |i, seq| {
                let code = format!("{prefix}-{seq:06}");
                match prebuilt.get_mut(i).and_then(Option::take) {
                    Some((c, doc)) if c == code => Ok((code, doc)),
                    _ => case::create(&code, &cases[i], &author, now).map(|doc| (code, doc)),
                }
            })
            .map_err(create_error)?;
        crate::notify::announce_many(self.home(), &codes);
        Ok(codes)
    }

    /// Imports cases from CSV (with a header row) or JSON Lines; see the
    /// [module docs](crate::bulk) for columns, errors and bounds. Every
    /// row is validated by the case model; invalid rows are listed in the
    /// report (line and reason) and skipped, valid rows are created in
    /// transactions of at most [`IMPORT_BATCH_ROWS`]. With `dry_run`
    /// nothing is written. Rows imported before (by any file) are skipped
    /// and listed with their case codes, unless `again`; see the [module
    /// docs](crate::bulk) for how a row is recognised.
    pub fn import<R: Read>(
        &mut self,
        reader: R,
        format: Format,
        dry_run: bool,
        again: bool,
    ) -> Result<ImportReport, BulkError> {
        let mut imp = Importer {
            node: self,
            report: ImportReport::new(format, dry_run),
            pending: Pending::new(),
            seen: HashMap::new(),
            again,
        };
        let reader = BufReader::with_capacity(64 * 1024, reader);
        match format {
            Format::Csv => import_csv(&mut imp, reader)?,
            Format::Jsonl => import_jsonl(&mut imp, reader)?,
        }
        imp.flush()?;
        Ok(imp.report)
    }

    /// Writes every case, in code order, as CSV (UTF-8 with a byte-order
    /// mark so spreadsheets read Vietnamese correctly, CRLF line ends,
    /// header row of [`export_columns`]) or JSON Lines (one object per
    /// case, blank values left out). Documents are loaded one at a time.
    /// A case whose stored copy is damaged is skipped, marked for repair,
    /// and counted in the report.
    pub fn export<W: Write>(&self, writer: W, format: Format) -> Result<ExportReport, BulkError> {
        let mut out = BufWriter::with_capacity(64 * 1024, writer);
        let columns = export_columns();
        let w = BulkError::Write;
        if format == Format::Csv {
            out.write_all(BOM).map_err(w)?;
            write_csv_record(&mut out, columns.iter().map(String::as_str)).map_err(w)?;
        }
        let mut report = ExportReport {
            format,
            exported: 0,
            damaged_count: 0,
            damaged: Vec::new(),
        };
        let mut after: Option<String> = None;
        loop {
            let page = self
                .store
                .codes_page(after.as_deref(), EXPORT_PAGE)
                .map_err(NodeError::from)?;
            let Some(last) = page.last().cloned() else {
                break;
            };
            // Loading needs the database connection (one thread); turning
            // a document into its row is most of the work and runs on
            // every core. A page of documents is the most held at once.
            let mut docs = Vec::with_capacity(page.len());
            for code in page {
                match self.load_checked(&code) {
                    Ok(Some(doc)) => docs.push(doc),
                    // Gone meanwhile (there is no delete today): nothing to write.
                    Ok(None) => {}
                    Err(NodeError::Damaged { code, .. }) => {
                        report.damaged_count += 1;
                        if report.damaged.len() < MAX_LISTED_DAMAGED {
                            report.damaged.push(code);
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            let rows = par_map(&docs, |doc| {
                case::view(doc).map(|v| columns.iter().map(|c| cell(&v, c)).collect::<Vec<_>>())
            });
            drop(docs);
            for values in rows {
                let values = values.map_err(NodeError::from)?;
                match format {
                    Format::Csv => {
                        write_csv_record(&mut out, values.iter().map(String::as_str)).map_err(w)?
                    }
                    Format::Jsonl => write_json_line(&mut out, &columns, &values).map_err(w)?,
                }
                report.exported += 1;
            }
            after = Some(last);
        }
        out.flush().map_err(w)?;
        Ok(report)
    }
}

/// The value of one export column for a case ("" when not set).
fn cell(v: &CaseView, column: &str) -> String {
    match column {
        "code" => v.code.clone(),
        "status" => v.status.as_str().to_string(),
        "due_date" => v.due_date.clone(),
        "created_at_ms" => v.created_at_ms.to_string(),
        "conflicts" => v.conflicts.len().to_string(),
        "procedure" => v.procedure.clone(),
        "applicant" => v.applicant.name.clone(),
        "village" => v.applicant.village.clone(),
        "birth-date" => v.applicant.birth_date.clone(),
        "id-number" => v.applicant.id_number.clone(),
        "phone" => v.applicant.phone.clone(),
        "assignee" => v.assignee.clone(),
        other => match other.strip_prefix(case::DOC_PREFIX) {
            Some(item) => v
                .checklist
                .iter()
                .find(|e| e.item == item)
                .map(|e| e.state.as_str().to_string())
                .unwrap_or_default(),
            None => v.fields.get(other).cloned().unwrap_or_default(),
        },
    }
}

/// Writes one CSV record, quoting cells that contain a comma, a quote or a
/// line break (RFC 4180), ending in CRLF.
fn write_csv_record<'a>(
    out: &mut impl Write,
    cells: impl Iterator<Item = &'a str>,
) -> io::Result<()> {
    for (i, c) in cells.enumerate() {
        if i > 0 {
            out.write_all(b",")?;
        }
        if c.contains([',', '"', '\r', '\n']) {
            out.write_all(b"\"")?;
            out.write_all(c.replace('"', "\"\"").as_bytes())?;
            out.write_all(b"\"")?;
        } else {
            out.write_all(c.as_bytes())?;
        }
    }
    out.write_all(b"\r\n")
}

/// Writes one JSON object with the non-blank values, in column order.
fn write_json_line(out: &mut impl Write, columns: &[String], values: &[String]) -> io::Result<()> {
    out.write_all(b"{")?;
    let mut first = true;
    for (c, v) in columns.iter().zip(values) {
        if v.is_empty() {
            continue;
        }
        if !first {
            out.write_all(b",")?;
        }
        first = false;
        serde_json::to_writer(&mut *out, c)?;
        out.write_all(b":")?;
        // Counts and times are numbers in JSON; everything else is text
        // (an ID number's leading zeros must survive).
        if matches!(c.as_str(), "created_at_ms" | "conflicts") && v.parse::<i64>().is_ok() {
            out.write_all(v.as_bytes())?;
        } else {
            serde_json::to_writer(&mut *out, v)?;
        }
    }
    out.write_all(b"}\n")
}

fn import_csv<R: BufRead>(imp: &mut Importer<'_>, reader: R) -> Result<(), BulkError> {
    let mut csv = CsvReader::new(reader);
    let header = match csv.next_record().map_err(BulkError::Read)? {
        None => return Err(BulkError::Empty),
        Some(r) => r.cells.map_err(BulkError::BadHeader)?,
    };
    let writable = writable_columns();
    let mut columns = Vec::with_capacity(header.len());
    let mut unknown = Vec::new();
    for raw in &header {
        let name = normalize(raw);
        match classify(&name, &writable) {
            Some(col) => {
                if let Column::Field(n) | Column::ReadOnly(n) = &col {
                    if columns.contains(&col) {
                        return Err(BulkError::DuplicateColumn(n.clone()));
                    }
                }
                columns.push(col);
            }
            None => {
                unknown.push(raw.trim().chars().take(60).collect());
                columns.push(Column::Unnamed);
            }
        }
    }
    if !unknown.is_empty() {
        return Err(BulkError::UnknownColumns(unknown));
    }
    let missing: Vec<String> = ["procedure", "applicant", "village"]
        .iter()
        .filter(|m| !columns.contains(&Column::Field(m.to_string())))
        .map(|m| m.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(BulkError::MissingColumns(missing));
    }
    for c in &columns {
        if let Column::ReadOnly(n) = c {
            imp.report.ignore(n);
        }
    }
    while let Some(rec) = csv
        .next_record()
        .map_err(|e| imp.read_failed(csv.line, e))?
    {
        let cells = match rec.cells {
            Ok(cells) => cells,
            Err(reason) => {
                imp.report.rows += 1;
                imp.row(rec.line, Err(reason), 0)?;
                continue;
            }
        };
        if cells.iter().all(|c| c.trim().is_empty()) {
            imp.report.blank_rows += 1;
            continue;
        }
        imp.report.rows += 1;
        // Fewer cells than columns: the missing trailing ones are blank
        // (some tools drop trailing empty cells). More: data would be lost.
        if cells.len() > columns.len()
            && cells[columns.len()..].iter().any(|c| !c.trim().is_empty())
        {
            imp.report.refuse(
                rec.line,
                &format!(
                    "the row has {} cells but the header names {} columns",
                    cells.len(),
                    columns.len()
                ),
            );
            continue;
        }
        if let Some(i) = columns
            .iter()
            .zip(&cells)
            .position(|(col, v)| *col == Column::Unnamed && !v.trim().is_empty())
        {
            let reason = format!("cell {} has a value but its column has no name", i + 1);
            imp.row(rec.line, Err(reason), 0)?;
            continue;
        }
        let (new, bytes) = new_case(columns.iter().zip(cells).filter_map(|(col, v)| match col {
            Column::Field(n) => Some((n, v)),
            _ => None,
        }));
        imp.row(rec.line, Ok(new), bytes)?;
    }
    Ok(())
}

fn import_jsonl<R: BufRead>(imp: &mut Importer<'_>, reader: R) -> Result<(), BulkError> {
    let writable = writable_columns();
    let mut lines = LineReader::new(reader);
    while let Some((line, text)) = lines
        .next_line()
        .map_err(|e| imp.read_failed(lines.line, e))?
    {
        if matches!(&text, Ok(t) if t.trim().is_empty()) {
            imp.report.blank_rows += 1;
            continue;
        }
        imp.report.rows += 1;
        let (row, bytes) = match text.and_then(|t| json_row(&t, &writable, &mut imp.report)) {
            Ok((new, bytes)) => (Ok(new), bytes),
            Err(reason) => (Err(reason), 0),
        };
        imp.row(line, row, bytes)?;
    }
    Ok(())
}

/// One JSON Lines row: an object of field names to text (numbers are
/// taken as their text, `null` as blank). Read-only keys are noted in the
/// report and ignored; an unknown key makes the row invalid (there is no
/// header to refuse up front).
fn json_row(
    text: &str,
    writable: &[String],
    report: &mut ImportReport,
) -> Result<(NewCase, usize), String> {
    let obj = match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(m)) => m,
        Ok(_) => return Err("the line is not a JSON object ({\"field\": \"value\", ...})".into()),
        Err(e) => return Err(format!("not valid JSON: {e}")),
    };
    if obj.len() > MAX_COLUMNS {
        return Err(format!("more than {MAX_COLUMNS} fields"));
    }
    let mut cells: Vec<(String, String)> = Vec::with_capacity(obj.len());
    let mut unknown = Vec::new();
    for (key, value) in obj {
        let name = normalize(&key);
        let value = match value {
            serde_json::Value::String(s) => s,
            serde_json::Value::Null => String::new(),
            serde_json::Value::Number(n) => n.to_string(),
            _ => {
                return Err(format!(
                    "the value of '{name}' must be text, a number or null"
                ))
            }
        };
        match classify(&name, writable) {
            Some(Column::Field(n)) => cells.push((n, value)),
            Some(Column::ReadOnly(n)) => report.ignore(&n),
            Some(Column::Unnamed) if value.trim().is_empty() => {}
            _ => unknown.push(key.chars().take(60).collect::<String>()),
        }
    }
    if !unknown.is_empty() {
        return Err(format!(
            "unknown field(s) {}; see `fieldcase case fields PROCEDURE`",
            quoted(&unknown)
        ));
    }
    Ok(new_case(cells))
}

/// One CSV record: the line it starts on, and its cells or why it is
/// unusable.
struct Record {
    line: u64,
    cells: Result<Vec<String>, String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum CsvState {
    /// At the start of a cell.
    CellStart,
    /// Inside a cell that did not start with a quote.
    Unquoted,
    /// Inside a quoted cell.
    Quoted,
    /// Just after a quote inside a quoted cell: either an escaped quote
    /// (`""`) or the end of the cell.
    QuoteInQuoted,
}

/// An RFC 4180 reader over a byte stream, with bounded records. Accepts
/// CRLF, LF or CR line ends, a leading byte-order mark, and (leniently) a
/// quote inside an unquoted cell as a literal character.
struct CsvReader<R> {
    r: R,
    /// The physical line the next byte is on (1-based).
    line: u64,
    started: bool,
    /// The last record ended with CR: a following LF belongs to it.
    skip_lf: bool,
}

impl<R: BufRead> CsvReader<R> {
    fn new(r: R) -> Self {
        CsvReader {
            r,
            line: 1,
            started: false,
            skip_lf: false,
        }
    }

    fn fill(&mut self) -> io::Result<&[u8]> {
        loop {
            match self.r.fill_buf() {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        // Asked again (a no-op on a filled buffer) because returning the
        // first borrow from inside the loop is refused by the borrow checker.
        self.r.fill_buf()
    }

    /// The next record, or `None` at the end of the input. A record over
    /// [`MAX_ROW_BYTES`] or [`MAX_COLUMNS`] is read to its end without
    /// being kept and returned as unusable.
    fn next_record(&mut self) -> io::Result<Option<Record>> {
        if !self.started {
            self.started = true;
            if self.fill()?.starts_with(BOM) {
                self.r.consume(BOM.len());
            }
        }
        let start = self.line;
        let mut cells: Vec<Vec<u8>> = Vec::new();
        let mut cell: Vec<u8> = Vec::new();
        let mut state = CsvState::CellStart;
        let mut size = 0usize;
        let mut problem: Option<String> = None;
        let mut any = false;
        loop {
            let mut line = self.line;
            let mut skip_lf = self.skip_lf;
            let buf = self.fill()?;
            if buf.is_empty() {
                if !any {
                    return Ok(None);
                }
                if state == CsvState::Quoted {
                    problem.get_or_insert_with(|| {
                        "a quoted cell is never closed (a '\"' is missing)".to_string()
                    });
                }
                break;
            }
            let mut used = 0;
            let mut ended = false;
            for &b in buf {
                used += 1;
                if skip_lf {
                    skip_lf = false;
                    if b == b'\n' {
                        continue;
                    }
                }
                any = true;
                size += 1;
                let keep = problem.is_none();
                // What this byte does: append it, end the cell, end the record.
                let mut end_cell = false;
                match (state, b) {
                    (CsvState::Quoted, b'"') => state = CsvState::QuoteInQuoted,
                    (CsvState::Quoted, _) => {
                        if b == b'\n' {
                            line += 1;
                        }
                        if keep {
                            cell.push(b);
                        }
                    }
                    (CsvState::CellStart, b'"') => state = CsvState::Quoted,
                    (CsvState::QuoteInQuoted, b'"') => {
                        if keep {
                            cell.push(b'"');
                        }
                        state = CsvState::Quoted;
                    }
                    (_, b',') => {
                        end_cell = true;
                        state = CsvState::CellStart;
                    }
                    (_, b'\n') | (_, b'\r') => {
                        line += 1;
                        skip_lf = b == b'\r';
                        ended = true;
                    }
                    (CsvState::QuoteInQuoted, _) => {
                        problem.get_or_insert_with(|| {
                            "text follows a closing quote inside a cell (write a quote \
                             inside a quoted cell as \"\")"
                                .to_string()
                        });
                        state = CsvState::Unquoted;
                    }
                    (_, _) => {
                        if keep {
                            cell.push(b);
                        }
                        state = CsvState::Unquoted;
                    }
                }
                if end_cell || ended {
                    if problem.is_none() {
                        if cells.len() >= MAX_COLUMNS {
                            problem = Some(format!("the row has more than {MAX_COLUMNS} cells"));
                        } else {
                            cells.push(std::mem::take(&mut cell));
                        }
                    }
                    cell.clear();
                }
                if size > MAX_ROW_BYTES && problem.is_none() {
                    problem = Some(format!(
                        "the row is longer than {} KiB (is a closing quote missing?)",
                        MAX_ROW_BYTES / 1024
                    ));
                    cells = Vec::new();
                    cell = Vec::new();
                }
                if ended {
                    break;
                }
            }
            self.r.consume(used);
            self.line = line;
            self.skip_lf = skip_lf;
            if ended {
                return Ok(Some(finish(start, cells, problem)));
            }
        }
        // End of input inside a record.
        if problem.is_none() {
            if cells.len() >= MAX_COLUMNS {
                problem = Some(format!("the row has more than {MAX_COLUMNS} cells"));
            } else {
                cells.push(cell);
            }
        }
        Ok(Some(finish(start, cells, problem)))
    }
}

fn finish(line: u64, cells: Vec<Vec<u8>>, problem: Option<String>) -> Record {
    let cells = match problem {
        Some(p) => Err(p),
        None => cells
            .into_iter()
            .map(|c| String::from_utf8(c).map_err(|_| not_utf8()))
            .collect(),
    };
    Record { line, cells }
}

fn not_utf8() -> String {
    "the text is not UTF-8; save the spreadsheet as \"CSV UTF-8\"".to_string()
}

/// Reads lines of at most [`MAX_ROW_BYTES`], skipping (not storing) the
/// rest of a longer one.
struct LineReader<R> {
    r: R,
    /// Number of the next line (1-based).
    line: u64,
    started: bool,
}

impl<R: BufRead> LineReader<R> {
    fn new(r: R) -> Self {
        LineReader {
            r,
            line: 1,
            started: false,
        }
    }

    /// The next line (without its line end) with its number, or `None` at
    /// the end of the input.
    #[allow(clippy::type_complexity)]
    fn next_line(&mut self) -> io::Result<Option<(u64, Result<String, String>)>> {
        let mut buf = Vec::new();
        let mut too_long = false;
        let mut any = false;
        loop {
            let chunk = loop {
                match self.r.fill_buf() {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    other => break other?,
                }
            };
            let mut chunk: &[u8] = chunk;
            let mut skip = 0;
            if !self.started {
                self.started = true;
                if chunk.starts_with(BOM) {
                    chunk = &chunk[BOM.len()..];
                    skip = BOM.len();
                }
            }
            if chunk.is_empty() && skip == 0 {
                if !any {
                    return Ok(None);
                }
                break;
            }
            any = true;
            let (part, found) = match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => (&chunk[..i], true),
                None => (chunk, false),
            };
            if !too_long {
                if buf.len() + part.len() > MAX_ROW_BYTES {
                    too_long = true;
                    buf = Vec::new();
                } else {
                    buf.extend_from_slice(part);
                }
            }
            let used = skip + part.len() + usize::from(found);
            self.r.consume(used);
            if found {
                break;
            }
        }
        let n = self.line;
        self.line += 1;
        if too_long {
            return Ok(Some((
                n,
                Err(format!(
                    "the line is longer than {} KiB",
                    MAX_ROW_BYTES / 1024
                )),
            )));
        }
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        Ok(Some((n, String::from_utf8(buf).map_err(|_| not_utf8()))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn records(input: &[u8]) -> Vec<(u64, Result<Vec<String>, String>)> {
        let mut r = CsvReader::new(input);
        let mut out = Vec::new();
        while let Some(rec) = r.next_record().unwrap() {
            out.push((rec.line, rec.cells));
        }
        out
    }

    fn ok(line: u64, cells: &[&str]) -> (u64, Result<Vec<String>, String>) {
        (line, Ok(cells.iter().map(|c| c.to_string()).collect()))
    }

    #[test]
    fn csv_rfc4180_quotes_commas_newlines_and_line_numbers() {
        let input = "\u{feff}a,b,c\r\n1,\"x, y\",\"say \"\"hi\"\"\"\r\n\"two\nlines\",,\n\n4,5,6";
        assert_eq!(
            records(input.as_bytes()),
            [
                ok(1, &["a", "b", "c"]),
                ok(2, &["1", "x, y", "say \"hi\""]),
                ok(3, &["two\nlines", "", ""]),
                ok(5, &[""]),
                ok(6, &["4", "5", "6"]),
            ]
        );
        // Lone CR line ends, a trailing line end, an empty quoted cell.
        assert_eq!(
            records(b"a,b\r1,\"\"\r"),
            [ok(1, &["a", "b"]), ok(2, &["1", ""])]
        );
        assert!(records(b"").is_empty());
    }

    #[test]
    fn csv_problems_are_per_record_and_reading_goes_on() {
        let got = records(b"a,\"b\"x,c\nok,1\n\xff\xfe,2\n\"never closed\nmore");
        assert_eq!(got[0].0, 1);
        assert!(got[0].1.as_ref().unwrap_err().contains("closing quote"));
        assert_eq!(got[1], ok(2, &["ok", "1"]));
        assert!(got[2].1.as_ref().unwrap_err().contains("UTF-8"));
        assert_eq!(got[3].0, 4);
        assert!(got[3].1.as_ref().unwrap_err().contains("never closed"));
        assert_eq!(got.len(), 4);
    }

    #[test]
    fn csv_long_rows_are_skipped_not_stored() {
        let mut input = b"h\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', MAX_ROW_BYTES + 10));
        input.extend(b"\nafter\n");
        let got = records(&input);
        assert!(got[1].1.as_ref().unwrap_err().contains("longer than"));
        assert_eq!(got[2], ok(3, &["after"]));
        let wide = vec![b','; MAX_COLUMNS + 5];
        let got = records(&wide);
        assert!(got[0].1.as_ref().unwrap_err().contains("cells"));
    }

    #[test]
    fn jsonl_lines_are_bounded() {
        let mut input = "\u{feff}{\"a\":1}\r\n\n".as_bytes().to_vec();
        input.extend(std::iter::repeat_n(b' ', MAX_ROW_BYTES + 1));
        input.extend(b"\n{\"b\":2}");
        let mut r = LineReader::new(&input[..]);
        let mut got = Vec::new();
        while let Some(l) = r.next_line().unwrap() {
            got.push(l);
        }
        assert_eq!(got[0], (1, Ok("{\"a\":1}".to_string())));
        assert_eq!(got[1], (2, Ok(String::new())));
        assert!(got[2].1.as_ref().unwrap_err().contains("longer than"));
        assert_eq!(got[3], (4, Ok("{\"b\":2}".to_string())));
        assert_eq!(got.len(), 4);
    }

    #[test]
    fn csv_writer_quotes_what_needs_quoting() {
        let mut out = Vec::new();
        write_csv_record(&mut out, ["a", "b,c", "d\"e", "f\ng", ""].into_iter()).unwrap();
        assert_eq!(out, b"a,\"b,c\",\"d\"\"e\",\"f\ng\",\r\n");
        assert_eq!(records(&out), [ok(1, &["a", "b,c", "d\"e", "f\ng", ""])]);
    }

    #[test]
    fn columns_cover_every_procedure_once() {
        let cols = export_columns();
        let set: BTreeSet<&String> = cols.iter().collect();
        assert_eq!(set.len(), cols.len(), "duplicate column");
        for p in procedures() {
            for name in case::field_names(p) {
                if name != "applicant" {
                    assert!(cols.contains(&name), "{name}");
                }
            }
        }
        assert!(cols.len() < MAX_COLUMNS);
        assert_eq!(Format::from_path(Path::new("x.CSV")), Some(Format::Csv));
        assert_eq!(
            Format::from_path(Path::new("x.ndjson")),
            Some(Format::Jsonl)
        );
        assert_eq!(Format::from_path(Path::new("x.json")), None);
    }
}
