//! Binaries an EC2 instance installs at boot (the agent, the relay): found and checked
//! here (a static x86_64 ELF: a dynamic one breaks on hosts whose glibc differs from the
//! build machine's), uploaded content-addressed to the artifacts bucket, and handed to
//! user-data as a short-lived presigned URL with the SHA-256 the install checks.

use std::path::{Path, PathBuf};
use std::time::Duration;

use storage::ObjectStore;

use crate::config::{Backend, Config};
use crate::error::{ErrorCode, UserError};
use crate::objects::store_error;

/// `configured`, else `name` beside this executable, checked to be a static x86_64 ELF;
/// `how` says how to build one.
pub fn static_binary(
    configured: Option<&Path>,
    name: &str,
    how: &str,
) -> Result<PathBuf, UserError> {
    let path = configured
        .map(Path::to_owned)
        .or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        })
        .filter(|p| p.is_file())
        .ok_or_else(|| {
            UserError::new(
                ErrorCode::BadInput,
                format!("cannot find the static {name} to install on cloud instances"),
            )
            .resolve(how)
        })?;
    match elf_kind(&path) {
        Ok(ElfKind::StaticX86_64) => Ok(path),
        Ok(ElfKind::Dynamic) => Err(UserError::new(
            ErrorCode::BadInput,
            format!(
                "{} is dynamically linked; cloud hosts need the static {name}",
                path.display()
            ),
        )
        .resolve(how)),
        Ok(ElfKind::Other) => Err(UserError::new(
            ErrorCode::BadInput,
            format!("{} is not an x86_64 Linux executable", path.display()),
        )
        .resolve(how)),
        Err(e) => Err(UserError::new(
            ErrorCode::BadInput,
            format!("cannot read {}: {e}", path.display()),
        )),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum ElfKind {
    StaticX86_64,
    Dynamic,
    Other,
}

/// Reads the ELF header and program headers: x86_64, and no interpreter (`PT_INTERP`).
fn elf_kind(path: &Path) -> std::io::Result<ElfKind> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    let mut header = [0u8; 64];
    if file.read_exact(&mut header).is_err() {
        return Ok(ElfKind::Other);
    }
    let u16_at = |b: &[u8], i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
    // Magic, 64-bit, little-endian, EM_X86_64.
    if &header[..4] != b"\x7fELF" || header[4] != 2 || header[5] != 1 || u16_at(&header, 18) != 62 {
        return Ok(ElfKind::Other);
    }
    let phoff = u64::from_le_bytes(header[32..40].try_into().expect("8 bytes"));
    let phentsize = u16_at(&header, 54) as usize;
    let phnum = u16_at(&header, 56) as usize;
    if phentsize < 4 || phnum > 1024 {
        return Ok(ElfKind::Other);
    }
    let mut table = vec![0u8; phentsize * phnum];
    file.seek(SeekFrom::Start(phoff))?;
    file.read_exact(&mut table)?;
    const PT_INTERP: u32 = 3;
    let dynamic = table
        .chunks(phentsize)
        .any(|ph| u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) == PT_INTERP);
    Ok(if dynamic {
        ElfKind::Dynamic
    } else {
        ElfKind::StaticX86_64
    })
}

/// Where binaries go for EC2: `[ec2] artifacts`, else `runctl/` in the checkpoint bucket.
pub fn location(config: &Config) -> Result<storage::ObjectUrl, UserError> {
    location_in(config.ec2.artifacts.as_deref(), config, "ec2")
}

/// Where binaries go for `[SECTION]`'s instances: its `artifacts`, else `runctl/` in the
/// checkpoint bucket. Needs the S3 backend: instances cannot reach a local store.
pub fn location_in(
    artifacts: Option<&str>,
    config: &Config,
    section: &str,
) -> Result<storage::ObjectUrl, UserError> {
    let location = match (artifacts, config.storage.backend) {
        (_, Backend::Local) => {
            return Err(UserError::new(
                ErrorCode::BadInput,
                "cloud instances cannot reach the local object store ([storage] backend = \"local\")",
            )
            .resolve(format!("set backend = \"s3\" under [storage] and artifacts = \"s3://BUCKET/runctl\" under [{section}]")));
        }
        (Some(url), _) => url.to_owned(),
        (None, _) => {
            let checkpoints = config.storage.checkpoints().ok_or_else(|| {
                UserError::new(
                    ErrorCode::BadInput,
                    "no bucket for the binaries cloud instances install",
                )
                .resolve(format!(
                    "set artifacts = \"s3://BUCKET/runctl\" under [{section}] in config.toml"
                ))
            })?;
            let url = storage::ObjectUrl::parse(&checkpoints).map_err(store_error)?;
            format!("s3://{}/runctl", url.bucket)
        }
    };
    storage::ObjectUrl::parse(&location).map_err(store_error)
}

/// Uploads `path` as `KIND/SHA256/runctl-KIND` under `url` (once per hash) and presigns a GET
/// valid for `ttl`. Returns the URL and the SHA-256.
pub async fn publish(
    store_config: &storage::StoreConfig,
    path: &Path,
    url: &storage::ObjectUrl,
    kind: &str,
    ttl: Duration,
) -> Result<(String, String), UserError> {
    let sha256 = {
        let owned = path.to_owned();
        tokio::task::spawn_blocking(move || sha256_file(&owned))
            .await
            .map_err(|e| UserError::new(ErrorCode::Internal, e.to_string()))?
            .map_err(|e| {
                UserError::new(
                    ErrorCode::BadInput,
                    format!("reading {}: {e}", path.display()),
                )
            })?
    };
    let key = url.join(&format!("{kind}/{sha256}/runctl-{kind}")).key;
    let conn = storage::connect(store_config).await.map_err(store_error)?;
    let store = conn.bucket(&url.bucket).map_err(store_error)?;
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let present = store.head(&key).await.map_err(store_error)?;
    if present.is_none_or(|meta| meta.size != size) {
        let engine =
            storage::transfer::Engine::new(store.clone(), storage::transfer::Tuning::default());
        engine.upload_file(path, &key).await.map_err(store_error)?;
    }
    let presigned = store.presign_get(&key, ttl).await.map_err(store_error)?;
    Ok((presigned, sha256))
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        context.update(&buf[..n]);
    }
    Ok(hex::encode(context.finish()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_static_x86_64_elf_is_installable() {
        // This test executable is dynamically linked, like a plain `cargo build` agent.
        let exe = std::env::current_exe().expect("test executable");
        assert_eq!(elf_kind(&exe).expect("read"), ElfKind::Dynamic);
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("agent.sh");
        std::fs::write(&script, "#!/bin/sh\n").expect("write");
        assert_eq!(elf_kind(&script).expect("read"), ElfKind::Other);
        // The header of a static x86_64 executable: no program header is PT_INTERP.
        let mut elf = vec![0u8; 64 + 56];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[18] = 62;
        elf[32] = 64; // e_phoff
        elf[54] = 56; // e_phentsize
        elf[56] = 1; // e_phnum
        elf[64] = 1; // PT_LOAD
        let fake = dir.path().join("static");
        std::fs::write(&fake, &elf).expect("write");
        assert_eq!(elf_kind(&fake).expect("read"), ElfKind::StaticX86_64);
        elf[64] = 3; // PT_INTERP
        std::fs::write(&fake, &elf).expect("write");
        assert_eq!(elf_kind(&fake).expect("read"), ElfKind::Dynamic);
        elf[18] = 183; // aarch64
        std::fs::write(&fake, &elf).expect("write");
        assert_eq!(elf_kind(&fake).expect("read"), ElfKind::Other);
        // A missing or dynamic binary is refused with how to build one.
        let err = static_binary(Some(&dir.path().join("nope")), "runctl-relay", "build it")
            .expect_err("missing");
        assert!(err.to_string().contains("runctl-relay"), "{err}");
        let err = static_binary(Some(&exe), "runctl-relay", "build it").expect_err("dynamic");
        assert!(err.to_string().contains("dynamically linked"), "{err}");
    }
}
