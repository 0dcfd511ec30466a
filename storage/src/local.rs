//! The local-directory backend: a bucket is a directory, each object a file in it. Every
//! write goes to a temporary name inside the bucket and is renamed into place, so a reader
//! never sees part of an object; a multipart upload keeps its parts in a directory of its
//! own until it is completed. Writes create the bucket's directory; reads of a missing one
//! fail as `NoSuchBucket`, as S3 does.

use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use bytes::Bytes;

use crate::{Body, Listing, ObjectMeta, ObjectStore, Part, StoreError, blocking, validate_key};

/// Names the store uses for itself start with this and are never listed.
const RESERVED_PREFIX: &str = ".runctl-";
const UPLOADS_DIR: &str = ".runctl-uploads";

/// One bucket of a local-directory store.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
    bucket: String,
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
    StoreError::io(context)
}

fn random_id() -> String {
    hex::encode(rand::random::<[u8; 12]>())
}

impl LocalStore {
    /// The bucket whose objects are the files under `root`.
    pub fn new(root: impl Into<PathBuf>, bucket: &str) -> Self {
        LocalStore {
            root: root.into(),
            bucket: bucket.to_owned(),
        }
    }

    fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        validate_key(key)?;
        if key.split('/').any(|seg| seg.starts_with(RESERVED_PREFIX)) {
            return Err(StoreError::InvalidKey {
                key: key.to_owned(),
            });
        }
        Ok(self.root.join(key))
    }

    fn check_bucket(&self) -> Result<(), StoreError> {
        if self.root.is_dir() {
            Ok(())
        } else {
            Err(StoreError::NoSuchBucket {
                bucket: self.bucket.clone(),
            })
        }
    }

    fn upload_dir(&self, upload: &str) -> Result<PathBuf, StoreError> {
        if upload.is_empty() || !upload.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(StoreError::Service {
                context: "multipart upload".into(),
                message: format!("no upload {upload:?}"),
                retryable: false,
            });
        }
        Ok(self.root.join(UPLOADS_DIR).join(upload))
    }

    /// Writes `chunks` to a temporary file in the bucket, syncs it and renames it to `dest`.
    fn write_atomic(
        &self,
        dest: &Path,
        chunks: &[&Path],
        body: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let dir = dest.parent().unwrap_or(&self.root);
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        let tmp = self
            .root
            .join(format!("{RESERVED_PREFIX}tmp-{}", random_id()));
        let result = (|| {
            let mut file =
                std::fs::File::create(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
            if let Some(body) = body {
                std::io::Write::write_all(&mut file, body)
                    .map_err(io(format!("writing {}", tmp.display())))?;
            }
            for chunk in chunks {
                let mut part = std::fs::File::open(chunk)
                    .map_err(io(format!("opening {}", chunk.display())))?;
                std::io::copy(&mut part, &mut file)
                    .map_err(io(format!("writing {}", tmp.display())))?;
            }
            file.sync_all()
                .map_err(io(format!("syncing {}", tmp.display())))?;
            std::fs::rename(&tmp, dest).map_err(io(format!("renaming into {}", dest.display())))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Opens the object at `path` for reading `range` of it (the whole object when
    /// `None`), checking its version against `etag` and the range against its size.
    fn open_range(
        path: &Path,
        key: String,
        etag: Option<String>,
        range: Option<Range<u64>>,
    ) -> Result<(std::fs::File, Range<u64>), StoreError> {
        let file = match std::fs::File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound { key });
            }
            Err(e) => return Err(io(format!("opening {}", path.display()))(e)),
        };
        let meta = file
            .metadata()
            .map_err(io(format!("reading {}", path.display())))?;
        if let Some(etag) = etag
            && Self::meta_of(&key, &meta).etag.as_deref() != Some(etag.as_str())
        {
            return Err(StoreError::Changed { key });
        }
        let range = range.unwrap_or(0..meta.len());
        if range.end > meta.len() || range.start > range.end {
            return Err(StoreError::Service {
                context: format!("reading {key}"),
                message: format!(
                    "range {range:?} is outside the object ({} bytes)",
                    meta.len()
                ),
                retryable: false,
            });
        }
        Ok((file, range))
    }

    fn meta_of(key: &str, meta: &std::fs::Metadata) -> ObjectMeta {
        let modified = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok());
        ObjectMeta {
            key: key.to_owned(),
            size: meta.len(),
            etag: Some(format!(
                "{:x}-{:x}",
                meta.len(),
                modified.map(|d| d.as_nanos()).unwrap_or(0)
            )),
            modified_ms: modified.map(|d| d.as_millis() as i64),
        }
    }
}

impl ObjectStore for LocalStore {
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StoreError> {
        let path = self.path(key)?;
        self.check_bucket()?;
        match tokio::fs::metadata(&path).await {
            Ok(meta) if meta.is_file() => Ok(Some(Self::meta_of(key, &meta))),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            // A key below an existing object's name.
            Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => Ok(None),
            Err(e) => Err(io(format!("reading {}", path.display()))(e)),
        }
    }

    async fn get(
        &self,
        key: &str,
        range: Option<Range<u64>>,
        etag: Option<&str>,
    ) -> Result<Body, StoreError> {
        let path = self.path(key)?;
        self.check_bucket()?;
        let (key, etag) = (key.to_owned(), etag.map(str::to_owned));
        blocking(move || {
            let (file, range) = Self::open_range(&path, key, etag, range)?;
            let mut buf = vec![0u8; (range.end - range.start) as usize];
            file.read_exact_at(&mut buf, range.start)
                .map_err(io(format!("reading {}", path.display())))?;
            Ok(Body::from(Bytes::from(buf)))
        })
        .await
    }

    async fn get_into(
        &self,
        key: &str,
        range: Range<u64>,
        etag: Option<&str>,
        file: std::sync::Arc<std::fs::File>,
        offset: u64,
    ) -> Result<u64, StoreError> {
        let path = self.path(key)?;
        self.check_bucket()?;
        let (key, etag) = (key.to_owned(), etag.map(str::to_owned));
        blocking(move || {
            let (src, range) = Self::open_range(&path, key, etag, Some(range))?;
            let mut buf = vec![0u8; (range.end - range.start).min(1 << 20) as usize];
            let mut done = 0;
            while done < range.end - range.start {
                let n = buf.len().min((range.end - range.start - done) as usize);
                src.read_exact_at(&mut buf[..n], range.start + done)
                    .map_err(io(format!("reading {}", path.display())))?;
                file.write_all_at(&buf[..n], offset + done)
                    .map_err(io("writing the download"))?;
                done += n as u64;
            }
            Ok(done)
        })
        .await
    }

    async fn put(&self, key: &str, body: Bytes) -> Result<(), StoreError> {
        let dest = self.path(key)?;
        let this = self.clone();
        blocking(move || this.write_atomic(&dest, &[], Some(&body))).await
    }

    async fn create_upload(&self, key: &str) -> Result<String, StoreError> {
        self.path(key)?;
        let id = random_id();
        let dir = self.upload_dir(&id)?;
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(io(format!("creating {}", dir.display())))?;
        Ok(id)
    }

    async fn upload_part(
        &self,
        key: &str,
        upload: &str,
        number: u32,
        body: Bytes,
    ) -> Result<Part, StoreError> {
        self.path(key)?;
        let dir = self.upload_dir(upload)?;
        let etag = blake3::hash(&body).to_hex()[..16].to_owned();
        blocking(move || {
            if !dir.is_dir() {
                return Err(StoreError::Service {
                    context: "multipart upload".into(),
                    message: "the upload was completed or aborted".into(),
                    retryable: false,
                });
            }
            let tmp = dir.join(format!("{number}.{}", random_id()));
            std::fs::write(&tmp, &body).map_err(io(format!("writing {}", tmp.display())))?;
            std::fs::rename(&tmp, dir.join(number.to_string()))
                .map_err(io(format!("writing part {number}")))?;
            Ok(())
        })
        .await?;
        Ok(Part {
            number,
            etag,
            checksum_crc32: None,
        })
    }

    async fn complete_upload(
        &self,
        key: &str,
        upload: &str,
        parts: Vec<Part>,
    ) -> Result<(), StoreError> {
        let dest = self.path(key)?;
        let dir = self.upload_dir(upload)?;
        let this = self.clone();
        blocking(move || {
            let paths: Vec<PathBuf> = parts
                .iter()
                .map(|p| dir.join(p.number.to_string()))
                .collect();
            let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
            this.write_atomic(&dest, &refs, None)?;
            let _ = std::fs::remove_dir_all(&dir);
            Ok(())
        })
        .await
    }

    async fn abort_upload(&self, _key: &str, upload: &str) -> Result<(), StoreError> {
        let dir = self.upload_dir(upload)?;
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(format!("removing {}", dir.display()))(e)),
        }
    }

    async fn list(&self, prefix: &str, delimited: bool) -> Result<Listing, StoreError> {
        self.check_bucket()?;
        let root = self.root.clone();
        let prefix = prefix.to_owned();
        blocking(move || {
            let mut objects = Vec::new();
            let mut dirs = vec![(root, String::new())];
            while let Some((dir, key_prefix)) = dirs.pop() {
                let entries = match std::fs::read_dir(&dir) {
                    Ok(entries) => entries,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io(format!("listing {}", dir.display()))(e)),
                };
                for entry in entries {
                    let entry = entry.map_err(io(format!("listing {}", dir.display())))?;
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if name.starts_with(RESERVED_PREFIX) {
                        continue;
                    }
                    let key = format!("{key_prefix}{name}");
                    let meta = entry
                        .metadata()
                        .map_err(io(format!("reading {}", entry.path().display())))?;
                    if meta.is_dir() {
                        let dir_key = format!("{key}/");
                        if dir_key.starts_with(&prefix) || prefix.starts_with(&dir_key) {
                            dirs.push((entry.path(), dir_key));
                        }
                    } else if meta.is_file() && key.starts_with(&prefix) {
                        objects.push(Self::meta_of(&key, &meta));
                    }
                }
            }
            objects.sort_by(|a, b| a.key.cmp(&b.key));
            if !delimited {
                return Ok(Listing {
                    objects,
                    prefixes: Vec::new(),
                });
            }
            let mut listing = Listing::default();
            for object in objects {
                match object.key[prefix.len()..].find('/') {
                    Some(i) => {
                        let common = object.key[..prefix.len() + i + 1].to_owned();
                        if listing.prefixes.last() != Some(&common) {
                            listing.prefixes.push(common);
                        }
                    }
                    None => listing.objects.push(object),
                }
            }
            Ok(listing)
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(format!("deleting {}", path.display()))(e)),
        }
        // Leave no empty directories behind, as S3 has none.
        let mut dir = path.parent();
        while let Some(d) = dir {
            if d == self.root || std::fs::remove_dir(d).is_err() {
                break;
            }
            dir = d.parent();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_list_get_delete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::new(dir.path().join("bkt"), "bkt");
        assert!(matches!(
            store.list("", false).await,
            Err(StoreError::NoSuchBucket { .. })
        ));
        let body = Bytes::from_static(b"checkpoint bytes");
        for key in [
            "runs/r1/ckpt-2.pt",
            "runs/r1/ckpt-1.pt",
            "runs/r2/ckpt-1.pt",
        ] {
            store.put(key, body.clone()).await.expect("put");
        }
        let keys = |l: Listing| l.objects.into_iter().map(|o| o.key).collect::<Vec<_>>();
        assert_eq!(
            keys(store.list("runs/r1/", false).await.expect("list")),
            ["runs/r1/ckpt-1.pt", "runs/r1/ckpt-2.pt"]
        );
        assert_eq!(
            store
                .list("runs/r", false)
                .await
                .expect("list")
                .objects
                .len(),
            3
        );
        let top = store.list("runs/", true).await.expect("list");
        assert_eq!(top.prefixes, ["runs/r1/", "runs/r2/"]);
        assert!(top.objects.is_empty());

        let meta = store
            .head("runs/r1/ckpt-1.pt")
            .await
            .expect("head")
            .expect("there");
        assert_eq!(meta.size, 16);
        let part = store
            .get("runs/r1/ckpt-1.pt", Some(4..10), meta.etag.as_deref())
            .await
            .expect("get")
            .into_bytes();
        assert_eq!(&part[..], b"kpoint");
        assert!(matches!(
            store.get("runs/r1/ckpt-1.pt", None, Some("other")).await,
            Err(StoreError::Changed { .. })
        ));

        store.delete("runs/r1/ckpt-1.pt").await.expect("delete");
        store.delete("runs/r1/ckpt-1.pt").await.expect("idempotent");
        assert!(
            store
                .head("runs/r1/ckpt-1.pt")
                .await
                .expect("head")
                .is_none()
        );
        assert!(matches!(
            store.get("runs/r1/ckpt-1.pt", None, None).await,
            Err(StoreError::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn multipart_appears_only_when_complete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::new(dir.path().join("bkt"), "bkt");
        let id = store.create_upload("big.bin").await.expect("create");
        let e2 = store
            .upload_part("big.bin", &id, 2, Bytes::from_static(b"world"))
            .await
            .expect("part");
        let e1 = store
            .upload_part("big.bin", &id, 1, Bytes::from_static(b"hello "))
            .await
            .expect("part");
        assert!(store.head("big.bin").await.expect("head").is_none());
        assert!(
            store
                .list("", false)
                .await
                .expect("list")
                .objects
                .is_empty()
        );
        store
            .complete_upload("big.bin", &id, vec![e1, e2])
            .await
            .expect("complete");
        assert_eq!(
            &store
                .get("big.bin", None, None)
                .await
                .expect("get")
                .into_bytes()[..],
            b"hello world"
        );
        assert!(!dir.path().join("bkt").join(UPLOADS_DIR).join(&id).exists());
    }

    #[tokio::test]
    async fn keys_cannot_escape_the_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::new(dir.path().join("bkt"), "bkt");
        for key in ["../outside", ".runctl-uploads/x", "a/../../b"] {
            let err = store
                .put(key, Bytes::from_static(b"x"))
                .await
                .expect_err("refused");
            assert!(matches!(err, StoreError::InvalidKey { .. }), "{key}");
        }
        assert!(!dir.path().join("outside").exists());
    }
}
