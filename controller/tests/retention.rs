//! State that lives for months: a year of runs through the daemon's database, compacted as
//! the daemon does it, keeps the database bounded, and a compacted run still tells its
//! story (its end, its last lines, and a notice of what went).

use controller::db::{Db, RunRow, RunState, Source};
use controller::retention::{self, TAIL_LINES};
use protocol::{EventKind, InstanceName, Notice, RunEnd, RunEvent, RunId, Stream};

const DAY_MS: u64 = 86_400_000;
const KEEP_DAYS: u32 = 30;
const LINES: u64 = 1_000;
const RUNS_A_DAY: u64 = 2;

fn run_a_day(db: &Db, day: u64, n: u64) -> RunId {
    let mut id = [0u8; 6];
    id[..4].copy_from_slice(&(day as u32).to_be_bytes());
    id[4] = n as u8;
    let run = RunId::from_random(id);
    let start = day * DAY_MS + n * 3_600_000;
    let instance: InstanceName = "local-1".parse().expect("a name");
    db.insert_run(&RunRow {
        id: run.clone(),
        instance,
        argv: vec!["python3".into(), "train.py".into()],
        root: "/w".into(),
        state: RunState::Running,
        created_ms: start,
        started_ms: None,
        ended_ms: None,
        exit: None,
        error: None,
    })
    .expect("insert run");
    let event = |seq: u64, kind| RunEvent {
        seq,
        at_ms: start + seq,
        kind,
    };
    let mut events = vec![event(1, EventKind::Started { pid: 7, attempt: 1 })];
    for seq in 2..LINES + 2 {
        events.push(event(
            seq,
            EventKind::Output {
                stream: Stream::Stdout,
                line: format!(
                    "step {seq} loss {:.6} lr 3e-4 tokens/s 181234",
                    1.0 / seq as f64
                ),
            },
        ));
    }
    events.push(event(
        LINES + 2,
        EventKind::Ended(RunEnd::Exited {
            code: 0,
            stop_requested: false,
        }),
    ));
    let source = Source {
        node: 0,
        incarnation: 0,
    };
    for chunk in events.chunks(400) {
        db.insert_events(&run, source, chunk)
            .expect("insert events");
    }
    run
}

/// What the daemon's hourly pass does, at `now_ms`.
fn compact_due(db: &Db, now_ms: u64) -> u64 {
    let mut removed = 0;
    for (run, facts) in db.uncompacted_runs().expect("runs") {
        if retention::due(facts, now_ms, KEEP_DAYS) {
            removed += db
                .compact_run(&run, TAIL_LINES, KEEP_DAYS, now_ms)
                .expect("compact");
        }
    }
    removed
}

/// The database's size on disk with its write-ahead log folded in.
fn size(dir: &std::path::Path) -> u64 {
    let conn = rusqlite::Connection::open(dir.join("state.db")).expect("open");
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .expect("checkpoint");
    std::fs::metadata(dir.join("state.db")).expect("stat").len()
}

#[test]
fn a_year_of_runs_keeps_the_database_bounded_and_every_compacted_run_its_story() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Db::open(&dir.path().join("state.db")).expect("open");
    let mut sizes = Vec::new();
    let mut first = None;
    for day in 0..365 {
        for n in 0..RUNS_A_DAY {
            let run = run_a_day(&db, day, n);
            first.get_or_insert(run);
        }
        compact_due(&db, (day + 1) * DAY_MS);
        if day % 30 == 29 {
            sizes.push(size(dir.path()));
        }
    }
    // Past the first keep_logs_days the window of whole runs is full: from then on the
    // file grows only by what each compacted run keeps (its last lines and its events),
    // well under half of a whole run, and a year is a fraction of keeping every line.
    let month2 = sizes[1];
    let year = *sizes.last().expect("sizes");
    let whole_run = month2 / (2 * 30 * RUNS_A_DAY);
    let per_compacted_run = (year - month2) / ((365 - 60) * RUNS_A_DAY);
    eprintln!(
        "database size at the end of each month: {:?} KiB; a whole run ~{} KiB, each compacted run adds ~{} KiB",
        sizes.iter().map(|s| s / 1024).collect::<Vec<_>>(),
        whole_run / 1024,
        per_compacted_run / 1024
    );
    assert!(
        per_compacted_run * 2 <= whole_run,
        "each compacted run adds {per_compacted_run} bytes, a whole run takes {whole_run}"
    );
    assert!(
        year * 2 <= whole_run * 365 * RUNS_A_DAY,
        "a year took {year} bytes; every line kept would take about {}",
        whole_run * 365 * RUNS_A_DAY
    );

    // The first run, compacted: its last lines, its end, and a notice of what went.
    let run = first.expect("a run");
    let events = db.events_after(&run, 0, 10_000).expect("events");
    let lines = events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Output { .. }))
        .count() as u64;
    assert_eq!(lines, TAIL_LINES);
    assert!(matches!(
        events.first().map(|e| &e.kind),
        Some(EventKind::Started { .. })
    ));
    assert!(matches!(
        events.last().map(|e| &e.kind),
        Some(EventKind::Ended(_))
    ));
    let notice = db.compaction_notice(&run).expect("db").expect("a notice");
    assert_eq!(
        notice.kind,
        EventKind::Notice(Notice::Compacted {
            lines: LINES - TAIL_LINES,
            keep_days: KEEP_DAYS,
        })
    );
    assert_eq!(events[1], notice, "the notice stands where the lines were");
    let row = db.run(&run).expect("db").expect("the run");
    assert_eq!(row.state, RunState::Succeeded);
    // An agent replaying it is asked only for what comes after its end.
    let source = Source {
        node: 0,
        incarnation: 0,
    };
    assert_eq!(db.last_seq(&run, source).expect("db"), LINES + 2);
    // Compacted once: a second pass at the same time removes nothing, and a run still within
    // the window keeps every line.
    assert_eq!(compact_due(&db, 365 * DAY_MS), 0);
    let recent = run_a_day(&db, 364, RUNS_A_DAY);
    compact_due(&db, 365 * DAY_MS);
    assert!(db.compaction_notice(&recent).expect("db").is_none());

    assert_eq!(
        db.events_after(&recent, 0, 10_000).expect("events").len() as u64,
        LINES + 2
    );
}
