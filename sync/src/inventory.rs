//! The digest that lets two peers see that a case already matches without
//! exchanging any per-case message.
//!
//! A case's *heads hash* is a digest of its sorted Automerge heads: two
//! replicas hold the same history exactly when their heads are equal, so
//! equal heads hashes mean "nothing to do for this case".

use automerge::ChangeHash;
use sha2::{Digest, Sha256};

use crate::wire::{HeadsHash, HEADS_HASH_BYTES};

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
