//! Object storage for runctl: the [`ObjectStore`] interface that data pulls and checkpoint
//! pushes are written against, and its backends. This crate holds the local-directory
//! backend (the embedded default, needing no cloud account); the S3 backend joins it with
//! the storage work.

mod local;

pub use local::LocalStore;

use std::path::Path;

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The key is empty, absolute, or would escape the store (`..`, empty segments).
    #[error(
        "{key:?} is not a valid object key: use relative '/'-separated names without '..' or empty segments"
    )]
    InvalidKey { key: String },
    /// No object has this key.
    #[error("no object at {key:?}")]
    NotFound { key: String },
    /// The backend failed; the message names the path or key.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// What a listing or a HEAD reports about one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size_bytes: u64,
}

/// A flat key space of immutable objects. Writes are atomic: a reader sees the whole new
/// object or none of it, never part of one.
pub trait ObjectStore: Send + Sync {
    /// Stores the file at `src` under `key`, replacing any object there.
    fn put_file(
        &self,
        key: &str,
        src: &Path,
    ) -> impl Future<Output = Result<ObjectInfo, StoreError>> + Send;
    /// Writes the object at `key` to `dest`, atomically.
    fn get_file(
        &self,
        key: &str,
        dest: &Path,
    ) -> impl Future<Output = Result<ObjectInfo, StoreError>> + Send;
    /// The object at `key`, if there is one.
    fn head(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Option<ObjectInfo>, StoreError>> + Send;
    /// Every object whose key starts with `prefix`, sorted by key.
    fn list(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<Vec<ObjectInfo>, StoreError>> + Send;
    /// Removes the object at `key`; removing a missing object is not an error.
    fn delete(&self, key: &str) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// Checks that `key` is a relative, '/'-separated name that stays inside the store.
pub fn validate_key(key: &str) -> Result<(), StoreError> {
    let bad = key.is_empty()
        || key.starts_with('/')
        || key.contains('\\')
        || key.contains('\0')
        || key
            .split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == "..");
    if bad {
        Err(StoreError::InvalidKey {
            key: key.to_owned(),
        })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(key: &str, valid: bool) {
        assert_eq!(validate_key(key).is_ok(), valid, "{key:?}");
    }

    #[test]
    fn keys() {
        check("runs/run-1/ckpt-1.pt", true);
        check("a", true);
        check("", false);
        check("/abs", false);
        check("a/../b", false);
        check("..", false);
        check("a//b", false);
        check("a/./b", false);
        check("a/", false);
        check("a\\b", false);
    }
}
