//! A node: one home folder holding an identity, a store and its peers.
//!
//! This is the facade the CLI, the demo and the tests use. Every write goes
//! through the store's transaction and returns only after its commit; then,
//! and only then, running sync processes are told (see [`crate::notify`]).

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use automerge::Automerge;
use thiserror::Error;

use crate::case::{self, Author, CaseError, CaseView, NewCase};
use crate::identity::{Identity, IdentityError, NodeId, NodeIdParseError};
use crate::store::{
    CaseRow, CreateError, ListFilter, PeerRow, Projection, Store, StoreError, UpdateError,
};

/// File name of the SQLite database inside a node home.
pub const DB_FILE: &str = "fieldcase.db";

/// Meta key holding the node's role.
const META_ROLE: &str = "role";
/// Meta key holding the node's name.
const META_NAME: &str = "name";

/// What a node is for. Both roles run the same protocol; the role is shown
/// to people and lets policy differ later.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A laptop carried to villages.
    Field,
    /// The commune service center.
    Center,
}

impl Role {
    /// The role as written on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Field => "field",
            Role::Center => "center",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = NodeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "field" => Ok(Role::Field),
            "center" => Ok(Role::Center),
            other => Err(NodeError::BadRole(other.to_string())),
        }
    }
}

/// Why a node operation failed.
#[derive(Debug, Error)]
pub enum NodeError {
    /// `init` has not been run for this home.
    #[error(
        "no fieldcase node in {0}; run `fieldcase init --name NAME --role field|center` first"
    )]
    NotInitialized(PathBuf),
    /// `init` was run twice.
    #[error("a fieldcase node already exists in {0}")]
    AlreadyInitialized(PathBuf),
    /// The role is not `field` or `center`.
    #[error("unknown role '{0}'; valid roles: field, center")]
    BadRole(String),
    /// No case has this code.
    #[error("no case with code {0}")]
    UnknownCase(String),
    /// A new case's code is already taken (the local counter was reset,
    /// for example by restoring an old backup).
    #[error("case code {0} is already taken; refusing to overwrite an existing case")]
    CodeTaken(String),
    /// The edited document failed validation; nothing was written.
    #[error("change refused: {0}")]
    Rejected(String),
    /// The stored copy of a case failed its integrity check on read.
    #[error("case {code} is damaged on this node ({reason}){}", if *.marked { "; it will be re-fetched from a peer at the next sync" } else { "" })]
    Damaged {
        /// The case.
        code: String,
        /// What was wrong.
        reason: String,
        /// Whether it was marked for repair by the next sync.
        marked: bool,
    },
    /// No trusted peer has this name.
    #[error("no trusted peer named '{0}'; see `fieldcase peer list`")]
    UnknownPeer(String),
    /// A peer ID did not parse.
    #[error("invalid node ID: {0}")]
    BadNodeId(#[from] NodeIdParseError),
    /// A peer would hand out case codes with our own prefix.
    #[error("peer {peer} has the case-code prefix {prefix}, which {other} already uses; codes would collide")]
    PrefixCollision {
        /// The peer being added.
        peer: String,
        /// The shared prefix.
        prefix: String,
        /// Who already has it.
        other: String,
    },
    /// No attachment of the case has that hash.
    #[error("case {code} has no attachment with hash {hash}; see `fieldcase case files {code}`")]
    NoSuchFile {
        /// The case.
        code: String,
        /// The hash or prefix given.
        hash: String,
    },
    /// A hash prefix matches several attachments.
    #[error("hash prefix {0} matches several attachments; give more characters")]
    AmbiguousFile(String),
    /// Attachment bytes could not be stored or read.
    #[error(transparent)]
    Blob(#[from] crate::blobs::BlobError),
    /// A setting was refused.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Keys or certificates failed.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// Local storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The case model refused the operation.
    #[error(transparent)]
    Case(#[from] CaseError),
    /// Creating the home folder failed.
    #[error("cannot create {path}: {source}")]
    Io {
        /// The folder.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// Milliseconds since the Unix epoch, the only clock reading a node takes
/// for case timestamps.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Projects a case document for the store's listing columns and blob
/// references (its attachments' `(hash, size)`, deduplicated, sorted by
/// hash), refusing documents that are not well-formed cases.
pub fn project(doc: &Automerge) -> Result<Projection, String> {
    case::view(doc)
        .map(projection_of)
        .map_err(|e| e.to_string())
}

/// [`project`] for a document that must be case `code`: one view checks
/// both (a peer must not file one case under another's code).
pub(crate) fn project_case(doc: &Automerge, code: &str) -> Result<Projection, String> {
    let v = case::view(doc).map_err(|e| e.to_string())?;
    if v.code != code {
        return Err(case::CaseError::CodeMismatch {
            expected: code.to_string(),
            found: v.code,
        }
        .to_string());
    }
    Ok(projection_of(v))
}

fn projection_of(v: case::CaseView) -> Projection {
    let mut blobs: Vec<crate::store::BlobRef> = v
        .attachments
        .into_iter()
        .map(|a| crate::store::BlobRef {
            hash: a.hash,
            size: a.size,
        })
        .collect();
    blobs.sort();
    blobs.dedup();
    Projection {
        procedure: v.procedure,
        status: v.status.as_str().to_string(),
        village: v.applicant.village,
        applicant: v.applicant.name,
        due_date: v.due_date,
        updated_at_ms: v.updated_at_ms,
        conflicts: v.conflicts.len() as i64,
        blobs,
    }
}

/// What a failed case creation means for the caller (shared by
/// [`Node::new_case`] and the batch creation in [`crate::bulk`]).
pub(crate) fn create_error(e: CreateError<CaseError>) -> NodeError {
    match e {
        CreateError::Make(e) => NodeError::Case(e),
        CreateError::Store(e) => NodeError::Store(e),
        CreateError::Exists(code) => NodeError::CodeTaken(code),
        CreateError::Rejected(reason) => NodeError::Rejected(reason),
    }
}

/// Opens the store of a node home.
pub fn open_store(home: &Path) -> Result<Store, NodeError> {
    Ok(Store::open(&home.join(DB_FILE), project)?)
}

/// An opened node.
pub struct Node {
    home: PathBuf,
    identity: Identity,
    /// Shared with [`crate::bulk`], which pages through codes from `&self`.
    pub(crate) store: Store,
    role: Role,
    /// Shared with [`crate::bulk`], which creates cases in batches.
    pub(crate) author: Author,
}

impl Node {
    /// Creates a node in `home`: key pair, certificate, empty store.
    pub fn init(home: &Path, name: &str, role: Role) -> Result<NodeId, NodeError> {
        if home.join(crate::identity::KEY_FILE).exists() {
            return Err(NodeError::AlreadyInitialized(home.to_path_buf()));
        }
        std::fs::create_dir_all(home).map_err(|source| NodeError::Io {
            path: home.to_path_buf(),
            source,
        })?;
        let identity = Identity::generate(name)?;
        let mut store = open_store(home)?;
        store.meta_set(META_NAME, name.as_bytes())?;
        store.meta_set(META_ROLE, role.as_str().as_bytes())?;
        // The key is written last: its presence is what marks the home as
        // initialised, so a crash mid-init can simply be retried.
        identity.save(home)?;
        Ok(identity.node_id())
    }

    /// Opens an initialised home.
    pub fn open(home: &Path) -> Result<Node, NodeError> {
        if !home.join(crate::identity::KEY_FILE).exists() {
            return Err(NodeError::NotInitialized(home.to_path_buf()));
        }
        let identity = Identity::load(home)?;
        let store = open_store(home)?;
        let role = match store.meta_get(META_ROLE)? {
            Some(bytes) => String::from_utf8_lossy(&bytes).parse()?,
            None => Role::Field,
        };
        let author = Author {
            actor: identity.node_id().actor_id(),
            node_id: identity.node_id().to_string(),
            name: identity.name().to_string(),
        };
        Ok(Node {
            home: home.to_path_buf(),
            identity,
            store,
            role,
            author,
        })
    }

    /// The home folder.
    pub fn home(&self) -> &Path {
        &self.home
    }
    /// This node's identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }
    /// This node's ID.
    pub fn node_id(&self) -> NodeId {
        self.identity.node_id()
    }
    /// This node's name.
    pub fn name(&self) -> &str {
        self.identity.name()
    }
    /// This node's role.
    pub fn role(&self) -> Role {
        self.role
    }
    /// Direct store access, for listing and status.
    pub fn store(&mut self) -> &mut Store {
        &mut self.store
    }

    /// Creates a case and returns its code, `PREFIX-NNNNNN`: the prefix
    /// comes from this node's ID and the number from a durable local
    /// counter, so two offline laptops can never hand out the same code.
    pub fn new_case(&mut self, new: &NewCase) -> Result<String, NodeError> {
        let prefix = self.node_id().short_prefix();
        let author = self.author.clone();
        let now = now_ms();
        let code = self
            .store
            .create_case(|seq| {
                let code = format!("{prefix}-{seq:06}");
                let doc = case::create(&code, new, &author, now)?;
                Ok::<_, CaseError>((code, doc))
            })
            .map_err(create_error)?;
        crate::notify::announce(&self.home, &code);
        Ok(code)
    }

    /// Applies one edit to a case inside a write transaction; returns after
    /// the commit.
    pub fn update<T>(
        &mut self,
        code: &str,
        f: impl FnOnce(&mut Automerge, &Author, i64) -> Result<T, CaseError>,
    ) -> Result<T, NodeError> {
        let author = self.author.clone();
        let now = now_ms();
        let out = self
            .store
            .update_case(code, |doc| f(doc, &author, now))
            .map_err(|e| match e {
                UpdateError::Store(StoreError::CorruptCase { code, reason }) => {
                    let marked = self.store.mark_damaged(&code).is_ok();
                    NodeError::Damaged {
                        code,
                        reason,
                        marked,
                    }
                }
                UpdateError::NotFound(code) => NodeError::UnknownCase(code),
                UpdateError::Op(e) => NodeError::Case(e),
                UpdateError::Rejected(reason) => NodeError::Rejected(reason),
                UpdateError::Store(e) => NodeError::Store(e),
            })?;
        crate::notify::announce(&self.home, code);
        Ok(out)
    }

    /// The full view of one case.
    pub fn show(&self, code: &str) -> Result<CaseView, NodeError> {
        let doc = self
            .load_checked(code)?
            .ok_or_else(|| NodeError::UnknownCase(code.to_string()))?;
        Ok(case::view(&doc)?)
    }

    /// Loads a case; a damaged stored copy is marked for repair from a peer
    /// and reported as such.
    pub(crate) fn load_checked(&self, code: &str) -> Result<Option<Automerge>, NodeError> {
        match self.store.load_case(code) {
            Err(StoreError::CorruptCase { code, reason }) => {
                // A second connection marks it: `show` takes `&self`.
                let marked = open_store(&self.home).and_then(|mut s| Ok(s.mark_damaged(&code)?));
                Err(NodeError::Damaged {
                    code,
                    reason,
                    marked: marked.is_ok(),
                })
            }
            other => Ok(other?),
        }
    }

    /// Cases matching a filter, from the projection table.
    pub fn list(&self, filter: &ListFilter) -> Result<Vec<CaseRow>, NodeError> {
        Ok(self.store.list(filter)?)
    }

    /// Trusts a peer. Refuses a peer whose case-code prefix equals ours or
    /// another peer's, since codes must never collide.
    pub fn add_peer(
        &mut self,
        node_id: &str,
        name: &str,
        addr: Option<&str>,
    ) -> Result<NodeId, NodeError> {
        let id: NodeId = node_id.parse()?;
        let prefix = id.short_prefix();
        if id != self.node_id() && prefix == self.node_id().short_prefix() {
            return Err(NodeError::PrefixCollision {
                peer: name.to_string(),
                prefix,
                other: "this node".into(),
            });
        }
        for peer in self.store.peers()? {
            if let Ok(other) = peer.node_id.parse::<NodeId>() {
                if other != id && other.short_prefix() == prefix {
                    return Err(NodeError::PrefixCollision {
                        peer: name.to_string(),
                        prefix,
                        other: format!("peer '{}'", peer.name),
                    });
                }
            }
        }
        self.store.add_peer(&id.to_string(), name, addr, now_ms())?;
        Ok(id)
    }

    /// Trusted peers.
    pub fn peers(&self) -> Result<Vec<PeerRow>, NodeError> {
        Ok(self.store.peers()?)
    }

    /// A trusted peer by name.
    pub fn peer(&self, name: &str) -> Result<PeerRow, NodeError> {
        self.store
            .peer_by_name(name)?
            .ok_or_else(|| NodeError::UnknownPeer(name.to_string()))
    }
}
