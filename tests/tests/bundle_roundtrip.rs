//! The work-dir bundle across both sides: what the controller packs, the agent unpacks
//! byte for byte, with names, modes, symlinks and empty directories intact.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn tree(root: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for entry in walk(root) {
        let rel = entry
            .strip_prefix(root)
            .expect("under root")
            .display()
            .to_string();
        let meta = std::fs::symlink_metadata(&entry).expect("meta");
        let what = if meta.file_type().is_symlink() {
            format!(
                "link -> {}",
                std::fs::read_link(&entry).expect("link").display()
            )
        } else if meta.is_dir() {
            "dir".to_owned()
        } else {
            let exec = meta.permissions().mode() & 0o111 != 0;
            format!(
                "file {} exec={exec}",
                hex(&std::fs::read(&entry).expect("read"))
            )
        };
        out.push((rel, what));
    }
    out.sort();
    out
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        out.push(path.clone());
        if entry.file_type().expect("type").is_dir() {
            out.extend(walk(&path));
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    format!(
        "{:x}",
        bytes
            .iter()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(*b)))
    )
}

#[test]
fn a_tree_round_trips_exactly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    let long = "d".repeat(60);
    std::fs::create_dir_all(src.join(format!("{long}/{long}"))).expect("mkdir");
    std::fs::create_dir_all(src.join("empty dir")).expect("mkdir");
    std::fs::write(src.join(format!("{long}/{long}/deep file.txt")), "deep").expect("write");
    std::fs::write(src.join("données_日本.py"), "print('unicode')\n").expect("write");
    std::fs::write(src.join("run.sh"), "#!/bin/sh\necho hi\n").expect("write");
    std::fs::set_permissions(src.join("run.sh"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    std::fs::write(
        src.join("weights.bin"),
        (0..=255u8).cycle().take(3 << 20).collect::<Vec<u8>>(),
    )
    .expect("write");
    std::os::unix::fs::symlink("run.sh", src.join("link.sh")).expect("symlink");

    let mut bundle = Vec::new();
    let packed =
        controller::bundle::pack(&src, &dir.path().join("no-home"), &mut bundle).expect("pack");
    assert_eq!(packed.files, 4);
    let dest = dir.path().join("dest");
    let unpacked = agent::bundle::unpack(&bundle[..], &dest, 1 << 30).expect("unpack");
    assert_eq!(unpacked.files, 4);
    assert_eq!(unpacked.bytes, packed.bytes);
    assert_eq!(tree(&src), tree(&dest));
}
