//! Resource samples the agent sends at its sampling interval: the host (CPU, memory, the
//! state disk, network), each active run's process tree, and each GPU. Figures a host
//! cannot provide (no GPU driver) are simply absent.

use serde::{Deserialize, Serialize};

use crate::ids::RunId;

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct StatsSample {
    /// Agent wall-clock time, milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub host: HostStats,
    pub runs: Vec<RunStats>,
    pub gpus: Vec<GpuStats>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct HostStats {
    pub cpus: u32,
    /// Busy share of all CPUs together, 0-100.
    pub cpu_percent: f32,
    pub mem_used_bytes: u64,
    pub mem_total_bytes: u64,
    /// The filesystem holding the agent's state (work trees, logs, checkpoints).
    pub disk_used_bytes: u64,
    pub disk_total_bytes: u64,
    /// Over all interfaces but loopback, since the previous sample.
    pub net_rx_bytes_per_sec: u64,
    pub net_tx_bytes_per_sec: u64,
}

/// The process tree of a run's current attempt (its process group and descendants).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunStats {
    pub run: RunId,
    pub processes: u32,
    pub threads: u32,
    /// Summed over the processes; 100 = one core.
    pub cpu_percent: f32,
    pub rss_bytes: u64,
    /// GPU memory its processes hold, summed over GPUs (absent without a driver).
    pub gpu_mem_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct GpuStats {
    pub index: u32,
    pub name: String,
    pub util_percent: Option<f32>,
    pub mem_used_bytes: Option<u64>,
    pub mem_total_bytes: Option<u64>,
    pub temp_c: Option<f32>,
    pub power_w: Option<f32>,
}
