//! An ended run's log is compacted once it is `[daemon] keep_logs_days` old, and `logs`
//! says so, with its last lines and its end still there.

use std::time::Duration;

use tests::{Home, stderr, stdout};

const DAY_MS: i64 = 86_400_000;

#[test]
fn an_old_runs_log_is_compacted_when_the_daemon_starts_and_logs_says_so() {
    let home = Home::new();
    let out = home.run(&[
        "run",
        "--",
        "sh",
        "-c",
        "i=1; while [ $i -le 500 ]; do echo line $i; i=$((i+1)); done",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = home.json(&["list"])["runs"][0]["id"]
        .as_str()
        .expect("a run id")
        .to_owned();
    assert!(home.run(&["shutdown"]).status.success());
    // The run ended 31 days ago, as far as the database knows (the default keeps 30).
    let db = rusqlite::Connection::open(home.path().join("state.db")).expect("open");
    db.execute(
        "UPDATE runs SET ended_ms = ended_ms - ?2 WHERE id = ?1",
        rusqlite::params![run, 31 * DAY_MS],
    )
    .expect("age the run");
    drop(db);

    // The daemon compacts when it starts; `logs` is served beside it.
    let mut shown = String::new();
    home.wait_until("the log to be compacted", Duration::from_secs(20), || {
        let out = home.run(&["logs", &run]);
        shown = format!("{}{}", stdout(&out), stderr(&out));
        shown.contains("lines of output were removed")
    });
    assert!(
        shown.contains("300 earlier lines of output were removed"),
        "{shown}"
    );
    assert!(shown.contains("keep_logs_days"), "{shown}");
    let logs = stdout(&home.run(&["logs", &run]));
    let lines: Vec<&str> = logs.lines().filter(|l| l.starts_with("line ")).collect();
    assert_eq!(lines.len(), 200, "the last 200 lines stay");
    assert_eq!(lines.first(), Some(&"line 301"));
    assert_eq!(lines.last(), Some(&"line 500"));
    // Asked for fewer than it keeps, `logs` still says what went.
    let out = home.run(&["logs", "--tail", "5", &run]);
    let both = format!("{}{}", stdout(&out), stderr(&out));
    assert!(both.contains("300 earlier lines"), "{both}");
    assert!(stdout(&out).contains("line 500"), "{both}");
    assert!(!stdout(&out).contains("line 495\n"), "{both}");
    // The run's story is whole: it still reads as succeeded.
    let list = home.json(&["list"]);
    assert_eq!(list["runs"][0]["state"], "succeeded", "{list}");
}

#[test]
fn the_sync_dir_drops_trees_of_gone_instances_and_stat_caches_unused_for_a_month() {
    let home = Home::new();
    let out = home.run(&["run", "--", "echo", "hi"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(home.run(&["shutdown"]).status.success());
    let sync = home.path().join("sync");
    let stale = sync.join("stat-0123456789abcdef.cache");
    let fresh = sync.join("stat-fedcba9876543210.cache");
    let orphan = sync.join("run-aaaaaaaaaaaa.tree");
    for path in [&stale, &fresh, &orphan] {
        std::fs::write(path, b"x").expect("write");
    }
    let month_ago = std::time::SystemTime::now() - Duration::from_secs(31 * 86_400);
    std::fs::File::options()
        .write(true)
        .open(&stale)
        .expect("open")
        .set_modified(month_ago)
        .expect("age the cache");

    // The daemon prunes when it starts.
    assert!(home.run(&["status"]).status.success());
    home.wait_until("the sync dir to be pruned", Duration::from_secs(20), || {
        !stale.exists() && !orphan.exists()
    });
    assert!(fresh.exists(), "a cache used lately stays");
}
