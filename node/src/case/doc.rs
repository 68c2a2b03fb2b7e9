//! The stored shape of a case document and low-level access helpers.
//!
//! Document layout (schema 1). Keys are snake_case and are a wire format:
//! renaming one breaks every replica in the field, so don't.
//!
//! ```text
//! ROOT {
//!   schema: uint (1)
//!   code: str                     case code given by the caller, e.g. "K7QF2M-0001"
//!   procedure: str                procedure id, see procedures.rs
//!   applicant: { name, birth_date, id_number, phone, village }   each a str scalar
//!   fields: { <field-id>: str }   procedure fields (kebab-case ids)
//!   checklist: { <item-id>: "received" | "missing" | "invalid" }
//!   assignee: str                 may be ""
//!   notes: [ { author, author_name, at_ms, text } ]                      append-only
//!   questions: [ { asked_by, asked_name, at_ms, text,
//!                  answers: [ { by, name, at_ms, text } ] } ]            append-only
//!   status_events: [ { by, name, at_ms, from, to } ]                     append-only
//!   resolutions: [ { field, value, by, name, at_ms,
//!                    replaced: [ { value, node_id, node_name, at_ms } ] } ]  append-only
//!   members: { <actor-hex>: { node_id, name } }
//!   created_at_ms: int, created_by: str, created_by_name: str, due_date: str
//!   attachments: [ { hash, size: uint, media_type, name, item, note,
//!                    by, by_name, at_ms } ]                              append-only
//! }
//! ```
//!
//! `attachments` was added after schema 1 shipped, without a schema bump
//! (older nodes ignore the key). Cases created since then get the empty list
//! at creation; older cases get it from the first `attach`. Two replicas may
//! create it concurrently on an old case, leaving two list objects in
//! conflict at that key: readers concatenate *every* list at the key (in
//! Automerge's op order, identical on all replicas) so no attachment is lost,
//! and writers append to the winning list. `hash` is the 64-char lowercase
//! hex BLAKE3 hash of the file, `size` its length in bytes; the bytes live in
//! the node's blob store, never in the document.
//!
//! Every editable value is a plain scalar at its own map key so that
//! concurrent offline edits surface as Automerge conflicts (see `view.rs`),
//! instead of being merged character-by-character into nonsense.

use std::collections::BTreeMap;

use automerge::{ObjId, ObjType, ReadDoc, Value};
use autosurgeon::{Hydrate, Reconcile};

use super::CaseError;

/// Current schema version written by [`super::create`].
pub const SCHEMA: u64 = 1;

pub(crate) const K_APPLICANT: &str = "applicant";
pub(crate) const K_FIELDS: &str = "fields";
pub(crate) const K_CHECKLIST: &str = "checklist";
pub(crate) const K_ASSIGNEE: &str = "assignee";
pub(crate) const K_NOTES: &str = "notes";
pub(crate) const K_QUESTIONS: &str = "questions";
pub(crate) const K_ANSWERS: &str = "answers";
pub(crate) const K_EVENTS: &str = "status_events";
pub(crate) const K_RESOLUTIONS: &str = "resolutions";
pub(crate) const K_MEMBERS: &str = "members";
pub(crate) const K_ATTACHMENTS: &str = "attachments";

#[derive(Debug, Clone, Default, PartialEq, Hydrate, Reconcile)]
pub(crate) struct ApplicantRec {
    pub name: String,
    pub birth_date: String,
    pub id_number: String,
    pub phone: String,
    pub village: String,
}

#[derive(Debug, Clone, PartialEq, Hydrate, Reconcile)]
pub(crate) struct NoteRec {
    pub author: String,
    pub author_name: String,
    pub at_ms: i64,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Hydrate, Reconcile)]
pub(crate) struct AnswerRec {
    pub by: String,
    pub name: String,
    pub at_ms: i64,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Hydrate, Reconcile)]
pub(crate) struct QuestionRec {
    pub asked_by: String,
    pub asked_name: String,
    pub at_ms: i64,
    pub text: String,
    pub answers: Vec<AnswerRec>,
}

#[derive(Debug, Clone, PartialEq, Hydrate, Reconcile)]
pub(crate) struct StatusEventRec {
    pub by: String,
    pub name: String,
    pub at_ms: i64,
    pub from: String,
    pub to: String,
}

#[derive(Debug, Clone, PartialEq, Hydrate, Reconcile)]
pub(crate) struct CandidateRec {
    pub value: String,
    pub node_id: String,
    pub node_name: String,
    pub at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Hydrate, Reconcile)]
pub(crate) struct ResolutionRec {
    pub field: String,
    pub value: String,
    pub by: String,
    pub name: String,
    pub at_ms: i64,
    pub replaced: Vec<CandidateRec>,
}

#[derive(Debug, Clone, PartialEq, Hydrate, Reconcile)]
pub(crate) struct AttachmentRec {
    pub hash: String,
    pub size: u64,
    pub media_type: String,
    pub name: String,
    pub item: String,
    pub note: String,
    pub by: String,
    pub by_name: String,
    pub at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Hydrate, Reconcile)]
pub(crate) struct MemberRec {
    pub node_id: String,
    pub name: String,
}

/// The whole case document. Used to write the initial document in one go
/// and to hydrate (and thereby type-check) documents for reading. Appends
/// after creation never reconcile this struct: they insert single elements.
#[derive(Debug, Clone, PartialEq, Hydrate, Reconcile)]
pub(crate) struct CaseDoc {
    pub schema: u64,
    pub code: String,
    pub procedure: String,
    pub applicant: ApplicantRec,
    pub fields: BTreeMap<String, String>,
    pub checklist: BTreeMap<String, String>,
    pub assignee: String,
    pub notes: Vec<NoteRec>,
    pub questions: Vec<QuestionRec>,
    pub status_events: Vec<StatusEventRec>,
    pub resolutions: Vec<ResolutionRec>,
    pub members: BTreeMap<String, MemberRec>,
    pub created_at_ms: i64,
    pub created_by: String,
    pub created_by_name: String,
    pub due_date: String,
}

/// Hydrate the case, turning any shape error into `Malformed` (a peer's
/// garbage must be an error, never a panic).
pub(crate) fn hydrate_case(doc: &OnePass<'_>) -> Result<CaseDoc, CaseError> {
    autosurgeon::hydrate(doc)
        .map_err(|e| CaseError::Malformed(format!("document does not have the case shape: {e}")))
}

/// A read view of a document that answers map lookups from one pass over
/// each map. autosurgeon hydrates a struct a key at a time, and automerge
/// 0.12 seeks each key separately through the map's ops; for a case (a
/// few dozen maps of a handful of keys) that was most of the cost of
/// checking a case received from a peer. One `map_range` per map gives
/// the same winning value and object id per key as `get`, and whether the
/// key is conflicted.
pub(crate) struct OnePass<'a> {
    doc: &'a automerge::Automerge,
    maps: std::cell::RefCell<MapCache>,
}

/// One map as read in one pass: per key, the winning value, its id, and
/// whether other values conflict with it.
type OneMap = std::rc::Rc<BTreeMap<String, (Value<'static>, ObjId, bool)>>;

/// The maps already read (`None`: the object is not a map).
type MapCache = std::collections::HashMap<ObjId, Option<OneMap>>;

impl<'a> OnePass<'a> {
    pub(crate) fn new(doc: &'a automerge::Automerge) -> Self {
        OnePass {
            doc,
            maps: Default::default(),
        }
    }

    /// The document being read.
    pub(crate) fn doc(&self) -> &'a automerge::Automerge {
        self.doc
    }

    fn map(&self, obj: &ObjId) -> Option<OneMap> {
        if let Some(m) = self.maps.borrow().get(obj) {
            return m.clone();
        }
        let m = (ReadDoc::object_type(self.doc, obj) == Ok(ObjType::Map)).then(|| {
            std::rc::Rc::new(
                ReadDoc::map_range(self.doc, obj, ..)
                    .map(|item| {
                        let id = item.id();
                        let conflict = item.conflict;
                        (
                            item.key.into_owned(),
                            (Value::from(item.value), id, conflict),
                        )
                    })
                    .collect(),
            )
        });
        self.maps.borrow_mut().insert(obj.clone(), m.clone());
        m
    }

    /// Whether `key` of map `obj` holds concurrent values (`get_all`
    /// would return more than one).
    pub(crate) fn is_conflicted(&self, obj: &ObjId, key: &str) -> bool {
        self.map(obj)
            .and_then(|m| m.get(key).map(|(_, _, conflict)| *conflict))
            .unwrap_or(false)
    }
}

impl autosurgeon::ReadDoc for OnePass<'_> {
    type Parents<'b>
        = automerge::Parents<'b>
    where
        Self: 'b;

    fn get_heads(&self) -> Vec<automerge::ChangeHash> {
        self.doc.get_heads()
    }

    fn get<P: Into<automerge::Prop>>(
        &self,
        obj: &ObjId,
        prop: P,
    ) -> Result<Option<(Value<'_>, ObjId)>, automerge::AutomergeError> {
        match (prop.into(), self.map(obj)) {
            (automerge::Prop::Map(key), Some(map)) => {
                Ok(map.get(&key).map(|(v, id, _)| (v.clone(), id.clone())))
            }
            (other, _) => ReadDoc::get(self.doc, obj, other),
        }
    }

    fn object_type<O: AsRef<ObjId>>(&self, obj: O) -> Option<ObjType> {
        ReadDoc::object_type(self.doc, obj).ok()
    }

    fn map_range<'b, O, R>(&'b self, obj: O, range: R) -> automerge::iter::MapRange<'b>
    where
        R: std::ops::RangeBounds<String> + 'b,
        O: AsRef<ObjId>,
    {
        ReadDoc::map_range(self.doc, obj, range)
    }

    fn list_range<O: AsRef<ObjId>, R: std::ops::RangeBounds<usize>>(
        &self,
        obj: O,
        range: R,
    ) -> automerge::iter::ListRange<'_> {
        ReadDoc::list_range(self.doc, obj, range)
    }

    fn length<O: AsRef<ObjId>>(&self, obj: O) -> usize {
        ReadDoc::length(self.doc, obj)
    }

    fn text<O: AsRef<ObjId>>(&self, obj: O) -> Result<String, automerge::AutomergeError> {
        ReadDoc::text(self.doc, obj)
    }

    fn parents<O: AsRef<ObjId>>(
        &self,
        obj: O,
    ) -> Result<automerge::Parents<'_>, automerge::AutomergeError> {
        ReadDoc::parents(self.doc, obj)
    }

    fn is_empty(&self) -> bool {
        autosurgeon::ReadDoc::is_empty(self.doc)
    }
}

/// Every attachment entry, concatenating all list objects at `attachments`
/// (see the module docs for why there can be several). A missing key means
/// no attachments; anything but lists of well-typed maps is `Malformed`.
pub(crate) fn attachments(reader: &OnePass<'_>) -> Result<Vec<AttachmentRec>, CaseError> {
    let doc = reader.doc();
    let mut out = Vec::new();
    for (value, list) in doc.get_all(&automerge::ROOT, K_ATTACHMENTS)? {
        if !matches!(value, Value::Object(ObjType::List)) {
            return Err(CaseError::Malformed(format!(
                "'{K_ATTACHMENTS}' is not a List object"
            )));
        }
        for idx in 0..doc.length(&list) {
            let rec: AttachmentRec =
                autosurgeon::hydrate_prop(reader, &list, idx).map_err(|e| {
                    CaseError::Malformed(format!("attachment {} is not well-formed: {e}", idx + 1))
                })?;
            out.push(rec);
        }
    }
    Ok(out)
}

/// The id of the object of type `want` stored at `key` of `parent`.
pub(crate) fn child_obj<D: ReadDoc>(
    doc: &D,
    parent: &ObjId,
    key: &str,
    want: ObjType,
) -> Result<ObjId, CaseError> {
    match doc.get(parent, key)? {
        Some((Value::Object(t), id)) if t == want => Ok(id),
        Some(_) => Err(CaseError::Malformed(format!(
            "'{key}' is not a {want:?} object"
        ))),
        None => Err(CaseError::Malformed(format!("'{key}' is missing"))),
    }
}

/// The id of the map at index `idx` of `list`.
pub(crate) fn list_elem_map<D: ReadDoc>(
    doc: &D,
    list: &ObjId,
    idx: usize,
) -> Result<ObjId, CaseError> {
    match doc.get(list, idx)? {
        Some((Value::Object(ObjType::Map), id)) => Ok(id),
        _ => Err(CaseError::Malformed(format!(
            "list element {idx} is not a map"
        ))),
    }
}
