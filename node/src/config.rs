//! Per-node settings kept in the store's `meta` table, so they survive
//! restarts and travel with the home folder.

use thiserror::Error;

use crate::blobs::DEFAULT_BLOB_MAX_BYTES;
use crate::store::{Store, StoreError};

/// Meta key of the largest accepted attachment, in bytes.
const META_BLOB_MAX: &str = "blob_max_bytes";
/// Meta key of the fetch policy.
const META_FETCH: &str = "fetch_policy";

/// Hard ceiling for `blob-max-mb`: beyond this a "document scan" is a
/// mistake, and a peer should not be able to make us accept it.
pub const BLOB_MAX_MB_CEILING: u64 = 4096;

/// Which attachment bytes a node downloads when it syncs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FetchPolicy {
    /// Every attachment of every case it holds (the center, and laptops
    /// that will be offline for days).
    All,
    /// Only metadata; bytes are fetched when a person opens a file
    /// (a fresh laptop on a weak link).
    OnDemand,
}

impl FetchPolicy {
    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            FetchPolicy::All => "all",
            FetchPolicy::OnDemand => "on-demand",
        }
    }
}

/// A setting name or value that is not valid.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// Unknown setting.
    #[error("unknown setting '{0}'; settings: blob-max-mb, fetch")]
    UnknownKey(String),
    /// Bad value.
    #[error("invalid value '{value}' for {key}: {reason}")]
    BadValue {
        /// The setting.
        key: String,
        /// The value given.
        value: String,
        /// What is allowed.
        reason: String,
    },
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The largest attachment this node accepts, from a file or a peer.
pub fn blob_max_bytes(store: &Store) -> Result<u64, StoreError> {
    Ok(store
        .meta_get(META_BLOB_MAX)?
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_BLOB_MAX_BYTES))
}

/// This node's fetch policy (default: all).
pub fn fetch_policy(store: &Store) -> Result<FetchPolicy, StoreError> {
    Ok(match store.meta_get(META_FETCH)?.as_deref() {
        Some(b"on-demand") => FetchPolicy::OnDemand,
        _ => FetchPolicy::All,
    })
}

/// Every setting with its current value, for `config show`.
pub fn show(store: &Store) -> Result<Vec<(String, String)>, StoreError> {
    Ok(vec![
        (
            "blob-max-mb".into(),
            (blob_max_bytes(store)? / (1024 * 1024)).to_string(),
        ),
        ("fetch".into(), fetch_policy(store)?.as_str().into()),
    ])
}

/// Changes a setting after validating it.
pub fn set(store: &mut Store, key: &str, value: &str) -> Result<(), ConfigError> {
    let bad = |reason: &str| ConfigError::BadValue {
        key: key.into(),
        value: value.into(),
        reason: reason.into(),
    };
    match key {
        "blob-max-mb" => {
            let mb: u64 = value
                .parse()
                .map_err(|_| bad("a whole number of megabytes"))?;
            if mb == 0 || mb > BLOB_MAX_MB_CEILING {
                return Err(bad(&format!("between 1 and {BLOB_MAX_MB_CEILING}")));
            }
            store.meta_set(META_BLOB_MAX, (mb * 1024 * 1024).to_string().as_bytes())?;
        }
        "fetch" => {
            if value != "all" && value != "on-demand" {
                return Err(bad("all or on-demand"));
            }
            store.meta_set(META_FETCH, value.as_bytes())?;
        }
        other => return Err(ConfigError::UnknownKey(other.into())),
    }
    Ok(())
}
