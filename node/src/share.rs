//! The one place that decides which cases this node shares with a peer.
//!
//! Today every trusted peer sees every case. Scoped replication (a center
//! sharing only one village's cases with the laptop that serves it) will
//! change only this module: the session asks it for the inventory and for
//! every case it loads on the peer's behalf, so a case this policy excludes
//! is never listed to, nor sent to, that peer.

use crate::store::{CaseRow, PeerRow};

/// What one peer may see.
#[derive(Clone, Debug)]
pub struct SharePolicy {
    /// The peer this policy is for, kept so scoped rules can use it.
    pub peer_node_id: String,
}

impl SharePolicy {
    /// The policy for `peer`.
    pub fn for_peer(peer: &PeerRow) -> SharePolicy {
        SharePolicy {
            peer_node_id: peer.node_id.clone(),
        }
    }

    /// Whether the case in `row` may be listed to and sent to this peer.
    pub fn shares(&self, _row: &CaseRow) -> bool {
        true
    }

    /// Whether a case known only by code may be sent; used when the full
    /// row is not at hand. Must agree with [`SharePolicy::shares`].
    pub fn shares_code(&self, _code: &str) -> bool {
        true
    }
}
