//! GPU figures from `nvidia-smi`, never NVML: the agent is a static binary, and a dlopen of
//! the driver's library from one crashes when the host's glibc differs from the build's.
//! Two long-lived children stream CSV (`-lms`): one line per GPU per interval, and one
//! line per compute process per interval. The parsers are pure and table-tested; the
//! monitor keeps the latest of each. On a host without a driver there are simply no GPU
//! figures; the children are tried again every minute (a driver may load after the agent).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocol::GpuStats;
use tokio::io::{AsyncBufReadExt, BufReader};

/// The `--query-gpu` fields, in the order [`parse_gpu_line`] reads them.
pub const GPU_QUERY: &str =
    "index,name,utilization.gpu,memory.used,memory.total,temperature.gpu,power.draw";
/// The `--query-compute-apps` fields, in the order [`parse_app_line`] reads them.
pub const APP_QUERY: &str = "pid,used_memory";
const MIB: u64 = 1024 * 1024;
/// A child that ended or could not start is started again after this long.
const RETRY: Duration = Duration::from_secs(60);

/// A number field; `[N/A]`, `[Not Supported]` and the like are absent.
fn number(field: &str) -> Option<f64> {
    field.trim().parse::<f64>().ok().filter(|v| v.is_finite())
}

/// How many GPUs the host has, from one `nvidia-smi` report: 0 where it is missing,
/// fails, or takes over 10 s (a wedged driver must not hold a run's start).
pub async fn count(nvidia_smi: &std::path::Path) -> u32 {
    let mut command = tokio::process::Command::new(nvidia_smi);
    command
        .arg(format!("--query-gpu={GPU_QUERY}"))
        .arg("--format=csv,noheader,nounits")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let Ok(child) = crate::reaper::spawn(&mut command) else {
        return 0;
    };
    let pid = child.id().unwrap_or(0);
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output()).await;
    crate::reaper::forget(pid);
    match out {
        Ok(Ok(out)) if out.status.success() => {
            let lines = String::from_utf8_lossy(&out.stdout);
            let gpus = lines.lines().filter_map(parse_gpu_line).count();
            u32::try_from(gpus).unwrap_or(u32::MAX)
        }
        _ => 0,
    }
}

/// One line of `--query-gpu=GPU_QUERY --format=csv,noheader,nounits`.
pub fn parse_gpu_line(line: &str) -> Option<GpuStats> {
    let fields: Vec<&str> = line.split(',').map(str::trim).collect();
    if fields.len() != 7 {
        return None;
    }
    Some(GpuStats {
        index: fields[0].parse().ok()?,
        name: fields[1].to_owned(),
        util_percent: number(fields[2]).map(|v| v as f32),
        mem_used_bytes: number(fields[3]).map(|v| (v * MIB as f64) as u64),
        mem_total_bytes: number(fields[4]).map(|v| (v * MIB as f64) as u64),
        temp_c: number(fields[5]).map(|v| v as f32),
        power_w: number(fields[6]).map(|v| v as f32),
    })
}

/// One line of `--query-compute-apps=APP_QUERY --format=csv,noheader,nounits`: a process
/// and the GPU memory it holds on one GPU.
pub fn parse_app_line(line: &str) -> Option<(u32, u64)> {
    let (pid, mem) = line.split_once(',')?;
    let pid = pid.trim().parse().ok()?;
    let mem = number(mem)?;
    Some((pid, (mem * MIB as f64) as u64))
}

#[derive(Debug, Default)]
struct Latest {
    gpus: BTreeMap<u32, (GpuStats, Instant)>,
    /// Per pid: memory summed over the GPUs reported in the current interval.
    apps: HashMap<u32, (u64, Instant)>,
}

/// Whose process ids `nvidia-smi --query-compute-apps` reports, as this agent sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pids {
    /// The agent's own: a run's processes are matched by pid.
    Ours,
    /// The host's, from inside a container with a PID namespace of its own (a pod): they
    /// match none of ours, so a run's GPU memory cannot be told and is shown unavailable
    /// rather than 0.
    Host,
}

impl Pids {
    /// `Host` on a pod (RunPod's containers have a PID namespace of their own); else
    /// `Ours`, with [`Monitor::memory_of`] still refusing to guess when none of the
    /// reported pids is a process here.
    pub fn detect(on_pod: bool) -> Pids {
        if on_pod { Pids::Host } else { Pids::Ours }
    }
}

/// Whether `reported` (nvidia-smi's compute pids) can be matched with this agent's
/// processes: `visible` says which exist here. None reported: nothing holds GPU memory,
/// so a run's is 0; some reported but none of them here: they are another namespace's.
pub fn pids_match(reported: &[u32], visible: impl Fn(u32) -> bool) -> bool {
    reported.is_empty() || reported.iter().any(|&pid| visible(pid))
}

/// The latest figures from the `nvidia-smi` children.
#[derive(Debug, Clone)]
pub struct Monitor {
    latest: Arc<Mutex<Latest>>,
    interval: Duration,
    pids: Pids,
}

impl Monitor {
    /// Starts the children (and restarts them when they fail or cannot start). Nothing
    /// waits on them: the agent dials its controller meanwhile.
    pub fn start(nvidia_smi: PathBuf, interval: Duration, pids: Pids) -> Self {
        let monitor = Monitor {
            latest: Arc::default(),
            interval,
            pids,
        };
        let ms = interval.as_millis().max(100).to_string();
        let gpu_args = vec![
            format!("--query-gpu={GPU_QUERY}"),
            "--format=csv,noheader,nounits".to_owned(),
            "-lms".to_owned(),
            ms.clone(),
        ];
        let app_args = vec![
            format!("--query-compute-apps={APP_QUERY}"),
            "--format=csv,noheader,nounits".to_owned(),
            "-lms".to_owned(),
            ms,
        ];
        tokio::spawn(follow(
            nvidia_smi.clone(),
            gpu_args,
            monitor.clone(),
            Kind::Gpu,
        ));
        tokio::spawn(follow(nvidia_smi, app_args, monitor.clone(), Kind::App));
        monitor
    }

    /// A monitor with no children: no GPU figures (for tests).
    pub fn idle(interval: Duration) -> Self {
        Monitor {
            latest: Arc::default(),
            interval,
            pids: Pids::Ours,
        }
    }

    /// The GPUs, as of their latest lines (stale ones dropped).
    pub fn gpus(&self, now: Instant) -> Vec<GpuStats> {
        let latest = self.latest.lock().expect("gpu lock is never poisoned");
        latest
            .gpus
            .values()
            .filter(|(_, seen)| now.duration_since(*seen) < self.interval * 3)
            .map(|(g, _)| g.clone())
            .collect()
    }

    /// GPU memory held by `pids`, summed; `None` while no GPU reports (no driver), or
    /// where `nvidia-smi`'s pids are not ours to match (a container).
    pub fn memory_of(&self, pids: &[u32], now: Instant) -> Option<u64> {
        self.memory_seen(pids, now, |pid| {
            std::path::Path::new(&format!("/proc/{pid}")).exists()
        })
    }

    /// [`Monitor::memory_of`], with `visible` saying which pids are processes here.
    fn memory_seen(
        &self,
        pids: &[u32],
        now: Instant,
        visible: impl Fn(u32) -> bool,
    ) -> Option<u64> {
        let latest = self.latest.lock().expect("gpu lock is never poisoned");
        let fresh = |seen: &Instant| now.duration_since(*seen) < self.interval * 3;
        if !latest.gpus.values().any(|(_, seen)| fresh(seen)) || self.pids == Pids::Host {
            return None;
        }
        let reported: Vec<u32> = latest
            .apps
            .iter()
            .filter(|(_, (_, seen))| fresh(seen))
            .map(|(pid, _)| *pid)
            .collect();
        if !pids_match(&reported, visible) {
            return None;
        }
        let held = pids
            .iter()
            .filter_map(|pid| latest.apps.get(pid))
            .filter(|(_, seen)| now.duration_since(*seen) < self.interval * 3)
            .map(|(mem, _)| mem)
            .sum();
        Some(held)
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Gpu,
    App,
}

/// Runs one `nvidia-smi` child for as long as the agent lives, restarting it after a pause
/// when it ends.
async fn follow(program: PathBuf, args: Vec<String>, monitor: Monitor, kind: Kind) {
    let mut said = false;
    loop {
        let mut command = tokio::process::Command::new(&program);
        command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        match crate::reaper::spawn(&mut command) {
            Ok(mut child) => {
                let pid = child.id().unwrap_or(0);
                if let Some(stdout) = child.stdout.take() {
                    let mut lines = BufReader::new(stdout).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        monitor.record(kind, &line, Instant::now());
                    }
                }
                let status = child.wait().await;
                crate::reaper::forget(pid);
                tracing::warn!(
                    "{} ended ({status:?}); restarting it in {RETRY:?}",
                    program.display()
                );
            }
            // Said once (by the GPU query's child); a host without a driver is not news
            // every minute.
            Err(e) if said || matches!(kind, Kind::App) => {
                tracing::debug!("starting {}: {e}", program.display())
            }
            Err(e) => {
                said = true;
                tracing::info!(
                    "{} cannot run ({e}): no GPU figures on this host; trying again every {}s",
                    program.display(),
                    RETRY.as_secs()
                );
            }
        }
        tokio::time::sleep(RETRY).await;
    }
}

impl Monitor {
    fn record(&self, kind: Kind, line: &str, now: Instant) {
        let mut latest = self.latest.lock().expect("gpu lock is never poisoned");
        match kind {
            Kind::Gpu => {
                if let Some(gpu) = parse_gpu_line(line) {
                    latest.gpus.insert(gpu.index, (gpu, now));
                }
            }
            Kind::App => {
                if let Some((pid, mem)) = parse_app_line(line) {
                    // A process on several GPUs has one line per GPU in the same interval.
                    let entry = latest.apps.entry(pid).or_insert((0, now));
                    if now.duration_since(entry.1) > self.interval / 2 {
                        *entry = (0, now);
                    }
                    entry.0 += mem;
                    entry.1 = now;
                }
                let interval = self.interval;
                latest
                    .apps
                    .retain(|_, (_, seen)| now.duration_since(*seen) < interval * 3);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_gpu(line: &str, expected: Option<GpuStats>) {
        assert_eq!(parse_gpu_line(line), expected, "{line:?}");
    }

    #[test]
    fn gpu_lines() {
        check_gpu(
            "0, NVIDIA H200, 97, 80521, 143771, 64, 512.34",
            Some(GpuStats {
                index: 0,
                name: "NVIDIA H200".into(),
                util_percent: Some(97.0),
                mem_used_bytes: Some(80_521 * MIB),
                mem_total_bytes: Some(143_771 * MIB),
                temp_c: Some(64.0),
                power_w: Some(512.34),
            }),
        );
        check_gpu(
            "3, Tesla T4, [N/A], 0, 15360, 31, [Not Supported]",
            Some(GpuStats {
                index: 3,
                name: "Tesla T4".into(),
                util_percent: None,
                mem_used_bytes: Some(0),
                mem_total_bytes: Some(15_360 * MIB),
                temp_c: Some(31.0),
                power_w: None,
            }),
        );
        check_gpu("", None);
        check_gpu("No devices were found", None);
        check_gpu("x, NVIDIA A10G, 1, 2, 3, 4, 5", None);
        check_gpu("0, a, 1, 2, 3, 4", None);
    }

    #[test]
    fn app_lines() {
        assert_eq!(parse_app_line("4242, 10240"), Some((4242, 10_240 * MIB)));
        assert_eq!(parse_app_line(" 7 , [N/A]"), None);
        assert_eq!(parse_app_line("No running processes found"), None);
        assert_eq!(parse_app_line(""), None);
    }

    #[test]
    fn a_process_on_two_gpus_is_summed_per_interval() {
        let monitor = Monitor {
            latest: Arc::default(),
            interval: Duration::from_secs(1),
            pids: Pids::Ours,
        };
        let t0 = Instant::now();
        monitor.record(Kind::Gpu, "0, H200, 1, 2, 3, 4, 5", t0);
        monitor.record(Kind::App, "10, 100", t0);
        monitor.record(Kind::App, "10, 50", t0);
        assert_eq!(monitor.memory_seen(&[10], t0, |_| true), Some(150 * MIB));
        let t1 = t0 + Duration::from_secs(1);
        monitor.record(Kind::Gpu, "0, H200, 1, 2, 3, 4, 5", t1);
        monitor.record(Kind::App, "10, 70", t1);
        assert_eq!(monitor.memory_seen(&[10, 11], t1, |_| true), Some(70 * MIB));
        let t2 = t1 + Duration::from_secs(5);
        monitor.record(Kind::Gpu, "0, H200, 1, 2, 3, 4, 5", t2);
        assert_eq!(
            monitor.memory_seen(&[10], t2, |_| true),
            Some(0),
            "its process is gone"
        );
        let later = t2 + Duration::from_secs(10);
        assert_eq!(
            monitor.memory_seen(&[10], later, |_| true),
            None,
            "no GPU reports any more"
        );
    }

    #[test]
    fn in_a_container_a_runs_gpu_memory_is_unavailable_not_zero() {
        let monitor = Monitor {
            latest: Arc::default(),
            interval: Duration::from_secs(1),
            pids: Pids::Host,
        };
        let t0 = Instant::now();
        monitor.record(Kind::Gpu, "0, H200, 1, 2, 3, 4, 5", t0);
        // A host pid: matches nothing of ours, whatever it is.
        monitor.record(Kind::App, "48213, 100", t0);
        assert_eq!(monitor.memory_seen(&[12], t0, |_| true), None);
        assert_eq!(monitor.gpus(t0).len(), 1, "per-GPU figures still show");
        assert_eq!(Pids::detect(true), Pids::Host);
    }

    #[test]
    fn reported_pids_are_matched_only_when_some_are_processes_here() {
        let here = |pid: u32| [10, 11].contains(&pid);
        assert!(pids_match(&[], here), "nothing reported: 0 is the truth");
        assert!(pids_match(&[10, 48213], here));
        assert!(
            !pids_match(&[48213, 48214], here),
            "another namespace's pids"
        );
    }
}
