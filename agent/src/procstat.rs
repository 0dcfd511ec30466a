//! The few fields of `/proc/PID/stat` (or `/proc/PID/task/TID/stat`) the agent reads
//! itself: freezing a process group, reaping orphans, counting a run's threads. Linux only.

use std::path::Path;

/// A process's (or thread's) state, parent, process group and thread count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// `R`, `S`, `D`, `T` (stopped), `t` (traced), `Z` (zombie), `X` (dead), ...
    pub state: char,
    pub ppid: u32,
    pub pgrp: u32,
    pub threads: u32,
}

impl ProcStat {
    /// Parses a stat line: "pid (comm) state ppid pgrp ..."; comm may hold spaces and
    /// parentheses, so fields are counted after the last `)`.
    pub fn parse(line: &str) -> Option<Self> {
        let (_, rest) = line.rsplit_once(')')?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        Some(ProcStat {
            state: fields.first()?.chars().next()?,
            ppid: fields.get(1)?.parse().ok()?,
            pgrp: fields.get(2)?.parse().ok()?,
            threads: fields.get(17)?.parse().ok()?,
        })
    }

    /// Reads the stat file at `path` (`/proc/PID/stat` or a task's).
    pub fn read(path: &Path) -> Option<Self> {
        Self::parse(&std::fs::read_to_string(path).ok()?)
    }

    /// Reads `/proc/PID/stat`.
    pub fn of(pid: u32) -> Option<Self> {
        Self::read(Path::new(&format!("/proc/{pid}/stat")))
    }
}

/// The pids in `/proc`.
pub fn pids() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stat_line_whose_name_holds_parentheses() {
        let line =
            "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 1 0 0 0 3 4 0 0 20 0 7 0 100 1 1";
        assert_eq!(
            ProcStat::parse(line),
            Some(ProcStat {
                state: 'S',
                ppid: 1,
                pgrp: 4242,
                threads: 7
            })
        );
        assert_eq!(ProcStat::parse("garbage"), None);
        assert_eq!(ProcStat::parse("1 (x) S 0"), None);
        let me = ProcStat::of(std::process::id()).expect("own stat");
        assert!(me.threads >= 1);
    }
}
