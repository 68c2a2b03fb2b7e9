//! Reading a case: the full [`CaseView`] (the `case show --json` output), the
//! list-row [`Projection`], conflict detection, and validation of documents
//! received from peers.
//!
//! Everything here is read-only and total: a document of the wrong shape
//! yields [`CaseError::Malformed`], never a panic.

use std::collections::BTreeMap;

use automerge::{Automerge, ObjId, ObjType, ReadDoc, Value, ROOT};
use serde::{Deserialize, Serialize};

use super::doc::{self, child_obj, hydrate_case, AttachmentRec, CandidateRec};
use super::{
    all_targets, check_code, date, is_attachment_hash, is_attachment_note, is_attachment_size,
    is_author_text, is_media_type, procedure, sanitize_file_name, status, CaseError, DocState,
    ProcedureDef, Status, Target, DOC_PREFIX, MAX_FIELD_CHARS, MAX_TEXT_CHARS,
};

/// Applicant block of a [`CaseView`]. Empty strings mean "not given".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplicantView {
    pub name: String,
    /// `YYYY-MM-DD` or empty.
    pub birth_date: String,
    pub id_number: String,
    pub phone: String,
    pub village: String,
}

/// One checklist line, in the procedure's checklist order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChecklistEntry {
    /// Item id (kebab-case), e.g. `birth-notice`.
    pub item: String,
    pub label: String,
    pub required: bool,
    /// Current (winning) state; see `conflicts` for `doc:<item>` disagreements.
    pub state: DocState,
}

/// A journal note.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Note {
    /// Author node id.
    pub by: String,
    /// Author display name.
    pub name: String,
    pub at_ms: i64,
    pub text: String,
}

/// An answer to a question.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub by: String,
    pub name: String,
    pub at_ms: i64,
    pub text: String,
}

/// A question with its answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Question {
    /// 1-based display number (list position + 1), used by `answer`.
    pub no: usize,
    pub asked_by: String,
    pub asked_name: String,
    pub at_ms: i64,
    pub text: String,
    pub answers: Vec<Answer>,
}

/// A status event, in list order, with whether the fold applied it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub by: String,
    pub name: String,
    pub at_ms: i64,
    pub from: Status,
    pub to: Status,
    /// `false` means superseded: a concurrent move that lost to a further one.
    pub applied: bool,
}

/// One of the disagreeing values of a conflict, with who wrote it and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictCandidate {
    pub value: String,
    /// Node id from `members` (the actor hex if the writer never registered).
    pub node_id: String,
    /// Node display name from `members` (empty if unknown).
    pub node_name: String,
    /// Timestamp of the change that wrote the value (Unix ms).
    pub at_ms: i64,
}

/// A field whose replicas wrote different values concurrently.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    /// CLI field name: `applicant`, `birth-date`, `id-number`, `phone`,
    /// `village`, `assignee`, a procedure field id, or `doc:<item-id>`.
    pub field: String,
    /// Sorted by `(at_ms, node_id, value)`.
    pub candidates: Vec<ConflictCandidate>,
}

/// A recorded conflict resolution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolution {
    pub field: String,
    pub value: String,
    pub by: String,
    pub name: String,
    pub at_ms: i64,
    /// The conflicting values this resolution replaced.
    pub replaced: Vec<ConflictCandidate>,
}

/// A file attached to the case. The bytes are in the blob store under `hash`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// BLAKE3 hash of the bytes, 64 lowercase hex characters.
    pub hash: String,
    /// Length in bytes.
    pub size: u64,
    /// e.g. `image/jpeg`, `application/pdf`.
    pub media_type: String,
    /// Original file name (no directories).
    pub name: String,
    /// Checklist item id the file supports.
    pub item: String,
    /// May be empty.
    pub note: String,
    /// Node id of the node that attached it.
    pub by: String,
    /// That node's display name.
    pub by_name: String,
    pub at_ms: i64,
}

/// A node that has written to the case.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Automerge actor id, hex.
    pub actor: String,
    pub node_id: String,
    pub name: String,
}

/// Everything about a case. This is the `case show --json` output, so the
/// serde field names are a stable interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaseView {
    pub schema: u64,
    pub code: String,
    pub procedure: String,
    pub procedure_title: String,
    /// Derived from `history` by the status fold; never stored.
    pub status: Status,
    pub applicant: ApplicantView,
    /// Procedure fields that have a value (field id -> value).
    pub fields: BTreeMap<String, String>,
    /// Required procedure fields that are still empty (informational; they
    /// do not block status moves).
    pub missing_fields: Vec<String>,
    pub checklist: Vec<ChecklistEntry>,
    /// Required checklist items that are not `received`, or whose state is in
    /// conflict; these block moving to processing.
    pub missing_required: Vec<String>,
    pub assignee: String,
    pub notes: Vec<Note>,
    pub questions: Vec<Question>,
    pub history: Vec<HistoryEntry>,
    /// Sorted by field name.
    pub conflicts: Vec<Conflict>,
    pub resolutions: Vec<Resolution>,
    /// Attached files, in list order (the same on every replica).
    #[serde(default)]
    pub attachments: Vec<Attachment>,
    /// Sorted by actor.
    pub members: Vec<Member>,
    pub created_at_ms: i64,
    /// Node id of the creator.
    pub created_by: String,
    pub created_by_name: String,
    /// `YYYY-MM-DD` (Vietnam date).
    pub due_date: String,
    /// Latest change timestamp (Unix ms).
    pub updated_at_ms: i64,
    /// Document heads, hex, sorted: identical on replicas that have synced.
    pub heads: Vec<String>,
}

/// The columns a case list needs, kept in the node's index table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Projection {
    pub code: String,
    pub procedure: String,
    pub status: Status,
    pub village: String,
    pub applicant: String,
    pub due_date: String,
    pub updated_at_ms: i64,
    /// Number of conflicted fields.
    pub conflicts: usize,
}

fn malformed(msg: impl Into<String>) -> CaseError {
    CaseError::Malformed(msg.into())
}

fn cand(c: &CandidateRec) -> ConflictCandidate {
    ConflictCandidate {
        value: c.value.clone(),
        node_id: c.node_id.clone(),
        node_name: c.node_name.clone(),
        at_ms: c.at_ms,
    }
}

fn parse_status(s: &str) -> Result<Status, CaseError> {
    s.parse()
        .map_err(|_| malformed(format!("unknown status '{s}' in status history")))
}

/// Build the full view of a case document.
pub fn view(doc: &Automerge) -> Result<CaseView, CaseError> {
    let reader = doc::OnePass::new(doc);
    let c = hydrate_case(&reader)?;
    if c.schema != doc::SCHEMA {
        return Err(malformed(format!(
            "schema version {} is not supported (this node understands {})",
            c.schema,
            doc::SCHEMA
        )));
    }
    check_code(&c.code).map_err(|e| malformed(e.to_string()))?;
    let proc = procedure(&c.procedure).map_err(|e| malformed(e.to_string()))?;
    date::parse_date(&c.due_date).map_err(|e| malformed(format!("due date: {e}")))?;

    if let Some(k) = c.fields.keys().find(|k| proc.field(k).is_none()) {
        return Err(malformed(format!(
            "field '{k}' does not belong to procedure {}",
            proc.id
        )));
    }
    if let Some(k) = c.checklist.keys().find(|k| proc.item(k).is_none()) {
        return Err(malformed(format!(
            "checklist item '{k}' does not belong to procedure {}",
            proc.id
        )));
    }
    check_lengths(&c)?;
    let attachments = doc::attachments(&reader)?;
    check_attachments(&attachments, proc)?;
    let mut checklist = Vec::with_capacity(proc.checklist.len());
    for def in proc.checklist {
        let state = match c.checklist.get(def.id) {
            Some(s) => s
                .parse::<DocState>()
                .map_err(|_| malformed(format!("checklist item '{}' has state '{s}'", def.id)))?,
            None => DocState::Missing,
        };
        checklist.push(ChecklistEntry {
            item: def.id.to_string(),
            label: def.label.to_string(),
            required: def.required,
            state,
        });
    }

    let mut pairs = Vec::with_capacity(c.status_events.len());
    for e in &c.status_events {
        pairs.push((parse_status(&e.from)?, parse_status(&e.to)?));
    }
    let (status, applied) = status::fold(&pairs);
    let history = c
        .status_events
        .iter()
        .zip(pairs.iter().zip(applied))
        .map(|(e, (&(from, to), applied))| HistoryEntry {
            by: e.by.clone(),
            name: e.name.clone(),
            at_ms: e.at_ms,
            from,
            to,
            applied,
        })
        .collect();

    let conflicts = conflicts(&reader, proc, &c.members)?;
    let conflicted = |item: &str| {
        conflicts
            .iter()
            .any(|k| k.field.strip_prefix(DOC_PREFIX) == Some(item))
    };
    let missing_required = checklist
        .iter()
        .filter(|e| e.required && (e.state != DocState::Received || conflicted(&e.item)))
        .map(|e| e.item.clone())
        .collect();
    let missing_fields = proc
        .fields
        .iter()
        .filter(|f| f.required && c.fields.get(f.id).is_none_or(|v| v.is_empty()))
        .map(|f| f.id.to_string())
        .collect();

    let updated_at_ms = doc
        .get_changes_meta(&[])
        .iter()
        .map(|m| m.timestamp)
        .max()
        .unwrap_or(c.created_at_ms);
    let mut heads: Vec<String> = doc.get_heads().iter().map(|h| h.to_string()).collect();
    heads.sort();

    Ok(CaseView {
        schema: c.schema,
        code: c.code,
        procedure: proc.id.to_string(),
        procedure_title: proc.title.to_string(),
        status,
        applicant: ApplicantView {
            name: c.applicant.name,
            birth_date: c.applicant.birth_date,
            id_number: c.applicant.id_number,
            phone: c.applicant.phone,
            village: c.applicant.village,
        },
        fields: c
            .fields
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .collect(),
        missing_fields,
        checklist,
        missing_required,
        assignee: c.assignee,
        notes: c
            .notes
            .into_iter()
            .map(|n| Note {
                by: n.author,
                name: n.author_name,
                at_ms: n.at_ms,
                text: n.text,
            })
            .collect(),
        questions: c
            .questions
            .into_iter()
            .enumerate()
            .map(|(i, q)| Question {
                no: i + 1,
                asked_by: q.asked_by,
                asked_name: q.asked_name,
                at_ms: q.at_ms,
                text: q.text,
                answers: q
                    .answers
                    .into_iter()
                    .map(|a| Answer {
                        by: a.by,
                        name: a.name,
                        at_ms: a.at_ms,
                        text: a.text,
                    })
                    .collect(),
            })
            .collect(),
        history,
        conflicts,
        resolutions: c
            .resolutions
            .iter()
            .map(|r| Resolution {
                field: r.field.clone(),
                value: r.value.clone(),
                by: r.by.clone(),
                name: r.name.clone(),
                at_ms: r.at_ms,
                replaced: r.replaced.iter().map(cand).collect(),
            })
            .collect(),
        attachments: attachments
            .into_iter()
            .map(|a| Attachment {
                hash: a.hash,
                size: a.size,
                media_type: a.media_type,
                name: a.name,
                item: a.item,
                note: a.note,
                by: a.by,
                by_name: a.by_name,
                at_ms: a.at_ms,
            })
            .collect(),
        members: c
            .members
            .into_iter()
            .map(|(actor, m)| Member {
                actor,
                node_id: m.node_id,
                name: m.name,
            })
            .collect(),
        created_at_ms: c.created_at_ms,
        created_by: c.created_by,
        created_by_name: c.created_by_name,
        due_date: c.due_date,
        updated_at_ms,
        heads,
    })
}

/// Refuse oversized text a peer may have written directly: our own writes
/// never exceed these caps, so anything larger is not from a fieldcase node.
fn check_lengths(c: &doc::CaseDoc) -> Result<(), CaseError> {
    let too_long = |s: &str, max: usize| s.chars().count() > max;
    let a = &c.applicant;
    let short = [
        &a.name,
        &a.birth_date,
        &a.id_number,
        &a.phone,
        &a.village,
        &c.assignee,
    ]
    .into_iter()
    .chain(c.fields.values());
    if short.into_iter().any(|s| too_long(s, MAX_FIELD_CHARS)) {
        return Err(malformed(format!(
            "a field value is longer than {MAX_FIELD_CHARS} characters"
        )));
    }
    let texts = c
        .notes
        .iter()
        .map(|n| &n.text)
        .chain(c.questions.iter().map(|q| &q.text))
        .chain(
            c.questions
                .iter()
                .flat_map(|q| q.answers.iter().map(|a| &a.text)),
        );
    if texts.into_iter().any(|s| too_long(s, MAX_TEXT_CHARS)) {
        return Err(malformed(format!(
            "a note, question or answer is longer than {MAX_TEXT_CHARS} characters"
        )));
    }
    Ok(())
}

/// Refuse attachment entries our own [`super::attach`] would never write:
/// a bad hash, size, media type, file name, item, note or author, or one hash
/// listed with two different sizes (the hash determines the bytes).
fn check_attachments(list: &[AttachmentRec], proc: &ProcedureDef) -> Result<(), CaseError> {
    let mut sizes: BTreeMap<&str, u64> = BTreeMap::new();
    for (i, a) in list.iter().enumerate() {
        let bad = |what: &str| malformed(format!("attachment {}: {what}", i + 1));
        if !is_attachment_hash(&a.hash) {
            return Err(bad("hash is not 64 lowercase hex characters"));
        }
        if !is_attachment_size(a.size) {
            return Err(bad("size is out of range"));
        }
        if !is_media_type(&a.media_type) {
            return Err(bad("media type is not well-formed"));
        }
        if sanitize_file_name(&a.name).ok().as_deref() != Some(a.name.as_str()) {
            return Err(bad("file name is not a plain, bounded file name"));
        }
        if proc.item(&a.item).is_none() {
            return Err(bad(&format!("item is not on the {} checklist", proc.id)));
        }
        if !is_attachment_note(&a.note) {
            return Err(bad(&format!(
                "note is longer than {MAX_TEXT_CHARS} characters or has control characters"
            )));
        }
        if !is_author_text(&a.by) || !is_author_text(&a.by_name) {
            return Err(bad("author is empty, too long or has control characters"));
        }
        if let Some(&size) = sizes.get(a.hash.as_str()) {
            if size != a.size {
                return Err(bad("the same file is listed with two different sizes"));
            }
        }
        sizes.insert(&a.hash, a.size);
    }
    Ok(())
}

/// Find every scalar whose concurrent values disagree.
fn conflicts(
    reader: &doc::OnePass<'_>,
    proc: &'static super::ProcedureDef,
    members: &BTreeMap<String, doc::MemberRec>,
) -> Result<Vec<Conflict>, CaseError> {
    let doc = reader.doc();
    let applicant = child_obj(doc, &ROOT, doc::K_APPLICANT, ObjType::Map)?;
    let fields = child_obj(doc, &ROOT, doc::K_FIELDS, ObjType::Map)?;
    let checklist = child_obj(doc, &ROOT, doc::K_CHECKLIST, ObjType::Map)?;
    let mut out = Vec::new();
    for t in all_targets(proc) {
        let (obj, key): (&ObjId, &str) = match t {
            Target::Applicant(_, key) => (&applicant, key),
            Target::Assignee => (&ROOT, doc::K_ASSIGNEE),
            Target::Field(f) => (&fields, f.id),
            Target::Doc(i) => (&checklist, i.id),
        };
        // Conflicted keys come from the one pass per map that hydration
        // already made; a `get_all` per target would seek each key
        // separately (a linear scan of the map's ops in automerge 0.12).
        if !reader.is_conflicted(obj, key) {
            continue;
        }
        let all = doc.get_all(obj, key)?;
        if all.len() < 2 {
            continue;
        }
        let mut candidates = Vec::with_capacity(all.len());
        for (value, id) in &all {
            let value = match value {
                Value::Scalar(s) => s.as_str().map(str::to_string),
                Value::Object(_) => None,
            }
            .ok_or_else(|| malformed(format!("'{}' holds a non-text value", t.name())))?;
            if matches!(t, Target::Doc(_)) && value.parse::<DocState>().is_err() {
                return Err(malformed(format!("'{}' has state '{value}'", t.name())));
            }
            let meta = doc
                .hash_for_opid(id)
                .and_then(|h| doc.get_change_meta_by_hash(&h));
            let (actor, at_ms) = match meta {
                Some(m) => (m.actor.to_hex_string(), m.timestamp),
                None => (String::new(), 0),
            };
            let (node_id, node_name) = match members.get(&actor) {
                Some(m) => (m.node_id.clone(), m.name.clone()),
                None => (actor, String::new()),
            };
            candidates.push(ConflictCandidate {
                value,
                node_id,
                node_name,
                at_ms,
            });
        }
        if candidates.iter().all(|c| c.value == candidates[0].value) {
            continue;
        }
        candidates
            .sort_by(|a, b| (a.at_ms, &a.node_id, &a.value).cmp(&(b.at_ms, &b.node_id, &b.value)));
        out.push(Conflict {
            field: t.name(),
            candidates,
        });
    }
    out.sort_by(|a, b| a.field.cmp(&b.field));
    Ok(out)
}

/// The list-row summary of a case.
pub fn projection(doc: &Automerge) -> Result<Projection, CaseError> {
    let v = view(doc)?;
    Ok(Projection {
        code: v.code,
        procedure: v.procedure,
        status: v.status,
        village: v.applicant.village,
        applicant: v.applicant.name,
        due_date: v.due_date,
        updated_at_ms: v.updated_at_ms,
        conflicts: v.conflicts.len(),
    })
}

/// Is this a well-formed case document? Used to refuse garbage from a peer
/// before it is stored: it must hydrate, be schema 1, name a known procedure,
/// have only known fields, checklist items, states and statuses, and only
/// well-formed attachment entries (hash, size, media type, file name, item,
/// note, author; one size per hash).
pub fn validate(doc: &Automerge) -> Result<(), CaseError> {
    view(doc).map(|_| ())
}

/// [`validate`], and also check the document is for case `expected_code`
/// (a peer must not be able to overwrite one case with another).
pub fn validate_code(doc: &Automerge, expected_code: &str) -> Result<(), CaseError> {
    let v = view(doc)?;
    if v.code != expected_code {
        return Err(CaseError::CodeMismatch {
            expected: expected_code.to_string(),
            found: v.code,
        });
    }
    Ok(())
}
