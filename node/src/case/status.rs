//! Case statuses, checklist document states, and the status fold.
//!
//! Status is never stored as a scalar in the case document: two offline
//! laptops writing a `status` key would produce an Automerge conflict and one
//! of the moves would silently vanish. Instead each move is appended to the
//! `status_events` list and the status is *derived* by [`fold`], which every
//! replica evaluates over the same list order and therefore agrees on.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::CaseError;

/// Where a case is in the workflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Taken in (the initial status of every case).
    Received,
    /// Waiting for the citizen to bring missing or corrected documents.
    NeedsDocuments,
    /// Being handled by the center.
    Processing,
    /// The result (certificate, card...) is ready for pick-up.
    ResultReady,
    /// Handed to the citizen. Terminal.
    Delivered,
    /// Refused. Terminal.
    Rejected,
}

impl Status {
    /// Every status, in rank order.
    pub const ALL: [Status; 6] = [
        Status::Received,
        Status::NeedsDocuments,
        Status::Processing,
        Status::ResultReady,
        Status::Delivered,
        Status::Rejected,
    ];

    /// The stable kebab-case name stored in documents and used by the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Received => "received",
            Status::NeedsDocuments => "needs-documents",
            Status::Processing => "processing",
            Status::ResultReady => "result-ready",
            Status::Delivered => "delivered",
            Status::Rejected => "rejected",
        }
    }

    /// Rank used to settle *concurrent* moves: a concurrent move only wins if
    /// it goes further along, so merging never sends a case backwards.
    pub fn rank(self) -> u8 {
        match self {
            Status::Received => 0,
            Status::NeedsDocuments => 1,
            Status::Processing => 2,
            Status::ResultReady => 3,
            Status::Delivered => 4,
            Status::Rejected => 5,
        }
    }

    /// Delivered and rejected cases never move again.
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Delivered | Status::Rejected)
    }

    /// Whether `self -> to` is an edge of the workflow graph, ignoring the
    /// checklist precondition (which [`super::change_status`] checks).
    pub fn can_move_to(self, to: Status) -> bool {
        use Status::*;
        matches!(
            (self, to),
            (Received, NeedsDocuments | Processing | Rejected)
                | (NeedsDocuments, Received | Processing | Rejected)
                | (Processing, ResultReady | NeedsDocuments | Rejected)
                | (ResultReady, Delivered)
        )
    }

    /// The statuses reachable from `self` in one move.
    pub fn next_statuses(self) -> Vec<Status> {
        Status::ALL
            .into_iter()
            .filter(|s| self.can_move_to(*s))
            .collect()
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = CaseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Status::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| CaseError::InvalidValue {
                field: "status".into(),
                reason: format!(
                    "unknown status '{s}'; valid statuses: {}",
                    Status::ALL.map(Status::as_str).join(", ")
                ),
            })
    }
}

/// State of one checklist document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DocState {
    /// The officer has the document and it is acceptable.
    Received,
    /// Not brought yet (initial state of every item).
    Missing,
    /// Brought but unusable (expired, illegible, wrong person...).
    Invalid,
}

impl DocState {
    /// Every state.
    pub const ALL: [DocState; 3] = [DocState::Received, DocState::Missing, DocState::Invalid];

    /// The stable name stored in documents and used by the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            DocState::Received => "received",
            DocState::Missing => "missing",
            DocState::Invalid => "invalid",
        }
    }
}

impl fmt::Display for DocState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DocState {
    type Err = CaseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DocState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| CaseError::InvalidValue {
                field: "document state".into(),
                reason: format!(
                    "unknown document state '{s}'; valid states: {}",
                    DocState::ALL.map(DocState::as_str).join(", ")
                ),
            })
    }
}

/// Fold status events (in document list order) into the current status.
///
/// Rules, identical on every replica because Automerge list order is:
/// - start at `received`;
/// - an event whose `from` is the current status is a sequential move and
///   applies if it is an edge of the workflow graph (it may go "backwards"
///   on purpose, e.g. processing → needs-documents);
/// - an event whose `from` differs was made concurrently with the moves before
///   it; it applies only if its target ranks higher than the current status,
///   so a stale concurrent move never drags a case back;
/// - events that do not apply stay in history with `applied == false`.
///
/// Returns the status and, per event, whether it applied.
pub fn fold(events: &[(Status, Status)]) -> (Status, Vec<bool>) {
    let mut current = Status::Received;
    let mut applied = Vec::with_capacity(events.len());
    for &(from, to) in events {
        let ok = if from == current {
            current.can_move_to(to)
        } else {
            to.rank() > current.rank()
        };
        if ok {
            current = to;
        }
        applied.push(ok);
    }
    (current, applied)
}

#[cfg(test)]
mod tests {
    use super::Status::*;
    use super::*;

    #[test]
    fn names_round_trip_and_errors_list_valid_values() {
        for s in Status::ALL {
            assert_eq!(s.as_str().parse::<Status>().unwrap(), s);
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
        let err = "done".parse::<Status>().unwrap_err().to_string();
        assert!(
            err.contains("result-ready") && err.contains("done"),
            "{err}"
        );
        for d in DocState::ALL {
            assert_eq!(d.as_str().parse::<DocState>().unwrap(), d);
        }
        let err = "lost".parse::<DocState>().unwrap_err().to_string();
        assert!(err.contains("missing"), "{err}");
    }

    #[test]
    fn sequential_moves_may_go_backwards_on_purpose() {
        let (s, a) = fold(&[
            (Received, Processing),
            (Processing, NeedsDocuments),
            (NeedsDocuments, Processing),
        ]);
        assert_eq!(s, Processing);
        assert_eq!(a, vec![true, true, true]);
    }

    #[test]
    fn concurrent_lower_move_is_superseded_higher_move_wins() {
        // Laptop A moved to processing; laptop B, not knowing, asked for documents.
        let (s, a) = fold(&[(Received, Processing), (Received, NeedsDocuments)]);
        assert_eq!((s, a), (Processing, vec![true, false]));
        // Other list order: B's move first, then A's concurrent higher move wins.
        let (s, a) = fold(&[(Received, NeedsDocuments), (Received, Processing)]);
        assert_eq!((s, a), (Processing, vec![true, true]));
    }

    #[test]
    fn illegal_sequential_event_from_a_peer_is_ignored() {
        let (s, a) = fold(&[(Received, Delivered)]);
        assert_eq!((s, a), (Received, vec![false]));
    }
}
