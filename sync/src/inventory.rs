//! Digests that let two peers find which cases differ without exchanging
//! any per-case message for cases that already match.
//!
//! A case's *heads hash* is a digest of its sorted Automerge heads: two
//! replicas hold the same history exactly when their heads are equal, so
//! equal heads hashes mean "nothing to do for this case". The *root* hashes
//! the whole sorted inventory, so a reconnect where nothing changed costs
//! one small message each way.

use automerge::ChangeHash;
use sha2::{Digest, Sha256};

use crate::wire::{CaseId, HeadsHash, HEADS_HASH_BYTES};

/// Digest of a set of heads; order-insensitive.
pub fn heads_hash(heads: &[ChangeHash]) -> HeadsHash {
    let mut sorted: Vec<&ChangeHash> = heads.iter().collect();
    sorted.sort();
    let mut h = Sha256::new();
    for head in sorted {
        h.update(head.0);
    }
    let full = h.finalize();
    let mut out = [0u8; HEADS_HASH_BYTES];
    out.copy_from_slice(&full[..HEADS_HASH_BYTES]);
    out
}

/// Root digest over an inventory that is already sorted by case id.
pub fn root_hash(entries: &[(CaseId, HeadsHash)]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((entries.len() as u64).to_be_bytes());
    for (id, hash) in entries {
        h.update([id.as_str().len() as u8]);
        h.update(id.as_str().as_bytes());
        h.update(hash);
    }
    h.finalize().into()
}
