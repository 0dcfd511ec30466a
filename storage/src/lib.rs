//! Object storage for runctl: the [`ObjectStore`] interface that data pulls, checkpoint
//! pushes and the user's own transfers are written against, its two backends (S3 through
//! aws-sdk-s3, and a local directory: the embedded default that needs no cloud account),
//! and the parallel transfer engine ([`transfer`]) on top of it.
//!
//! The interface is the S3 object model at the level of single requests (HEAD, ranged GET,
//! PUT, multipart upload, paginated LIST, DELETE), so the engine decides parallelism, part
//! sizes, retries and integrity once, for both backends.

pub mod checkpoints;
mod config;
pub mod dns;
pub mod handed;
mod local;
mod s3;
pub mod transfer;
mod url;

pub use config::{Connection, StoreConfig, aws_sdk_config, connect, connect_handed, connect_with};
pub use local::LocalStore;
pub use s3::S3Store;
pub use url::{ObjectUrl, relative_key};

use std::ops::Range;
use std::time::Duration;

use bytes::Bytes;

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The key is empty, absolute, or would escape the store (`..`, empty segments).
    #[error(
        "{key:?} is not a valid object key: use relative '/'-separated names without '..' or empty segments"
    )]
    InvalidKey { key: String },
    /// Not an `s3://bucket/key` URL.
    #[error("{url:?} is not an object URL: {reason} (expected s3://BUCKET/KEY-OR-PREFIX)")]
    InvalidUrl { url: String, reason: String },
    /// No object has this key.
    #[error("no object at {key:?}")]
    NotFound { key: String },
    /// The bucket does not exist.
    #[error("bucket {bucket:?} does not exist (create it, or check the name and endpoint)")]
    NoSuchBucket { bucket: String },
    /// The store refused the credentials or the request.
    #[error("access denied: {message} (check the credentials and the bucket's policy)")]
    AccessDenied { message: String },
    /// No credentials could be found.
    #[error(
        "no credentials for the object store: {message} (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run where an instance profile applies)"
    )]
    NoCredentials { message: String },
    /// The object changed while it was being read (its ETag moved).
    #[error("{key:?} changed while it was being transferred")]
    Changed { key: String },
    /// A local file changed while it was being uploaded; nothing was created from it.
    #[error("{path} changed while it was being uploaded")]
    SourceChanged { path: String },
    /// Bytes did not match what was expected.
    #[error("integrity check failed for {what}: {detail}")]
    Integrity { what: String, detail: String },
    /// A local file or directory could not be used.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The service failed; `retryable` says whether the same request may succeed later.
    #[error("{context}: {message}")]
    Service {
        context: String,
        message: String,
        retryable: bool,
    },
}

impl StoreError {
    /// Whether the same request may succeed if tried again (a dropped connection, a
    /// timeout, a 5xx, throttling).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Service {
                retryable: true,
                ..
            }
        )
    }

    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
        let context = context.into();
        move |source| StoreError::Io { context, source }
    }
}

/// What a listing or a HEAD reports about one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
    /// Changes whenever the object's content is replaced; pins ranged reads to one version.
    pub etag: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub modified_ms: Option<i64>,
}

/// An object's bytes as they arrived: possibly several chunks, never copied into one
/// buffer unless asked (`into_bytes`), so a download writes them straight to its file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Body(Vec<Bytes>);

impl Body {
    pub fn from_chunks(chunks: Vec<Bytes>) -> Self {
        Body(chunks)
    }

    pub fn len(&self) -> u64 {
        self.0.iter().map(|c| c.len() as u64).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes in one buffer (a copy only when they arrived in several chunks).
    pub fn into_bytes(mut self) -> Bytes {
        match self.0.len() {
            0 => Bytes::new(),
            1 => self.0.pop().expect("one chunk"),
            _ => Bytes::from(self.0.concat()),
        }
    }

    /// Writes the bytes to `file` starting at `offset`.
    pub fn write_all_at(&self, file: &std::fs::File, mut offset: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        for chunk in &self.0 {
            file.write_all_at(chunk, offset)?;
            offset += chunk.len() as u64;
        }
        Ok(())
    }
}

impl From<Bytes> for Body {
    fn from(bytes: Bytes) -> Self {
        Body(vec![bytes])
    }
}

/// A part of a multipart upload, as the store acknowledged it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// From 1.
    pub number: u32,
    pub etag: String,
    /// The part's CRC32 as the store verified it on receipt, where the backend uses one.
    pub checksum_crc32: Option<String>,
}

/// One page-merged listing: objects under a prefix and, with a delimiter, the common
/// prefixes ("directories") one level down.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    pub objects: Vec<ObjectMeta>,
    pub prefixes: Vec<String>,
}

/// A flat key space of immutable objects (one bucket). Every write is atomic: a reader
/// sees the whole new object or none of it; a multipart upload appears only when
/// completed.
pub trait ObjectStore: Send + Sync {
    /// The object at `key`, if there is one.
    fn head(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Option<ObjectMeta>, StoreError>> + Send;
    /// Bytes `range` of the object (the whole object when `None`); with `etag`, fails with
    /// `Changed` if the object is no longer that version.
    fn get(
        &self,
        key: &str,
        range: Option<Range<u64>>,
        etag: Option<&str>,
    ) -> impl Future<Output = Result<Body, StoreError>> + Send;
    /// Writes bytes `range` of the object into `file` at `offset` as they arrive (memory
    /// stays small whatever the range); with `etag`, fails with `Changed` if the object is no
    /// longer that version. Answers the number of bytes written, which is the range's length.
    fn get_into(
        &self,
        key: &str,
        range: Range<u64>,
        etag: Option<&str>,
        file: std::sync::Arc<std::fs::File>,
        offset: u64,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// Stores `body` under `key` in one request.
    fn put(&self, key: &str, body: Bytes) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Starts a multipart upload; the answer is its id.
    fn create_upload(&self, key: &str) -> impl Future<Output = Result<String, StoreError>> + Send;
    /// Uploads part `number` (from 1) of an upload.
    fn upload_part(
        &self,
        key: &str,
        upload: &str,
        number: u32,
        body: Bytes,
    ) -> impl Future<Output = Result<Part, StoreError>> + Send;
    /// Makes the object out of `parts`, in order.
    fn complete_upload(
        &self,
        key: &str,
        upload: &str,
        parts: Vec<Part>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Discards an unfinished upload and its parts.
    fn abort_upload(
        &self,
        key: &str,
        upload: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Every object whose key starts with `prefix`, sorted by key, all pages; with
    /// `delimited`, only one level (deeper keys are summarised as `prefixes`).
    fn list(
        &self,
        prefix: &str,
        delimited: bool,
    ) -> impl Future<Output = Result<Listing, StoreError>> + Send;
    /// Removes the object at `key`; removing a missing object is not an error.
    fn delete(&self, key: &str) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// A store of either backend, chosen by configuration.
#[derive(Debug, Clone)]
pub enum Store {
    Local(LocalStore),
    S3(S3Store),
}

impl Store {
    /// A short-lived URL that GETs `key` without credentials; S3 only (a local directory
    /// has no URL a remote host could use).
    pub async fn presign_get(&self, key: &str, ttl: Duration) -> Result<String, StoreError> {
        match self {
            Store::S3(store) => store.presign_get(key, ttl).await,
            Store::Local(_) => Err(StoreError::Service {
                context: format!("a URL for {key}"),
                message: "the local store has no URL a remote instance could fetch from; use [storage] backend = \"s3\"".into(),
                retryable: false,
            }),
        }
    }
}

impl ObjectStore for Store {
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StoreError> {
        match self {
            Store::Local(s) => s.head(key).await,
            Store::S3(s) => s.head(key).await,
        }
    }
    async fn get(
        &self,
        key: &str,
        range: Option<Range<u64>>,
        etag: Option<&str>,
    ) -> Result<Body, StoreError> {
        match self {
            Store::Local(s) => s.get(key, range, etag).await,
            Store::S3(s) => s.get(key, range, etag).await,
        }
    }
    async fn get_into(
        &self,
        key: &str,
        range: Range<u64>,
        etag: Option<&str>,
        file: std::sync::Arc<std::fs::File>,
        offset: u64,
    ) -> Result<u64, StoreError> {
        match self {
            Store::Local(s) => s.get_into(key, range, etag, file, offset).await,
            Store::S3(s) => s.get_into(key, range, etag, file, offset).await,
        }
    }
    async fn put(&self, key: &str, body: Bytes) -> Result<(), StoreError> {
        match self {
            Store::Local(s) => s.put(key, body).await,
            Store::S3(s) => s.put(key, body).await,
        }
    }
    async fn create_upload(&self, key: &str) -> Result<String, StoreError> {
        match self {
            Store::Local(s) => s.create_upload(key).await,
            Store::S3(s) => s.create_upload(key).await,
        }
    }
    async fn upload_part(
        &self,
        key: &str,
        upload: &str,
        number: u32,
        body: Bytes,
    ) -> Result<Part, StoreError> {
        match self {
            Store::Local(s) => s.upload_part(key, upload, number, body).await,
            Store::S3(s) => s.upload_part(key, upload, number, body).await,
        }
    }
    async fn complete_upload(
        &self,
        key: &str,
        upload: &str,
        parts: Vec<Part>,
    ) -> Result<(), StoreError> {
        match self {
            Store::Local(s) => s.complete_upload(key, upload, parts).await,
            Store::S3(s) => s.complete_upload(key, upload, parts).await,
        }
    }
    async fn abort_upload(&self, key: &str, upload: &str) -> Result<(), StoreError> {
        match self {
            Store::Local(s) => s.abort_upload(key, upload).await,
            Store::S3(s) => s.abort_upload(key, upload).await,
        }
    }
    async fn list(&self, prefix: &str, delimited: bool) -> Result<Listing, StoreError> {
        match self {
            Store::Local(s) => s.list(prefix, delimited).await,
            Store::S3(s) => s.list(prefix, delimited).await,
        }
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self {
            Store::Local(s) => s.delete(key).await,
            Store::S3(s) => s.delete(key).await,
        }
    }
}

/// Runs blocking file work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Io {
            context: "storage worker thread".into(),
            source: std::io::Error::other(e.to_string()),
        })?
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
