//! The node facade for attachments: put a file in the blob store, record
//! it on the case, list a case's files, and write one out verified.
//!
//! The bytes are made durable in the blob store *before* the case document
//! refers to them, so a case never points at bytes this node lost.

use std::path::Path;

use crate::blobs::{hash_hex, parse_hash, BlobError, BlobStore};
use crate::case::{self, AttachmentMeta};
use crate::config;
use crate::node::{Node, NodeError};

/// One attachment as `case files` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FileEntry {
    /// The attachment's metadata from the case document.
    #[serde(flatten)]
    pub meta: case::Attachment,
    /// `present`, `partial` (an interrupted download is kept) or `missing`.
    pub local: &'static str,
    /// Bytes held locally (the size when present).
    pub local_bytes: u64,
}

impl Node {
    /// The node's blob store.
    pub fn blobs(&self) -> Result<BlobStore, NodeError> {
        Ok(BlobStore::open(self.home())?)
    }

    /// Stores `file` and attaches it to `item` of case `code`; marks the
    /// item received if it was missing. Refuses files over the node's
    /// limit before reading them. Returns the metadata recorded.
    pub fn attach_file(
        &mut self,
        code: &str,
        item: &str,
        file: &Path,
        note: &str,
    ) -> Result<case::Attachment, NodeError> {
        // Check the case and item first, so a typo does not copy 20 MB.
        let view = self.show(code)?;
        let proc = case::procedure(&view.procedure)?;
        if proc.item(item).is_none() {
            return Err(case::CaseError::UnknownItem {
                item: item.to_string(),
                valid: proc.checklist.iter().map(|i| i.id.to_string()).collect(),
            }
            .into());
        }
        let max = config::blob_max_bytes(self.store())?;
        let info = self.blobs()?.import_file(file, max)?;
        let meta = AttachmentMeta {
            hash: hash_hex(&info.hash),
            size: info.size,
            media_type: info.media_type,
            name: file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "file".into()),
            item: item.to_string(),
            note: note.to_string(),
        };
        self.update(code, |doc, a, now| case::attach(doc, &meta, true, a, now))?;
        let view = self.show(code)?;
        view.attachments
            .into_iter()
            .rev()
            .find(|f| f.hash == meta.hash && f.item == meta.item)
            .ok_or_else(|| NodeError::UnknownCase(code.to_string()))
    }

    /// A case's attachments and whether their bytes are here.
    pub fn files(&self, code: &str) -> Result<Vec<FileEntry>, NodeError> {
        let blobs = self.blobs()?;
        Ok(self
            .show(code)?
            .attachments
            .into_iter()
            .map(|meta| {
                let (local, local_bytes) = match parse_hash(&meta.hash) {
                    Ok(h) if blobs.has(&h) => ("present", meta.size),
                    Ok(h) if blobs.partial_len(&h) > 0 => ("partial", blobs.partial_len(&h)),
                    _ => ("missing", 0),
                };
                FileEntry {
                    meta,
                    local,
                    local_bytes,
                }
            })
            .collect())
    }

    /// Finds an attachment of `code` by its full hash or a unique prefix
    /// of at least 8 characters.
    pub fn find_file(&self, code: &str, hash_prefix: &str) -> Result<case::Attachment, NodeError> {
        let prefix = hash_prefix.to_ascii_lowercase();
        if prefix.len() < 8 || !prefix.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(NodeError::Blob(BlobError::BadHash(hash_prefix.to_string())));
        }
        let mut matches: Vec<case::Attachment> = self
            .show(code)?
            .attachments
            .into_iter()
            .filter(|a| a.hash.starts_with(&prefix))
            .collect();
        matches.dedup_by(|a, b| a.hash == b.hash);
        match matches.len() {
            1 => Ok(matches.remove(0)),
            0 => Err(NodeError::NoSuchFile {
                code: code.to_string(),
                hash: hash_prefix.to_string(),
            }),
            _ => Err(NodeError::AmbiguousFile(hash_prefix.to_string())),
        }
    }
}
