//! The case model: one citizen application ("case") as an Automerge document.
//!
//! Field laptops take applications offline in villages; the commune center
//! processes them; replicas exchange Automerge changes. This module defines
//! what a case document contains, the procedures it can belong to, the rules
//! for editing it, and how to read it back (including conflicts that offline
//! edits produce).
//!
//! What this module must never do:
//! - touch storage or the network — callers load/save/sync the bytes;
//! - panic on a document that came from a peer — anything that does not have
//!   the expected shape is reported as [`CaseError::Malformed`];
//! - store the status as a scalar — it is derived from the append-only
//!   `status_events` list (see [`status::fold`]) so concurrent moves cannot be
//!   lost and every replica agrees;
//! - overwrite append-only lists (notes, questions, answers, status events,
//!   resolutions, attachments) — they are only ever appended to with explicit
//!   list inserts, so concurrent appends from several laptops are all kept.
//!
//! Every mutation sets the document's actor to the writing node's actor and
//! stamps the change with `now_ms` (Unix **milliseconds**, even though
//! Automerge's `CommitOptions::with_time` documents seconds — the value is
//! advisory and only this module reads it), because conflict reports show
//! who wrote which value and when.

pub mod date;
mod doc;
mod procedures;
mod status;
mod view;

#[cfg(test)]
mod tests;

use automerge::transaction::{CommitOptions, Transactable, Transaction};
use automerge::{ActorId, Automerge, ObjId, ObjType, ReadDoc, Value, ROOT};
use std::collections::BTreeMap;

pub use doc::SCHEMA;
pub use procedures::{procedure, procedures, FieldDef, FieldKind, ItemDef, ProcedureDef};
pub use status::{fold, DocState, Status};
pub use view::{
    projection, validate, validate_code, view, Answer, ApplicantView, Attachment, CaseView,
    ChecklistEntry, Conflict, ConflictCandidate, HistoryEntry, Member, Note, Projection, Question,
    Resolution,
};

use doc::{
    child_obj, list_elem_map, AnswerRec, ApplicantRec, AttachmentRec, CandidateRec, CaseDoc,
    MemberRec, NoteRec, QuestionRec, ResolutionRec, StatusEventRec,
};

/// Longest value accepted for a single field (characters).
pub const MAX_FIELD_CHARS: usize = 1000;
/// Longest note, question or answer accepted (characters).
pub const MAX_TEXT_CHARS: usize = 4000;
/// Longest node id / node name accepted for an author (characters).
pub const MAX_AUTHOR_CHARS: usize = 200;
/// Longest case code accepted (characters).
pub const MAX_CODE_CHARS: usize = 64;
/// Longest attachment file name accepted (characters).
pub const MAX_ATTACHMENT_NAME_CHARS: usize = 255;
/// Longest attachment media type accepted (characters).
pub const MAX_MEDIA_TYPE_CHARS: usize = 255;
/// Largest attachment size a case document may record (bytes): 4 GiB, the
/// hard ceiling of the per-node `blob-max-mb` setting. This is a sanity
/// bound on documents, not a policy: a larger recorded size makes the whole
/// case malformed, so it must never be below what any node may be
/// configured to accept. Each node's own, smaller limit is applied when it
/// imports or fetches bytes.
pub const MAX_ATTACHMENT_BYTES: u64 = 4096 * 1024 * 1024;
/// Length of an attachment hash: BLAKE3, 32 bytes as lowercase hex.
pub const ATTACHMENT_HASH_CHARS: usize = 64;

/// Errors from the case model. Messages are single lines meant for officers.
#[derive(Debug, thiserror::Error)]
pub enum CaseError {
    /// The procedure id is not one the center handles.
    #[error("unknown procedure '{given}'; valid procedures: {}", .valid.join(", "))]
    UnknownProcedure { given: String, valid: Vec<String> },
    /// The field name is not an applicant field, `assignee`, or a field of this case's procedure.
    #[error("unknown field '{field}' for this case; valid fields: {}", .valid.join(", "))]
    UnknownField { field: String, valid: Vec<String> },
    /// The checklist item is not on this case's procedure checklist.
    #[error("unknown document '{item}' for this case; valid documents: {}", .valid.join(", "))]
    UnknownItem { item: String, valid: Vec<String> },
    /// The value cannot be stored in that field (bad date, too long, ...).
    #[error("invalid {field}: {reason}")]
    InvalidValue { field: String, reason: String },
    /// The status move is not allowed right now; `reason` says why.
    #[error("cannot move the case from {from} to {to}: {reason}")]
    InvalidTransition {
        from: Status,
        to: Status,
        reason: String,
    },
    /// There is no question with that number.
    #[error("no question number {no}; this case has {count} question(s)")]
    NoSuchQuestion { no: usize, count: usize },
    /// `resolve` was called on a field whose replicas agree.
    #[error("field '{field}' has no conflict to resolve")]
    NoConflict { field: String },
    /// The document is a well-formed case, but for a different case code.
    #[error("document is case {found}, expected case {expected}")]
    CodeMismatch { expected: String, found: String },
    /// The document does not have the shape of a case (e.g. garbage from a peer).
    #[error("malformed case document: {0}")]
    Malformed(String),
    /// Automerge refused an operation.
    #[error("automerge error: {0}")]
    Automerge(#[from] automerge::AutomergeError),
}

/// Who is writing: the node's Automerge actor plus the human-facing node id
/// and officer/laptop name shown in conflicts and history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Author {
    /// Actor used for this node's changes. One actor per node is safe because
    /// the caller serializes all of a node's writes.
    pub actor: ActorId,
    /// Stable node id (e.g. the node's key fingerprint).
    pub node_id: String,
    /// Display name, e.g. "Laptop Thôn 3 (Lan)".
    pub name: String,
}

/// Input for [`create`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewCase {
    /// Procedure id, see [`procedures`].
    pub procedure: String,
    /// Applicant's full name.
    pub applicant: String,
    /// Applicant's village (thôn/ấp), used for routing and lists.
    pub village: String,
    /// Extra `(field, value)` pairs, with the same names [`set_field`] accepts:
    /// `birth-date`, `id-number`, `phone`, `assignee`, and procedure field ids.
    pub fields: Vec<(String, String)>,
}

/// Input for [`attach`]: a file already put in the node's blob store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttachmentMeta {
    /// BLAKE3 hash of the bytes, 64 hex characters (upper case is accepted
    /// and stored lower case).
    pub hash: String,
    /// Length of the file in bytes, 1 to [`MAX_ATTACHMENT_BYTES`].
    pub size: u64,
    /// Media type like `image/jpeg` or `application/pdf` (stored lower case,
    /// without parameters).
    pub media_type: String,
    /// Original file name; directories are stripped (see [`sanitize_file_name`]).
    pub name: String,
    /// Checklist item the file supports, e.g. `birth-notice`.
    pub item: String,
    /// Optional note, up to [`MAX_TEXT_CHARS`]; empty for none.
    pub note: String,
}

/// Applicant fields: CLI name -> key in the `applicant` map.
const APPLICANT_FIELDS: [(&str, &str); 5] = [
    ("applicant", "name"),
    ("birth-date", "birth_date"),
    ("id-number", "id_number"),
    ("phone", "phone"),
    ("village", "village"),
];

/// Prefix of checklist items when addressed as a field (`doc:birth-notice`).
pub const DOC_PREFIX: &str = "doc:";

/// A writable scalar of a case, resolved from its CLI name.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Target {
    /// (CLI name, key in the applicant map)
    Applicant(&'static str, &'static str),
    Assignee,
    Field(&'static FieldDef),
    Doc(&'static ItemDef),
}

impl Target {
    /// The name used on the CLI and in conflict reports.
    pub(crate) fn name(&self) -> String {
        match self {
            Target::Applicant(cli, _) => (*cli).to_string(),
            Target::Assignee => "assignee".to_string(),
            Target::Field(f) => f.id.to_string(),
            Target::Doc(i) => format!("{DOC_PREFIX}{}", i.id),
        }
    }
}

/// All field names valid for a procedure, in display order.
pub fn field_names(proc: &'static ProcedureDef) -> Vec<String> {
    all_targets(proc).iter().map(Target::name).collect()
}

pub(crate) fn all_targets(proc: &'static ProcedureDef) -> Vec<Target> {
    let mut v: Vec<Target> = APPLICANT_FIELDS
        .iter()
        .map(|(cli, key)| Target::Applicant(cli, key))
        .collect();
    v.push(Target::Assignee);
    v.extend(proc.fields.iter().map(Target::Field));
    v.extend(proc.checklist.iter().map(Target::Doc));
    v
}

pub(crate) fn target(proc: &'static ProcedureDef, name: &str) -> Result<Target, CaseError> {
    if let Some(item) = name.strip_prefix(DOC_PREFIX) {
        return proc
            .item(item)
            .map(Target::Doc)
            .ok_or_else(|| unknown_item(proc, item));
    }
    if name == "assignee" {
        return Ok(Target::Assignee);
    }
    if let Some((cli, key)) = APPLICANT_FIELDS.iter().find(|(cli, _)| *cli == name) {
        return Ok(Target::Applicant(cli, key));
    }
    proc.field(name)
        .map(Target::Field)
        .ok_or_else(|| CaseError::UnknownField {
            field: name.to_string(),
            valid: field_names(proc),
        })
}

fn unknown_item(proc: &ProcedureDef, item: &str) -> CaseError {
    CaseError::UnknownItem {
        item: item.to_string(),
        valid: proc.checklist.iter().map(|i| i.id.to_string()).collect(),
    }
}

fn invalid(field: &str, reason: impl Into<String>) -> CaseError {
    CaseError::InvalidValue {
        field: field.to_string(),
        reason: reason.into(),
    }
}

/// Check and normalize (trim) a value for `t`. `now_ms` bounds birth dates.
pub(crate) fn check_value(t: Target, value: &str, now_ms: i64) -> Result<String, CaseError> {
    let name = t.name();
    let v = value.trim();
    let n = v.chars().count();
    if n > MAX_FIELD_CHARS {
        return Err(invalid(
            &name,
            format!("value is {n} characters long; the limit is {MAX_FIELD_CHARS}"),
        ));
    }
    if v.chars().any(char::is_control) {
        return Err(invalid(
            &name,
            "value must be a single line without control characters",
        ));
    }
    let required = match t {
        Target::Applicant(_, key) => key == "name" || key == "village",
        Target::Assignee => false,
        Target::Field(f) => f.required,
        Target::Doc(_) => true,
    };
    if v.is_empty() {
        return if required {
            Err(invalid(&name, "this field is required and cannot be empty"))
        } else {
            Ok(String::new())
        };
    }
    match t {
        Target::Applicant(_, "birth_date") => check_date(&name, v, true, now_ms)?,
        Target::Applicant(_, "id_number") => {
            if !v.chars().all(|c| c.is_ascii_digit()) || !(n == 9 || n == 12) {
                return Err(invalid(
                    &name,
                    "an ID number is 12 digits (citizen ID card) or 9 digits (old ID card)",
                ));
            }
        }
        Target::Applicant(_, "phone") => {
            if !v
                .chars()
                .all(|c| c.is_ascii_digit() || c == '+' || c == ' ')
                || !v.chars().any(|c| c.is_ascii_digit())
            {
                return Err(invalid(
                    &name,
                    "a phone number may contain only digits, '+' and spaces",
                ));
            }
        }
        Target::Field(f) => check_kind(&name, f.kind, v, now_ms)?,
        Target::Doc(_) => {
            v.parse::<DocState>()?;
        }
        Target::Applicant(..) | Target::Assignee => {}
    }
    Ok(v.to_string())
}

fn check_date(name: &str, v: &str, past: bool, now_ms: i64) -> Result<(), CaseError> {
    let day = date::parse_date(v).map_err(|r| invalid(name, r))?;
    let year: i64 = v.get(0..4).and_then(|y| y.parse().ok()).unwrap_or(0);
    if !(1900..=2100).contains(&year) {
        return Err(invalid(
            name,
            format!("year {year} is out of range 1900-2100"),
        ));
    }
    if past && day > date::vn_day(now_ms) {
        return Err(invalid(
            name,
            format!("{v} is in the future (today is {})", date::vn_date(now_ms)),
        ));
    }
    Ok(())
}

fn check_kind(name: &str, kind: FieldKind, v: &str, now_ms: i64) -> Result<(), CaseError> {
    match kind {
        FieldKind::Text => Ok(()),
        FieldKind::Date => check_date(name, v, false, now_ms),
        FieldKind::PastDate => check_date(name, v, true, now_ms),
        FieldKind::Integer => match v.parse::<u64>() {
            Ok(x) if x >= 1 && v.chars().all(|c| c.is_ascii_digit()) => Ok(()),
            _ => Err(invalid(
                name,
                format!("'{v}' is not a whole number of at least 1"),
            )),
        },
        FieldKind::Decimal => {
            let shape = {
                let mut parts = v.splitn(2, '.');
                let int = parts.next().unwrap_or("");
                let frac = parts.next();
                !int.is_empty()
                    && int.chars().all(|c| c.is_ascii_digit())
                    && frac.is_none_or(|f| !f.is_empty() && f.chars().all(|c| c.is_ascii_digit()))
            };
            match v.parse::<f64>() {
                Ok(x) if shape && x > 0.0 && x.is_finite() => Ok(()),
                _ => Err(invalid(
                    name,
                    format!("'{v}' is not a positive number like 125.5 (use '.' for decimals)"),
                )),
            }
        }
        FieldKind::Choice(opts) => {
            if opts.contains(&v) {
                Ok(())
            } else {
                Err(invalid(
                    name,
                    format!("'{v}' is not one of: {}", opts.join(", ")),
                ))
            }
        }
    }
}

/// Check free text (notes, questions, answers): non-empty, bounded, no control
/// characters other than line breaks and tabs.
fn check_text(what: &str, text: &str) -> Result<String, CaseError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(invalid(what, "text cannot be empty"));
    }
    let n = t.chars().count();
    if n > MAX_TEXT_CHARS {
        return Err(invalid(
            what,
            format!("text is {n} characters long; the limit is {MAX_TEXT_CHARS}"),
        ));
    }
    if t.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Err(invalid(what, "text contains control characters"));
    }
    Ok(t.to_string())
}

/// Characters never kept in an attachment's file name: control characters,
/// and the bidirectional marks/overrides/isolates that can disguise an
/// extension (`photo\u{202E}gpj.exe` displays as `photoexe.jpg`).
fn bad_name_char(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
        )
}

/// Path separators stripped from file names. `:` is included because on
/// Windows `C:photo.jpg` joined to a folder escapes it (drive-relative path).
const NAME_SEPARATORS: [char; 3] = ['/', '\\', ':'];

/// `s` quoted for an error message, or a length if it is too long to show.
fn shown(s: &str) -> String {
    let n = s.chars().count();
    if n <= 80 {
        format!("{s:?}")
    } else {
        format!("a {n}-character value")
    }
}

/// The stored form of an attachment's original file name: the last path
/// component of `name` (after any `/`, `\` or `:`), without control or
/// bidi-override characters, trimmed. Refuses names that end up empty, `.`
/// or `..`, or longer than [`MAX_ATTACHMENT_NAME_CHARS`]. Idempotent: a
/// stored name comes back unchanged, which is how peers' names are checked.
pub fn sanitize_file_name(name: &str) -> Result<String, CaseError> {
    let last = name.rsplit(NAME_SEPARATORS).next().unwrap_or_default();
    let cleaned: String = last.chars().filter(|&c| !bad_name_char(c)).collect();
    let cleaned = cleaned.trim();
    if cleaned.is_empty() || cleaned == "." || cleaned == ".." {
        return Err(invalid(
            "attachment name",
            format!("{} does not end in a file name", shown(name)),
        ));
    }
    let n = cleaned.chars().count();
    if n > MAX_ATTACHMENT_NAME_CHARS {
        return Err(invalid(
            "attachment name",
            format!(
                "the file name is {n} characters long; the limit is {MAX_ATTACHMENT_NAME_CHARS}"
            ),
        ));
    }
    Ok(cleaned.to_string())
}

/// Is `h` a stored attachment hash: exactly 64 lowercase hex characters?
pub(crate) fn is_attachment_hash(h: &str) -> bool {
    h.len() == ATTACHMENT_HASH_CHARS
        && h.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn check_hash(hash: &str) -> Result<String, CaseError> {
    let h = hash.trim().to_ascii_lowercase();
    if is_attachment_hash(&h) {
        Ok(h)
    } else {
        Err(invalid(
            "attachment hash",
            format!(
                "{} is not a BLAKE3 hash ({ATTACHMENT_HASH_CHARS} hexadecimal characters)",
                shown(hash)
            ),
        ))
    }
}

/// Is `size` an acceptable attachment size (1 byte to [`MAX_ATTACHMENT_BYTES`])?
pub(crate) fn is_attachment_size(size: u64) -> bool {
    (1..=MAX_ATTACHMENT_BYTES).contains(&size)
}

/// Is `m` a stored media type: lower-case `type/subtype`, each 1-127
/// characters of RFC 6838 restricted-name characters, no parameters?
pub(crate) fn is_media_type(m: &str) -> bool {
    let token = |t: &str| {
        !t.is_empty()
            && t.len() <= 127
            && t.as_bytes()[0].is_ascii_alphanumeric()
            && t.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$&-^_.+".contains(&b))
    };
    m.len() <= MAX_MEDIA_TYPE_CHARS && m.split_once('/').is_some_and(|(t, s)| token(t) && token(s))
}

fn check_media_type(media_type: &str) -> Result<String, CaseError> {
    let m = media_type.trim().to_ascii_lowercase();
    if is_media_type(&m) {
        Ok(m)
    } else {
        Err(invalid(
            "attachment media type",
            format!(
                "{} is not a media type like image/jpeg or application/pdf",
                shown(media_type)
            ),
        ))
    }
}

/// Is `n` acceptable as a stored attachment note (possibly empty)?
pub(crate) fn is_attachment_note(n: &str) -> bool {
    n.chars().count() <= MAX_TEXT_CHARS
        && !n.chars().any(|c| c.is_control() && c != '\n' && c != '\t')
}

/// Would [`check_author`] accept this node id or name (as found in a document)?
pub(crate) fn is_author_text(s: &str) -> bool {
    !s.trim().is_empty()
        && s.chars().count() <= MAX_AUTHOR_CHARS
        && !s.chars().any(char::is_control)
}

fn check_author(a: &Author) -> Result<(), CaseError> {
    for (what, s) in [("author node id", &a.node_id), ("author name", &a.name)] {
        if s.trim().is_empty() {
            return Err(invalid(what, "cannot be empty"));
        }
        if s.chars().count() > MAX_AUTHOR_CHARS || s.chars().any(char::is_control) {
            return Err(invalid(
                what,
                format!("must be one line of at most {MAX_AUTHOR_CHARS} characters"),
            ));
        }
    }
    Ok(())
}

/// Check a case code: 1–64 ASCII letters, digits and '-', e.g. `K7QF2M-0001`.
pub fn check_code(code: &str) -> Result<(), CaseError> {
    let ok = !code.is_empty()
        && code.len() <= MAX_CODE_CHARS
        && code.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "case code",
            format!(
                "'{code}' must be 1-{MAX_CODE_CHARS} letters, digits or '-' (like K7QF2M-0001)"
            ),
        ))
    }
}

fn reconcile_err(e: autosurgeon::ReconcileError) -> CaseError {
    match e {
        autosurgeon::ReconcileError::Automerge(e) => CaseError::Automerge(e),
        other => CaseError::Malformed(format!("could not write to the document: {other}")),
    }
}

/// Run `f` in one Automerge change by `author` at `now_ms`, recording the
/// author in `members` first so conflicts can name the node.
fn mutate<O>(
    doc: &mut Automerge,
    author: &Author,
    now_ms: i64,
    message: &str,
    f: impl FnOnce(&mut Transaction<'_>) -> Result<O, CaseError>,
) -> Result<O, CaseError> {
    check_author(author)?;
    doc.set_actor(author.actor.clone());
    doc.transact_with(
        |_| {
            CommitOptions::default()
                .with_time(now_ms)
                .with_message(message.to_string())
        },
        |tx| {
            touch_member(tx, author)?;
            f(tx)
        },
    )
    .map(|ok| ok.result)
    .map_err(|fail| fail.error)
}

/// Write `members[actor-hex] = {node_id, name}` unless it is already exactly
/// that, so each node is recorded the first time it writes (and again only if
/// its name changed).
fn touch_member(tx: &mut Transaction<'_>, author: &Author) -> Result<(), CaseError> {
    let members = child_obj(tx, &ROOT, doc::K_MEMBERS, ObjType::Map)?;
    let key = author.actor.to_hex_string();
    if let Some((Value::Object(ObjType::Map), id)) = tx.get(&members, key.as_str())? {
        let same = |k: &str, want: &str| -> Result<bool, CaseError> {
            Ok(matches!(tx.get(&id, k)?, Some((Value::Scalar(s), _)) if s.as_str() == Some(want)))
        };
        if same("node_id", &author.node_id)? && same("name", &author.name)? {
            return Ok(());
        }
    }
    autosurgeon::reconcile_prop(
        tx,
        &members,
        key.as_str(),
        MemberRec {
            node_id: author.node_id.clone(),
            name: author.name.clone(),
        },
    )
    .map_err(reconcile_err)
}

/// Append `rec` at the end of the list at `key` of `parent` with an explicit
/// insert: a new list element, so concurrent appends are all kept.
fn append<R: autosurgeon::Reconcile>(
    tx: &mut Transaction<'_>,
    parent: &ObjId,
    key: &str,
    rec: R,
) -> Result<usize, CaseError> {
    let list = child_obj(tx, parent, key, ObjType::List)?;
    let len = tx.length(&list);
    autosurgeon::reconcile_insert(tx, list, len, rec).map_err(reconcile_err)?;
    Ok(len)
}

/// Put the scalar for `t`.
fn write_target(tx: &mut Transaction<'_>, t: Target, value: &str) -> Result<(), CaseError> {
    let (obj, key) = match t {
        Target::Applicant(_, key) => (child_obj(tx, &ROOT, doc::K_APPLICANT, ObjType::Map)?, key),
        Target::Assignee => (ROOT, doc::K_ASSIGNEE),
        Target::Field(f) => (child_obj(tx, &ROOT, doc::K_FIELDS, ObjType::Map)?, f.id),
        Target::Doc(i) => (child_obj(tx, &ROOT, doc::K_CHECKLIST, ObjType::Map)?, i.id),
    };
    tx.put(&obj, key, value)?;
    Ok(())
}

/// Create a new case document, written by `author` at `now_ms`.
///
/// All checklist items start `missing`; the status starts `received` (no
/// status event is written — `received` is the fold's starting point). The
/// due date is the Vietnam creation date plus the procedure's processing days.
pub fn create(
    code: &str,
    new: &NewCase,
    author: &Author,
    now_ms: i64,
) -> Result<Automerge, CaseError> {
    check_code(code)?;
    check_author(author)?;
    let proc = procedure(&new.procedure)?;
    let mut applicant = ApplicantRec::default();
    let mut fields = BTreeMap::new();
    let mut checklist: BTreeMap<String, String> = proc
        .checklist
        .iter()
        .map(|i| (i.id.to_string(), DocState::Missing.as_str().to_string()))
        .collect();
    let mut assignee = String::new();
    let mut all = vec![
        ("applicant".to_string(), new.applicant.clone()),
        ("village".to_string(), new.village.clone()),
    ];
    all.extend(new.fields.iter().cloned());
    for (name, value) in &all {
        let t = target(proc, name)?;
        let v = check_value(t, value, now_ms)?;
        match t {
            Target::Applicant(_, key) => {
                let slot = match key {
                    "name" => &mut applicant.name,
                    "birth_date" => &mut applicant.birth_date,
                    "id_number" => &mut applicant.id_number,
                    "phone" => &mut applicant.phone,
                    _ => &mut applicant.village,
                };
                *slot = v;
            }
            Target::Assignee => assignee = v,
            Target::Field(f) => {
                if v.is_empty() {
                    fields.remove(f.id);
                } else {
                    fields.insert(f.id.to_string(), v);
                }
            }
            Target::Doc(i) => {
                checklist.insert(i.id.to_string(), v);
            }
        }
    }
    let mut members = BTreeMap::new();
    members.insert(
        author.actor.to_hex_string(),
        MemberRec {
            node_id: author.node_id.clone(),
            name: author.name.clone(),
        },
    );
    let rec = CaseDoc {
        schema: doc::SCHEMA,
        code: code.to_string(),
        procedure: proc.id.to_string(),
        applicant,
        fields,
        checklist,
        assignee,
        notes: Vec::new(),
        questions: Vec::new(),
        status_events: Vec::new(),
        resolutions: Vec::new(),
        members,
        created_at_ms: now_ms,
        created_by: author.node_id.clone(),
        created_by_name: author.name.clone(),
        due_date: date::due_date(now_ms, proc.processing_days),
    };
    let mut doc = Automerge::new().with_actor(author.actor.clone());
    doc.transact_with(
        |_| {
            CommitOptions::default()
                .with_time(now_ms)
                .with_message(format!("create case {code}"))
        },
        |tx| {
            autosurgeon::reconcile(tx, &rec).map_err(reconcile_err)?;
            tx.put_object(ROOT, doc::K_ATTACHMENTS, ObjType::List)?;
            Ok::<_, CaseError>(())
        },
    )
    .map_err(|f| f.error)?;
    Ok(doc)
}

/// Set an applicant field, `assignee`, a procedure field, or a checklist item
/// (`doc:<item>`, same as [`mark_document`]). The value is trimmed and
/// validated; optional fields may be cleared with an empty value.
pub fn set_field(
    doc: &mut Automerge,
    field: &str,
    value: &str,
    author: &Author,
    now_ms: i64,
) -> Result<(), CaseError> {
    let v = view(doc)?;
    let proc = procedure(&v.procedure)?;
    let t = target(proc, field)?;
    let value = check_value(t, value, now_ms)?;
    mutate(doc, author, now_ms, &format!("set {}", t.name()), |tx| {
        write_target(tx, t, &value)
    })
}

/// Record the state of one checklist document.
pub fn mark_document(
    doc: &mut Automerge,
    item: &str,
    state: DocState,
    author: &Author,
    now_ms: i64,
) -> Result<(), CaseError> {
    let v = view(doc)?;
    let proc = procedure(&v.procedure)?;
    let def = proc.item(item).ok_or_else(|| unknown_item(proc, item))?;
    mutate(
        doc,
        author,
        now_ms,
        &format!("mark {} {state}", def.id),
        |tx| write_target(tx, Target::Doc(def), state.as_str()),
    )
}

/// Move the case to `to`, if the workflow allows it from the derived status.
///
/// Moving to `processing` (from `received` or `needs-documents`) or back to
/// `received` from `needs-documents` requires every required document to be
/// `received` and not in conflict; the error lists the offending items.
pub fn change_status(
    doc: &mut Automerge,
    to: Status,
    author: &Author,
    now_ms: i64,
) -> Result<(), CaseError> {
    let v = view(doc)?;
    let from = v.status;
    let refuse = |reason: String| CaseError::InvalidTransition { from, to, reason };
    if from == to {
        return Err(refuse(format!("the case is already {to}")));
    }
    if from.is_terminal() {
        return Err(refuse(format!("{from} is a final status")));
    }
    if !from.can_move_to(to) {
        let next: Vec<&str> = from
            .next_statuses()
            .into_iter()
            .map(Status::as_str)
            .collect();
        return Err(refuse(format!(
            "from {from} the case can only move to {}",
            next.join(", ")
        )));
    }
    let needs_docs =
        to == Status::Processing || (from == Status::NeedsDocuments && to == Status::Received);
    if needs_docs && !v.missing_required.is_empty() {
        let detail: Vec<String> = v
            .missing_required
            .iter()
            .map(|id| {
                let conflicted = v
                    .conflicts
                    .iter()
                    .any(|c| c.field == format!("{DOC_PREFIX}{id}"));
                let state = v
                    .checklist
                    .iter()
                    .find(|e| &e.item == id)
                    .map_or("missing", |e| e.state.as_str());
                if conflicted {
                    format!("{id} (conflicting states, resolve first)")
                } else {
                    format!("{id} ({state})")
                }
            })
            .collect();
        return Err(refuse(format!(
            "required documents not received: {}",
            detail.join(", ")
        )));
    }
    let ev = StatusEventRec {
        by: author.node_id.clone(),
        name: author.name.clone(),
        at_ms: now_ms,
        from: from.as_str().to_string(),
        to: to.as_str().to_string(),
    };
    mutate(
        doc,
        author,
        now_ms,
        &format!("status {from} -> {to}"),
        |tx| append(tx, &ROOT, doc::K_EVENTS, &ev).map(|_| ()),
    )
}

/// Append a note to the case's journal.
pub fn add_note(
    doc: &mut Automerge,
    text: &str,
    author: &Author,
    now_ms: i64,
) -> Result<(), CaseError> {
    view(doc)?;
    let text = check_text("note", text)?;
    let rec = NoteRec {
        author: author.node_id.clone(),
        author_name: author.name.clone(),
        at_ms: now_ms,
        text,
    };
    mutate(doc, author, now_ms, "add note", |tx| {
        append(tx, &ROOT, doc::K_NOTES, &rec).map(|_| ())
    })
}

/// Ask a question about the case (e.g. the center asks the field officer to
/// check something with the citizen). Returns the question's number (1-based
/// position in the list).
///
/// The number is the position *on this replica now*: if another laptop asked
/// a question concurrently, after merging the two questions are ordered the
/// same way everywhere, which may shift one of them by one.
pub fn ask(
    doc: &mut Automerge,
    text: &str,
    author: &Author,
    now_ms: i64,
) -> Result<usize, CaseError> {
    view(doc)?;
    let text = check_text("question", text)?;
    let rec = QuestionRec {
        asked_by: author.node_id.clone(),
        asked_name: author.name.clone(),
        at_ms: now_ms,
        text,
        answers: Vec::new(),
    };
    mutate(doc, author, now_ms, "ask question", |tx| {
        append(tx, &ROOT, doc::K_QUESTIONS, &rec).map(|idx| idx + 1)
    })
}

/// Answer question number `question_no` (1-based, as shown by [`view`]).
pub fn answer(
    doc: &mut Automerge,
    question_no: usize,
    text: &str,
    author: &Author,
    now_ms: i64,
) -> Result<(), CaseError> {
    let v = view(doc)?;
    let count = v.questions.len();
    if question_no == 0 || question_no > count {
        return Err(CaseError::NoSuchQuestion {
            no: question_no,
            count,
        });
    }
    let text = check_text("answer", text)?;
    let rec = AnswerRec {
        by: author.node_id.clone(),
        name: author.name.clone(),
        at_ms: now_ms,
        text,
    };
    mutate(
        doc,
        author,
        now_ms,
        &format!("answer question {question_no}"),
        |tx| {
            let list = child_obj(tx, &ROOT, doc::K_QUESTIONS, ObjType::List)?;
            let q = list_elem_map(tx, &list, question_no - 1)?;
            append(tx, &q, doc::K_ANSWERS, &rec).map(|_| ())
        },
    )
}

/// Resolve a conflict on `field` (CLI name, e.g. `phone`, `doc:birth-notice`)
/// by writing `value` causally after all the conflicting values — so the
/// conflict disappears on every replica once this change syncs — and
/// recording which values it replaced. `value` need not be one of them.
pub fn resolve(
    doc: &mut Automerge,
    field: &str,
    value: &str,
    author: &Author,
    now_ms: i64,
) -> Result<(), CaseError> {
    let v = view(doc)?;
    let proc = procedure(&v.procedure)?;
    let t = target(proc, field)?;
    let name = t.name();
    let conflict = v
        .conflicts
        .iter()
        .find(|c| c.field == name)
        .ok_or_else(|| CaseError::NoConflict {
            field: name.clone(),
        })?;
    let value = check_value(t, value, now_ms)?;
    let rec = ResolutionRec {
        field: name.clone(),
        value: value.clone(),
        by: author.node_id.clone(),
        name: author.name.clone(),
        at_ms: now_ms,
        replaced: conflict
            .candidates
            .iter()
            .map(|c| CandidateRec {
                value: c.value.clone(),
                node_id: c.node_id.clone(),
                node_name: c.node_name.clone(),
                at_ms: c.at_ms,
            })
            .collect(),
    };
    mutate(doc, author, now_ms, &format!("resolve {name}"), |tx| {
        write_target(tx, t, &value)?;
        append(tx, &ROOT, doc::K_RESOLUTIONS, &rec).map(|_| ())
    })
}

/// Attach a file (whose bytes the caller has put in the blob store) to the
/// case, as support for checklist item `meta.item`. All fields are checked:
/// the hash must be 64 hex characters, the size 1 to
/// [`MAX_ATTACHMENT_BYTES`], the media type well-formed, the item on this
/// case's checklist ([`CaseError::UnknownItem`] lists the valid ones), the
/// note at most [`MAX_TEXT_CHARS`]; the name is reduced to its file name by
/// [`sanitize_file_name`].
///
/// The entry is appended to the `attachments` list with an explicit insert,
/// so attachments made concurrently on several laptops are all kept, in the
/// same order everywhere.
///
/// With `mark_received`, an item whose state is `missing` is marked
/// `received` in the same change. Any other state (`invalid`: an officer
/// looked at the paper and refused it; `received`) is left alone, and so is
/// an item whose state is in conflict — that needs [`resolve`], not a silent
/// overwrite.
///
/// Attaching a hash that is already attached to the same item adds no entry
/// (the first entry's name, note and author are kept); only the marking, if
/// asked for and applicable, is written, and if there is nothing to do the
/// document is not changed at all. The same hash may be attached to several
/// items (one scan showing two papers). A hash already attached with a
/// different size is refused: the hash determines the bytes, so one of the
/// sizes is wrong.
pub fn attach(
    doc: &mut Automerge,
    meta: &AttachmentMeta,
    mark_received: bool,
    author: &Author,
    now_ms: i64,
) -> Result<(), CaseError> {
    let v = view(doc)?;
    let proc = procedure(&v.procedure)?;
    let def = proc
        .item(&meta.item)
        .ok_or_else(|| unknown_item(proc, &meta.item))?;
    let hash = check_hash(&meta.hash)?;
    if !is_attachment_size(meta.size) {
        return Err(invalid(
            "attachment size",
            format!(
                "{} bytes; a file must be 1 to {MAX_ATTACHMENT_BYTES} bytes",
                meta.size
            ),
        ));
    }
    let media_type = check_media_type(&meta.media_type)?;
    let name = sanitize_file_name(&meta.name)?;
    let note = if meta.note.trim().is_empty() {
        String::new()
    } else {
        check_text("attachment note", &meta.note)?
    };
    if let Some(other) = v
        .attachments
        .iter()
        .find(|a| a.hash == hash && a.size != meta.size)
    {
        return Err(invalid(
            "attachment size",
            format!(
                "file {hash} is already attached with size {} bytes, not {}",
                other.size, meta.size
            ),
        ));
    }
    let present = v
        .attachments
        .iter()
        .any(|a| a.hash == hash && a.item == def.id);
    let field = format!("{DOC_PREFIX}{}", def.id);
    let mark = mark_received
        && !v.conflicts.iter().any(|c| c.field == field)
        && v.checklist
            .iter()
            .any(|e| e.item == def.id && e.state == DocState::Missing);
    if present && !mark {
        return Ok(());
    }
    let message = format!("attach {} to {}", &hash[..12], def.id);
    let rec = AttachmentRec {
        hash,
        size: meta.size,
        media_type,
        name,
        item: def.id.to_string(),
        note,
        by: author.node_id.clone(),
        by_name: author.name.clone(),
        at_ms: now_ms,
    };
    mutate(doc, author, now_ms, &message, |tx| {
        if !present {
            // Cases created before attachments existed have no list yet.
            match tx.get(ROOT, doc::K_ATTACHMENTS)? {
                Some((Value::Object(ObjType::List), _)) => {}
                Some(_) => {
                    return Err(CaseError::Malformed(format!(
                        "'{}' is not a List object",
                        doc::K_ATTACHMENTS
                    )))
                }
                None => {
                    tx.put_object(ROOT, doc::K_ATTACHMENTS, ObjType::List)?;
                }
            }
            append(tx, &ROOT, doc::K_ATTACHMENTS, &rec)?;
        }
        if mark {
            write_target(tx, Target::Doc(def), DocState::Received.as_str())?;
        }
        Ok(())
    })
}
