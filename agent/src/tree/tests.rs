use super::*;
use protocol::delta::{entry_name, plan};

/// One entry of a tree a test wants on the agent.
#[derive(Clone)]
enum Want {
    File(&'static [u8], bool),
    Dir,
    Link(&'static str),
}

fn manifest(want: &[(&str, Want)]) -> (Manifest, HashMap<ContentHash, Vec<u8>>) {
    let mut m = Manifest::default();
    let mut content = HashMap::new();
    for (path, w) in want {
        let entry = match w {
            Want::File(bytes, executable) => {
                let hash = ContentHash::of(bytes);
                content.insert(hash, bytes.to_vec());
                Entry::File {
                    hash,
                    size_bytes: bytes.len() as u64,
                    executable: *executable,
                }
            }
            Want::Dir => Entry::Dir,
            Want::Link(target) => Entry::Symlink {
                target: (*target).to_owned(),
            },
        };
        m.entries.insert((*path).to_owned(), entry);
    }
    (m, content)
}

/// The sync stream the controller would send: zstd(delta, tar of content by hash).
fn stream(delta: &Delta, content: &HashMap<ContentHash, Vec<u8>>) -> (Vec<u8>, u64) {
    let blob = codec::encode_blob(delta).expect("encodes");
    let mut tar = tar::Builder::new(Vec::new());
    for (index, (hash, size, _)) in delta.stream_order().into_iter().enumerate() {
        let mut header = tar::Header::new_gnu();
        header.set_size(size);
        header.set_mode(0o644);
        tar.append_data(&mut header, entry_name(index), &content[&hash][..])
            .expect("append");
    }
    let mut raw = blob.clone();
    raw.extend(tar.into_inner().expect("finish"));
    (
        zstd::encode_all(&raw[..], 3).expect("zstd"),
        blob.len() as u64,
    )
}

/// Syncs `want` into the tree and checks disk and manifest match it exactly.
fn sync(run_dir: &Path, want: &[(&str, Want)]) {
    let (local, content) = manifest(want);
    let mut tree = Tree::open(run_dir, true).expect("opens");
    tree.refresh().expect("refresh");
    let delta = plan(&local, tree.manifest());
    let (bytes, delta_bytes) = stream(&delta, &content);
    apply_stream(&mut tree, &bytes[..], delta_bytes, 1 << 30, None, || ()).expect("applies");
    assert_eq!(tree.manifest(), &local);
    tree.persist().expect("persist");
    assert_disk(run_dir, want);
    let mut reopened = Tree::open(run_dir, false).expect("reopens");
    reopened.refresh().expect("refresh");
    assert_eq!(reopened.manifest().root(), local.root(), "state survives");
}

fn assert_disk(run_dir: &Path, want: &[(&str, Want)]) {
    let work = Tree::work_dir(run_dir);
    for (path, w) in want {
        let full = work.join(path);
        let meta = fs::symlink_metadata(&full).unwrap_or_else(|e| panic!("{path}: {e}"));
        match w {
            Want::File(bytes, exec) => {
                assert_eq!(&fs::read(&full).expect("read")[..], *bytes, "{path}");
                assert_eq!(is_executable(meta.mode()), *exec, "{path}");
            }
            Want::Dir => assert!(meta.is_dir(), "{path}"),
            Want::Link(target) => {
                assert_eq!(fs::read_link(&full).expect("link").to_str(), Some(*target))
            }
        }
    }
    let mut on_disk = Vec::new();
    list(&work, "", &mut on_disk);
    let mut wanted: Vec<String> = want.iter().map(|(p, _)| (*p).to_owned()).collect();
    wanted.sort();
    on_disk.sort();
    assert_eq!(on_disk, wanted, "nothing more, nothing less");
}

fn list(dir: &Path, prefix: &str, out: &mut Vec<String>) {
    for entry in fs::read_dir(dir).expect("read dir").flatten() {
        let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
        let meta = fs::symlink_metadata(entry.path()).expect("meta");
        if meta.is_dir() {
            list(&entry.path(), &format!("{name}/"), out);
        }
        out.push(name);
    }
}

#[test]
fn round_trips_changes_deletes_renames_and_modes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = dir.path();
    let v1 = [
        ("src", Want::Dir),
        ("src/model.py", Want::File(b"class Model: pass\n", false)),
        ("src/dätä with space.txt", Want::File(b"unicode\n", false)),
        ("run.sh", Want::File(b"#!/bin/sh\necho hi\n", true)),
        ("latest", Want::Link("src/model.py")),
        ("empty", Want::Dir),
        ("copy-a", Want::File(b"same", false)),
        ("copy-b", Want::File(b"same", false)),
    ];
    sync(run, &v1);
    let v2 = [
        ("lib", Want::Dir),
        ("lib/model.py", Want::File(b"class Model: pass\n", false)), // renamed
        ("src", Want::File(b"now a file\n", false)),                 // dir -> file
        ("run.sh", Want::File(b"#!/bin/sh\necho hi\n", false)),      // mode only
        ("latest", Want::Link("lib/model.py")),
        ("copy-b", Want::File(b"changed", true)),
    ];
    sync(run, &v2);
    sync(run, &v1);
    sync(run, &[]);
}

#[test]
fn a_rename_is_not_sent_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    sync(dir.path(), &[("a.bin", Want::File(b"big content", false))]);
    let (local, _) = manifest(&[("b.bin", Want::File(b"big content", false))]);
    let tree = Tree::open(dir.path(), false).expect("opens");
    let delta = plan(&local, tree.manifest());
    assert_eq!(delta.summary().stream_bytes, 0);
    // No content at all in the stream: the agent copies what it has.
    let (bytes, delta_bytes) = stream(&delta, &HashMap::new());
    let mut tree = tree;
    apply_stream(&mut tree, &bytes[..], delta_bytes, 1 << 30, None, || ()).expect("applies");
    assert_disk(dir.path(), &[("b.bin", Want::File(b"big content", false))]);
}

#[test]
fn untracked_outputs_stay_and_block_only_a_replacing_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    sync(
        dir.path(),
        &[("out", Want::Dir), ("train.py", Want::File(b"1", false))],
    );
    let work = Tree::work_dir(dir.path());
    fs::write(work.join("out/ckpt.pt"), b"weights").expect("write");
    // Deleting `out` locally keeps it remotely: it holds a file runctl did not sync.
    let (local, content) = manifest(&[("train.py", Want::File(b"2", false))]);
    let mut tree = Tree::open(dir.path(), false).expect("opens");
    let delta = plan(&local, tree.manifest());
    let (bytes, n) = stream(&delta, &content);
    apply_stream(&mut tree, &bytes[..], n, 1 << 30, None, || ()).expect("applies");
    assert_eq!(
        fs::read(work.join("out/ckpt.pt")).expect("kept"),
        b"weights"
    );
    // A file where that directory is: refused before anything changes.
    let (local, content) = manifest(&[("out", Want::File(b"x", false))]);
    let delta = plan(&local, tree.manifest());
    let (bytes, n) = stream(&delta, &content);
    let err = apply_stream(&mut tree, &bytes[..], n, 1 << 30, None, || ()).expect_err("conflict");
    assert!(matches!(err, SyncError::Conflict { .. }), "{err}");
    assert_eq!(fs::read(work.join("train.py")).expect("read"), b"2");
}

#[test]
fn refresh_notices_files_changed_on_the_instance() {
    let dir = tempfile::tempdir().expect("tempdir");
    sync(dir.path(), &[("cfg.yaml", Want::File(b"lr: 1", false))]);
    let mut tree = Tree::open(dir.path(), false).expect("opens");
    let before = tree.manifest().root();
    fs::write(Tree::work_dir(dir.path()).join("cfg.yaml"), b"lr: 2!").expect("write");
    tree.refresh().expect("refresh");
    assert_ne!(tree.manifest().root(), before);
    // And the next sync puts the controller's version back.
    sync(dir.path(), &[("cfg.yaml", Want::File(b"lr: 1", false))]);
}

#[test]
fn an_interrupted_apply_is_finished_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let v1 = [("a", Want::File(b"a1", false)), ("d", Want::Dir)];
    let v2 = [
        ("a", Want::File(b"a2", false)),
        ("b", Want::File(b"b2", true)),
        ("d", Want::Dir),
        ("d/c", Want::File(b"c2", false)),
    ];
    sync(dir.path(), &v1);
    let (local, content) = manifest(&v2);
    let tree = Tree::open(dir.path(), false).expect("opens");
    let delta = plan(&local, tree.manifest());
    let (bytes, n) = stream(&delta, &content);
    // Everything up to the journal, then only the first change: the agent "dies" there.
    let decoded = zstd::decode_all(&bytes[..]).expect("zstd");
    let mut rest = Limited::new(&decoded[n as usize..], u64::MAX);
    fs::create_dir_all(tree.staging()).expect("staging");
    let mut staged = Staged::new(&delta);
    let staging = tree.staging();
    tree.receive(&delta, &mut rest, &mut staged, &|h, _| {
        staging.join(h.to_hex())
    })
    .expect("receive");
    let journal = Journal {
        ops: delta.ops.clone(),
        manifest: delta.apply_to(tree.manifest()).expect("fits"),
    };
    write_atomically(
        &tree.journal_path(),
        &codec::encode_blob(&journal).expect("enc"),
        Durability::Synced,
    )
    .expect("journal");
    execute(
        &Tree::work_dir(dir.path()),
        &tree.staging(),
        &delta.ops[..1],
        &staged.stats,
    )
    .expect("part");
    drop(tree);
    let mut reopened = Tree::open(dir.path(), false).expect("rolls forward");
    assert_eq!(reopened.manifest(), &local);
    assert_disk(dir.path(), &v2);
    reopened.refresh().expect("refresh");
    assert_eq!(reopened.manifest(), &local);
}

#[test]
fn an_apply_cut_off_before_its_journal_leaves_the_old_tree() {
    let dir = tempfile::tempdir().expect("tempdir");
    let v1 = [("a", Want::File(b"a1", false))];
    sync(dir.path(), &v1);
    let (local, content) = manifest(&[("a", Want::File(b"a2 is longer", false))]);
    let mut tree = Tree::open(dir.path(), false).expect("opens");
    let delta = plan(&local, tree.manifest());
    let (bytes, n) = stream(&delta, &content);
    let cut = &bytes[..bytes.len() / 2];
    assert!(apply_stream(&mut tree, cut, n, 1 << 30, None, || ()).is_err());
    assert_disk(dir.path(), &v1);
    sync(dir.path(), &[("a", Want::File(b"a2 is longer", false))]);
}

/// Applies a hand-made stream to an empty tree and expects a refusal naming `expected`.
fn check_refused(delta: &Delta, raw_tar: Vec<u8>, max_bytes: u64, expected: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = dir.path().join("run");
    let mut tree = Tree::open(&run, true).expect("opens");
    let blob = codec::encode_blob(delta).expect("enc");
    let mut raw = blob.clone();
    raw.extend(raw_tar);
    let bytes = zstd::encode_all(&raw[..], 3).expect("zstd");
    let err = apply_stream(
        &mut tree,
        &bytes[..],
        blob.len() as u64,
        max_bytes,
        None,
        || (),
    )
    .expect_err(expected);
    assert!(err.to_string().contains(expected), "{err}");
    let mut left = Vec::new();
    list(&Tree::work_dir(&run), "", &mut left);
    assert!(
        left.is_empty(),
        "nothing is applied after a refusal: {left:?}"
    );
    assert!(!dir.path().join("evil").exists());
}

/// A tar with one entry written with raw header fields, as a hostile sender could.
fn raw_tar(name: &str, kind: tar::EntryType, data: &[u8], link: &str) -> Vec<u8> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    header.set_cksum();
    let mut builder = tar::Builder::new(Vec::new());
    builder.append(&header, data).expect("append");
    builder.into_inner().expect("finish")
}

fn one_file(path: &str, data: &[u8]) -> Delta {
    let (local, _) = manifest(&[]);
    let mut m = local.clone();
    m.entries.insert(
        path.to_owned(),
        Entry::File {
            hash: ContentHash::of(data),
            size_bytes: data.len() as u64,
            executable: false,
        },
    );
    Delta {
        base: local.root(),
        target: m.root(),
        ops: vec![Op::Write {
            path: path.to_owned(),
            hash: ContentHash::of(data),
            size_bytes: data.len() as u64,
            executable: false,
            source: Source::Stream,
        }],
    }
}

#[test]
fn hostile_streams_are_refused() {
    let data = b"payload";
    let name = entry_name(0);
    let ok_tar = raw_tar(&name, tar::EntryType::Regular, data, "");
    // Paths that leave the tree, in the delta itself.
    check_refused(
        &one_file("../evil", data),
        ok_tar.clone(),
        1 << 20,
        "escapes",
    );
    check_refused(
        &one_file("/tmp/evil", data),
        ok_tar.clone(),
        1 << 20,
        "escapes",
    );
    let mut link = one_file("a", data);
    link.ops = vec![Op::Symlink {
        path: "ln".into(),
        target: "../../etc/passwd".into(),
    }];
    check_refused(&link, Vec::new(), 1 << 20, "points outside");
    // Entries in the content tar that are not plain content.
    let delta = one_file("a", data);
    for kind in [
        tar::EntryType::Symlink,
        tar::EntryType::Link,
        tar::EntryType::Char,
        tar::EntryType::Block,
        tar::EntryType::Fifo,
    ] {
        check_refused(
            &delta,
            raw_tar(&name, kind, b"", "/etc/passwd"),
            1 << 20,
            "only regular files",
        );
    }
    check_refused(
        &delta,
        raw_tar("../evil", tar::EntryType::Regular, data, ""),
        1 << 20,
        "is not the content",
    );
    check_refused(
        &delta,
        raw_tar(&name, tar::EntryType::Regular, b"payloaX", ""),
        1 << 20,
        "does not match its hash",
    );
    let mut two = ok_tar.clone();
    two.truncate(two.len() - 1024); // drop the end-of-archive blocks
    two.extend(raw_tar("extra", tar::EntryType::Regular, b"x", ""));
    check_refused(&delta, two, 1 << 20, "does not name");
}

#[test]
fn decompression_is_bounded() {
    let big = vec![0u8; 4 << 20];
    let delta = one_file("zeros.bin", &big);
    let tar = raw_tar(&entry_name(0), tar::EntryType::Regular, &big, "");
    // Over the agent's bound: refused before reading the content.
    check_refused(&delta, tar.clone(), 1 << 20, "more than 1048576 bytes");
    // A stream longer than the delta declares: the tar entry is cut at the bound.
    let small = one_file("zeros.bin", &big[..1024]);
    let mut lying = small.clone();
    if let Op::Write { size_bytes, .. } = &mut lying.ops[0] {
        *size_bytes = 1024;
    }
    check_refused(&lying, tar, 1 << 30, "is not the content");
    // A delta header claiming more than any delta may be.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut tree = Tree::open(dir.path(), true).expect("opens");
    let err = apply_stream(&mut tree, &b""[..], u64::MAX, 1 << 20, None, || ()).expect_err("huge");
    assert!(matches!(err, SyncError::TooLarge { .. }), "{err}");
}

#[test]
fn a_tree_seeded_from_the_store_is_whole_and_its_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("store")).expect("store");
    let mut want: Vec<(&str, Want)> = vec![
        ("src", Want::Dir),
        ("src/deep", Want::Dir),
        ("src/deep/er", Want::Dir),
        ("run.sh", Want::File(b"#!/bin/sh\necho hi\n", true)),
        ("latest", Want::Link("src/f0.py")),
        ("src/deep/er/same.py", Want::File(b"x = 0\n", false)),
    ];
    // Enough files that every seeding thread copies some.
    for i in 0..64 {
        let path: &'static str = Box::leak(format!("src/f{i}.py").into_boxed_str());
        let body: &'static [u8] = Box::leak(format!("x = {i}\n").into_bytes().into_boxed_slice());
        want.push((path, Want::File(body, false)));
    }
    let (m, content) = manifest(&want);
    let src = dir.path().join("incoming");
    for (hash, bytes) in &content {
        fs::write(&src, bytes).expect("write");
        store.ingest(&src, hash).expect("ingest");
    }
    let record = |m: &Manifest| TreeRecord {
        run: "run-000000000001".parse().expect("run id"),
        root: m.root(),
        recorded_at_ms: 1,
        manifest: m.clone(),
    };
    let first = dir.path().join("first");
    let mut tree = Tree::open(&first, true).expect("opens");
    assert!(tree.seed(&store, &record(&m)).expect("seeds"));
    assert_eq!(tree.manifest(), &m);
    assert_disk(&first, &want);
    // A run writing its files changes neither the store nor a tree seeded after it.
    fs::write(Tree::work_dir(&first).join("src/f1.py"), b"edited by run 1").expect("edit");
    let second = dir.path().join("second");
    let mut tree = Tree::open(&second, true).expect("opens");
    assert!(tree.seed(&store, &record(&m)).expect("seeds"));
    assert_disk(&second, &want);
    // A record naming an object the store lacks seeds nothing: the sync sends it all.
    let mut lacking = m.clone();
    lacking.entries.insert(
        "src/gone.py".into(),
        Entry::File {
            hash: ContentHash::of(b"never stored"),
            size_bytes: 12,
            executable: false,
        },
    );
    let third = dir.path().join("third");
    let mut tree = Tree::open(&third, true).expect("opens");
    assert!(
        !tree
            .seed(&store, &record(&lacking))
            .expect("refuses quietly")
    );
    assert!(tree.manifest().entries.is_empty());
    assert_disk(&third, &[]);
}

/// Every path under `dir` with its bytes (a file), target (a link) or nothing (a
/// directory), and its mode: the whole state of a tree on disk.
fn disk_state(dir: &Path) -> BTreeMap<PathBuf, (u32, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(at) = todo.pop() {
        for entry in fs::read_dir(&at).expect("read dir") {
            let path = entry.expect("entry").path();
            let meta = fs::symlink_metadata(&path).expect("meta");
            let data = if meta.file_type().is_symlink() {
                fs::read_link(&path)
                    .expect("link")
                    .into_os_string()
                    .into_encoded_bytes()
            } else if meta.is_dir() {
                todo.push(path.clone());
                Vec::new()
            } else {
                fs::read(&path).expect("file")
            };
            out.insert(
                path.strip_prefix(dir).expect("inside").to_path_buf(),
                (meta.mode(), data),
            );
        }
    }
    out
}

/// A sync stream damaged in transit or by a hostile peer: bytes flipped, cut, inserted,
/// in the raw (delta then tar) stream or in its zstd.
fn damage(bytes: &mut Vec<u8>, flips: &[(usize, u8)], cut: Option<usize>, insert: &[(usize, u8)]) {
    for (at, bits) in flips {
        if !bytes.is_empty() {
            let n = bytes.len();
            bytes[at % n] ^= bits;
        }
    }
    for (at, byte) in insert {
        let at = at % (bytes.len() + 1);
        bytes.insert(at, *byte);
    }
    if let Some(at) = cut
        && !bytes.is_empty()
    {
        let n = bytes.len();
        bytes.truncate(at % n);
    }
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(48),
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    })]

    /// A damaged or hostile sync stream is applied whole or not at all: on a refusal the
    /// tree on disk is exactly what it was, nothing is written beside it, and the next
    /// good sync still applies.
    #[test]
    fn a_damaged_sync_stream_applies_whole_or_not_at_all(
        flips in proptest::collection::vec((proptest::prelude::any::<usize>(), 1u8..), 0..4),
        cut in proptest::option::of(proptest::prelude::any::<usize>()),
        insert in proptest::collection::vec(proptest::prelude::any::<(usize, u8)>(), 0..3),
        raw_damage in proptest::prelude::any::<bool>(),
    ) {
        let parent = tempfile::tempdir().expect("tempdir");
        let run_dir = parent.path().join("run");
        let before = [
            ("a.py", Want::File(b"print(1)\n", false)),
            ("lib", Want::Dir),
            ("lib/b.py", Want::File(b"x = 2\n", true)),
            ("link", Want::Link("lib/b.py")),
        ];
        sync(&run_dir, &before);
        let after = [
            ("a.py", Want::File(b"print(2)\n", false)),
            ("lib", Want::Dir),
            ("lib/c.py", Want::File(b"x = 2\n", true)),
            ("data", Want::Dir),
            ("data/new.txt", Want::File(b"some new content, long enough to matter\n", false)),
        ];
        let (local, content) = manifest(&after);
        let mut tree = Tree::open(&run_dir, true).expect("opens");
        tree.refresh().expect("refresh");
        let delta = plan(&local, tree.manifest());
        let (packed, delta_bytes) = stream(&delta, &content);
        let bytes = if raw_damage {
            let mut raw = zstd::decode_all(&packed[..]).expect("zstd");
            damage(&mut raw, &flips, cut, &insert);
            zstd::encode_all(&raw[..], 1).expect("zstd")
        } else {
            let mut packed = packed;
            damage(&mut packed, &flips, cut, &insert);
            packed
        };
        let work = Tree::work_dir(&run_dir);
        let on_disk = disk_state(&work);
        match apply_stream(&mut tree, &bytes[..], delta_bytes, 1 << 20, None, || ()) {
            Ok(()) => {
                // Whatever was damaged was not what the tree is made of.
                tree.refresh().expect("refresh");
                proptest::prop_assert_eq!(tree.manifest(), &local);
            }
            Err(_) => {
                proptest::prop_assert_eq!(disk_state(&work), on_disk, "half applied");
                // Nor is what arrived before the refusal kept.
                proptest::prop_assert!(!tree.staging().exists(), "staging left behind");
                proptest::prop_assert!(!run_dir.join("work.new").exists(), "work.new left");
                drop(tree);
                sync(&run_dir, &after);
            }
        }
        let beside: Vec<_> = fs::read_dir(parent.path())
            .expect("read")
            .map(|e| e.expect("entry").file_name())
            .collect();
        proptest::prop_assert_eq!(beside, vec![std::ffi::OsString::from("run")]);
    }
}
