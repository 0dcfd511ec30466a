//! The local-directory backend: each object is a file under the store's root, written to
//! a temporary name and renamed into place so a reader never sees a partial object.

use std::path::{Path, PathBuf};

use crate::{ObjectInfo, ObjectStore, StoreError, validate_key};

/// Temporary files carry this prefix and are never listed.
const TEMP_PREFIX: &str = ".runctl-tmp-";

/// An object store in a local directory.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
    let context = context.into();
    move |source| StoreError::Io { context, source }
}

impl LocalStore {
    /// A store rooted at `root`, which is created if missing.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(io(format!("creating {}", root.display())))?;
        Ok(LocalStore { root })
    }

    fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }

    /// Copies `src` to `dest` through a temporary file beside `dest`.
    async fn copy_atomic(src: &Path, dest: &Path) -> Result<u64, StoreError> {
        let dir = dest.parent().unwrap_or(Path::new("."));
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(io(format!("creating {}", dir.display())))?;
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!("{TEMP_PREFIX}{}-{name}", std::process::id()));
        let result = async {
            let size = tokio::fs::copy(src, &tmp).await.map_err(io(format!(
                "copying {} to {}",
                src.display(),
                tmp.display()
            )))?;
            let file = tokio::fs::File::open(&tmp)
                .await
                .map_err(io(format!("opening {}", tmp.display())))?;
            file.sync_all()
                .await
                .map_err(io(format!("syncing {}", tmp.display())))?;
            tokio::fs::rename(&tmp, dest)
                .await
                .map_err(io(format!("renaming into {}", dest.display())))?;
            Ok(size)
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }
}

impl ObjectStore for LocalStore {
    async fn put_file(&self, key: &str, src: &Path) -> Result<ObjectInfo, StoreError> {
        let dest = self.path(key)?;
        let size_bytes = Self::copy_atomic(src, &dest).await?;
        Ok(ObjectInfo {
            key: key.to_owned(),
            size_bytes,
        })
    }

    async fn get_file(&self, key: &str, dest: &Path) -> Result<ObjectInfo, StoreError> {
        let src = self.path(key)?;
        if !tokio::fs::try_exists(&src).await.unwrap_or(false) {
            return Err(StoreError::NotFound {
                key: key.to_owned(),
            });
        }
        let size_bytes = Self::copy_atomic(&src, dest).await?;
        Ok(ObjectInfo {
            key: key.to_owned(),
            size_bytes,
        })
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StoreError> {
        let path = self.path(key)?;
        match tokio::fs::metadata(&path).await {
            Ok(meta) if meta.is_file() => Ok(Some(ObjectInfo {
                key: key.to_owned(),
                size_bytes: meta.len(),
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(format!("reading {}", path.display()))(e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        let mut out = Vec::new();
        let mut dirs = vec![(self.root.clone(), String::new())];
        while let Some((dir, key_prefix)) = dirs.pop() {
            let mut entries = match tokio::fs::read_dir(&dir).await {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io(format!("listing {}", dir.display()))(e)),
            };
            while let Some(entry) = entries
                .next_entry()
                .await
                .map_err(io(format!("listing {}", dir.display())))?
            {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(TEMP_PREFIX) {
                    continue;
                }
                let key = format!("{key_prefix}{name}");
                let meta = entry
                    .metadata()
                    .await
                    .map_err(io(format!("reading {}", entry.path().display())))?;
                if meta.is_dir() {
                    // Only descend where keys below could still match the prefix.
                    let dir_key = format!("{key}/");
                    if dir_key.starts_with(prefix) || prefix.starts_with(&dir_key) {
                        dirs.push((entry.path(), dir_key));
                    }
                } else if meta.is_file() && key.starts_with(prefix) {
                    out.push(ObjectInfo {
                        key,
                        size_bytes: meta.len(),
                    });
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(format!("deleting {}", path.display()))(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_list_get_delete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::open(dir.path().join("store")).expect("open");
        let src = dir.path().join("src.bin");
        std::fs::write(&src, b"checkpoint bytes").expect("write");

        store
            .put_file("runs/r1/ckpt-2.pt", &src)
            .await
            .expect("put");
        store
            .put_file("runs/r1/ckpt-1.pt", &src)
            .await
            .expect("put");
        store
            .put_file("runs/r2/ckpt-1.pt", &src)
            .await
            .expect("put");

        let keys: Vec<String> = store
            .list("runs/r1/")
            .await
            .expect("list")
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(keys, ["runs/r1/ckpt-1.pt", "runs/r1/ckpt-2.pt"]);
        assert_eq!(store.list("runs/r").await.expect("list").len(), 3);

        let dest = dir.path().join("out/fetched.pt");
        let info = store
            .get_file("runs/r1/ckpt-1.pt", &dest)
            .await
            .expect("get");
        assert_eq!(info.size_bytes, 16);
        assert_eq!(std::fs::read(&dest).expect("read"), b"checkpoint bytes");

        store.delete("runs/r1/ckpt-1.pt").await.expect("delete");
        store
            .delete("runs/r1/ckpt-1.pt")
            .await
            .expect("delete is idempotent");
        assert!(
            store
                .head("runs/r1/ckpt-1.pt")
                .await
                .expect("head")
                .is_none()
        );
        assert!(matches!(
            store.get_file("runs/r1/ckpt-1.pt", &dest).await,
            Err(StoreError::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn keys_cannot_escape_the_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalStore::open(dir.path().join("store")).expect("open");
        let src = dir.path().join("src.bin");
        std::fs::write(&src, b"x").expect("write");
        let err = store
            .put_file("../outside", &src)
            .await
            .expect_err("refused");
        assert!(matches!(err, StoreError::InvalidKey { .. }));
        assert!(!dir.path().join("outside").exists());
    }
}
