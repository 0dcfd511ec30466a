//! The resource sampler: the host (CPU, memory, the state disk, network) and each active
//! run's process tree through sysinfo (its `gpu` feature off: see `gpu`), GPUs through the
//! `nvidia-smi` monitor. Processes are scanned only while a run is active.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use protocol::{HostStats, RunId, RunStats, StatsSample};
use sysinfo::{
    CpuRefreshKind, Disks, MemoryRefreshKind, Networks, Pid, ProcessRefreshKind, ProcessesToUpdate,
    RefreshKind, System,
};

use crate::gpu;
use crate::procstat::ProcStat;

#[derive(Debug)]
pub struct Sampler {
    system: System,
    disks: Disks,
    networks: Networks,
    state_dir: PathBuf,
    last_net: Instant,
    gpus: gpu::Monitor,
}

impl Sampler {
    pub fn new(state_dir: &Path, gpus: gpu::Monitor) -> Result<Self, sysinfo::Error> {
        let system = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing().with_usage())
                .with_memory(MemoryRefreshKind::nothing().with_ram()),
        )?;
        Ok(Sampler {
            system,
            disks: Disks::new_with_refreshed_list()?,
            networks: Networks::new_with_refreshed_list()?,
            state_dir: state_dir
                .canonicalize()
                .unwrap_or_else(|_| state_dir.to_owned()),
            last_net: Instant::now(),
            gpus,
        })
    }

    /// One sample; `groups` are the active runs' process groups (leader pids).
    pub fn sample(&mut self, groups: &[(RunId, u32)], at_ms: u64) -> StatsSample {
        let now = Instant::now();
        self.system.refresh_cpu_usage();
        self.system
            .refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        self.disks.refresh(true);
        self.networks.refresh(true);
        let secs = now.duration_since(self.last_net).as_secs_f64().max(0.001);
        self.last_net = now;
        let (rx, tx) = self
            .networks
            .iter()
            .filter(|(name, _)| name.as_os_str() != "lo")
            .fold((0u64, 0u64), |(rx, tx), (_, n)| {
                (rx + n.received(), tx + n.transmitted())
            });
        let disk = self
            .disks
            .iter()
            .filter(|d| self.state_dir.starts_with(d.mount_point()))
            .max_by_key(|d| d.mount_point().as_os_str().len());
        let host = HostStats {
            cpus: self.system.cpus().len() as u32,
            cpu_percent: self.system.global_cpu_usage(),
            mem_used_bytes: self.system.used_memory(),
            mem_total_bytes: self.system.total_memory(),
            disk_used_bytes: disk.map_or(0, |d| d.total_space() - d.available_space()),
            disk_total_bytes: disk.map_or(0, |d| d.total_space()),
            net_rx_bytes_per_sec: (rx as f64 / secs) as u64,
            net_tx_bytes_per_sec: (tx as f64 / secs) as u64,
        };
        let runs = if groups.is_empty() {
            Vec::new()
        } else {
            self.system.refresh_processes_specifics(
                ProcessesToUpdate::All,
                true,
                ProcessRefreshKind::nothing().with_cpu().with_memory(),
            );
            groups
                .iter()
                .map(|(run, leader)| self.run_stats(run, *leader, now))
                .collect()
        };
        StatsSample {
            at_ms,
            host,
            runs,
            gpus: self.gpus.gpus(now),
        }
    }

    /// The run's tree: its group leader and every descendant.
    fn run_stats(&self, run: &RunId, leader: u32, now: Instant) -> RunStats {
        let mut children: HashMap<Pid, Vec<Pid>> = HashMap::new();
        for (pid, process) in self.system.processes() {
            if let Some(parent) = process.parent() {
                children.entry(parent).or_default().push(*pid);
            }
        }
        let mut members = Vec::new();
        let mut seen = HashSet::new();
        let mut queue = vec![Pid::from_u32(leader)];
        while let Some(pid) = queue.pop() {
            if !seen.insert(pid) || self.system.process(pid).is_none() {
                continue;
            }
            members.push(pid);
            queue.extend(children.get(&pid).into_iter().flatten().copied());
        }
        let mut stats = RunStats {
            run: run.clone(),
            processes: 0,
            threads: 0,
            cpu_percent: 0.0,
            rss_bytes: 0,
            gpu_mem_bytes: None,
        };
        for pid in &members {
            let Some(process) = self.system.process(*pid) else {
                continue;
            };
            stats.processes += 1;
            stats.cpu_percent += process.cpu_usage();
            stats.rss_bytes += process.memory();
            stats.threads += ProcStat::of(pid.as_u32()).map_or(1, |s| s.threads);
        }
        let pids: Vec<u32> = members.iter().map(|p| p.as_u32()).collect();
        stats.gpu_mem_bytes = self.gpus.memory_of(&pids, now);
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_tree_is_measured() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A parent holding ~20 MB, with a child.
        let mut child = std::process::Command::new("python3")
            .args([
                "-c",
                "import subprocess, time; b = bytearray(20_000_000); p = subprocess.Popen(['sleep', '30']); print('ready', flush=True); time.sleep(30)",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let mut out = std::io::BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).expect("ready line");
        let run: RunId = "run-aaaaaaaaaaaa".parse().expect("valid id");
        let gpus = gpu::Monitor::idle(std::time::Duration::from_secs(1));
        let mut sampler = Sampler::new(dir.path(), gpus).expect("sysinfo works here");
        let sample = sampler.sample(&[(run.clone(), child.id())], 1);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(sample.runs.len(), 1);
        let stats = &sample.runs[0];
        assert_eq!(stats.run, run);
        assert_eq!(stats.processes, 2, "{stats:?}");
        assert!(stats.rss_bytes > 20_000_000, "{stats:?}");
        assert!(stats.threads >= 2, "{stats:?}");
        assert_eq!(stats.gpu_mem_bytes, None);
        assert!(sample.host.mem_total_bytes > 0);
        assert!(sample.host.disk_total_bytes > 0, "{:?}", sample.host);
        assert!(sample.host.cpus > 0);
    }
}
