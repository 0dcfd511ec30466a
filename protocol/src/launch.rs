//! How a run's command is launched (`run --launcher`, `--nproc-per-node`): the
//! environment PyTorch's distributed code reads, and, under torchrun, the command line
//! that wraps the user's command. Pure: the daemon checks a launch with these functions
//! before anything is launched, the agent resolves it (its GPU count, a free port) and
//! builds the process from it.

use serde::{Deserialize, Serialize};

/// The most processes one node may be asked for (a node has at most a few dozen GPUs).
pub const MAX_NPROC_PER_NODE: u32 = 256;
/// The most nodes one run may have (`run --nodes`).
pub const MAX_NODES: u32 = 64;
/// The rendezvous port on node 0 of a gang of cloud instances (torchrun's own default).
pub const GANG_PORT: u16 = 29500;

/// What starts the command's processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Launcher {
    /// The command itself, one process per node, with `RANK`, `WORLD_SIZE` and
    /// `LOCAL_RANK` set for it.
    None,
    /// `torchrun --no-python COMMAND`: torchrun starts `nproc_per_node` copies and sets
    /// each one's ranks.
    Torchrun,
}

/// A run's launch, as the daemon hands it to one node's agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launch {
    pub launcher: Launcher,
    /// How many nodes the run has, and which one this is.
    pub nodes: u32,
    pub rank: u32,
    /// Processes per node under torchrun; `None`: one per GPU the node has (one where it
    /// has none).
    pub nproc_per_node: Option<u32>,
    /// Node 0's address and the rendezvous port; `None` on a run of one node: loopback,
    /// on a port the agent finds free.
    pub master: Option<Master>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Master {
    pub addr: String,
    pub port: u16,
}

/// A launch with everything decided: what one node's process is started with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub launcher: Launcher,
    pub nodes: u32,
    pub rank: u32,
    pub nproc_per_node: u32,
    pub master: Master,
}

impl Launch {
    /// One node, launched by `launcher`.
    pub fn single(launcher: Launcher, nproc_per_node: Option<u32>) -> Self {
        Launch {
            launcher,
            nodes: 1,
            rank: 0,
            nproc_per_node,
            master: None,
        }
    }

    /// A launch of `nodes` nodes by `launcher` (`None`: torchrun for a Python command on
    /// more than one node, else the command as given), as the user asked for it; each
    /// node's is made from it by [`Launch::for_node`]. `None` when nothing asks for a
    /// launcher: one node, no `--launcher`.
    pub fn asked(
        launcher: Option<Launcher>,
        nproc_per_node: Option<u32>,
        nodes: u32,
        command: &[String],
    ) -> Option<Self> {
        let launcher = match launcher {
            Some(l) => l,
            None if nodes > 1 && nproc_per_node.is_some() => Launcher::Torchrun,
            None if nodes > 1 && is_python(command) => Launcher::Torchrun,
            None if nodes > 1 => Launcher::None,
            None => return None,
        };
        Some(Launch {
            launcher,
            nodes,
            rank: 0,
            nproc_per_node,
            master: None,
        })
    }

    /// Node `rank`'s launch, meeting the others at `master`.
    pub fn for_node(&self, rank: u32, master: Option<Master>) -> Self {
        Launch {
            rank,
            master,
            ..self.clone()
        }
    }

    /// Whether the launch makes sense as asked, before node 0's address is known.
    pub fn check_asked(&self) -> Result<(), String> {
        if self.nodes == 0 {
            return Err("a run has at least one node".into());
        }
        if self.nodes > MAX_NODES {
            return Err(format!(
                "--nodes {}: a run has at most {MAX_NODES} nodes",
                self.nodes
            ));
        }
        if self.rank >= self.nodes {
            return Err(format!(
                "node rank {} is not below the node count {}",
                self.rank, self.nodes
            ));
        }
        match (self.launcher, self.nproc_per_node) {
            (Launcher::None, Some(_)) => Err(
                "--nproc-per-node is torchrun's: with --launcher none each node runs one process"
                    .into(),
            ),
            (Launcher::Torchrun, Some(n)) if n == 0 || n > MAX_NPROC_PER_NODE => Err(format!(
                "--nproc-per-node {n}: a node runs 1 to {MAX_NPROC_PER_NODE} processes"
            )),
            _ => Ok(()),
        }
    }

    /// Whether the launch makes sense, with the reason when it does not.
    pub fn check(&self) -> Result<(), String> {
        self.check_asked()?;
        match &self.master {
            None if self.nodes > 1 => Err(format!(
                "a run of {} nodes needs node 0's address and port",
                self.nodes
            )),
            Some(m) if m.port == 0 => Err("the rendezvous port cannot be 0".into()),
            Some(m)
                if m.addr.is_empty()
                    || m.addr.len() > 255
                    || !m
                        .addr
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || ".-:".contains(c)) =>
            {
                Err(format!("{:?} is not a host name or an IP address", m.addr))
            }
            _ => Ok(()),
        }
    }

    /// The launch with the node's facts: its GPU count and a port free on it (used only
    /// when the launch names no master).
    pub fn resolve(&self, gpus: u32, free_port: u16) -> Resolved {
        Resolved {
            launcher: self.launcher,
            nodes: self.nodes,
            rank: self.rank,
            nproc_per_node: match self.launcher {
                Launcher::None => 1,
                Launcher::Torchrun => self.nproc_per_node.unwrap_or(gpus.max(1)),
            },
            master: self.master.clone().unwrap_or(Master {
                addr: "127.0.0.1".into(),
                port: free_port,
            }),
        }
    }

    /// The launch in a few words, for the run's start: `torchrun, 1 node x 2 processes`.
    pub fn words(&self) -> String {
        let nodes = match self.nodes {
            1 => "1 node".to_owned(),
            n => format!("{n} nodes"),
        };
        let procs = match (self.launcher, self.nproc_per_node) {
            (Launcher::None, _) | (Launcher::Torchrun, Some(1)) => "1 process".to_owned(),
            (Launcher::Torchrun, Some(n)) => format!("{n} processes"),
            (Launcher::Torchrun, None) => "a process per GPU".to_owned(),
        };
        let launcher = match self.launcher {
            Launcher::None => "no launcher",
            Launcher::Torchrun => "torchrun",
        };
        format!("{launcher}, {nodes} x {procs}")
    }
}

impl Resolved {
    /// The variables the node's command gets: torchrun's (`MASTER_ADDR`, `MASTER_PORT`,
    /// `NODE_RANK`, `NNODES`, `NPROC_PER_NODE`) and `RUNCTL_NODE_RANK`; with no launcher
    /// also the per-process ones torchrun would set (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
    /// `LOCAL_WORLD_SIZE`), since the node's one process is its rank.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("MASTER_ADDR", self.master.addr.clone()),
            ("MASTER_PORT", self.master.port.to_string()),
            ("NODE_RANK", self.rank.to_string()),
            ("NNODES", self.nodes.to_string()),
            ("NPROC_PER_NODE", self.nproc_per_node.to_string()),
            ("RUNCTL_NODE_RANK", self.rank.to_string()),
        ];
        if self.launcher == Launcher::None {
            env.extend([
                ("RANK", self.rank.to_string()),
                ("WORLD_SIZE", self.nodes.to_string()),
                ("LOCAL_RANK", "0".to_owned()),
                ("LOCAL_WORLD_SIZE", "1".to_owned()),
            ]);
        }
        env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }

    /// The node's command line: `command` itself, or under torchrun, which starts
    /// `nproc_per_node` copies of it (`--no-python`: `command` is run as given, so a
    /// `python` in it is the run's own, found in its `PATH`) after a static rendezvous at
    /// node 0's address and port. Static, not c10d: c10d hands out ranks in the order
    /// nodes join, so node 0 (the one that checkpoints, at MASTER_ADDR) could be any rank;
    /// static makes node R's processes ranks R x nproc to R x nproc + nproc - 1.
    pub fn argv(&self, command: &[String]) -> Vec<String> {
        if self.launcher == Launcher::None {
            return command.to_vec();
        }
        let mut argv: Vec<String> = [
            "torchrun",
            "--nnodes",
            &self.nodes.to_string(),
            "--nproc-per-node",
            &self.nproc_per_node.to_string(),
            "--node-rank",
            &self.rank.to_string(),
            "--master-addr",
            &self.master.addr,
            "--master-port",
            &self.master.port.to_string(),
            "--no-python",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        argv.extend(command.iter().cloned());
        argv
    }
}

/// Whether `command` runs Python: `python`, `python3` (or `python3.12`, by any path) or a
/// `.py` file.
fn is_python(command: &[String]) -> bool {
    let Some(program) = command.first() else {
        return false;
    };
    let name = program.rsplit('/').next().unwrap_or(program);
    name == "python"
        || name
            .strip_prefix("python3")
            .is_some_and(|v| v.is_empty() || v.starts_with('.'))
        || name.ends_with(".py")
}

/// What to tell a user whose launcher program is not installed, if `program` is one.
pub fn not_found_hint(program: &str) -> Option<&'static str> {
    (program == "torchrun").then_some(
        "torchrun comes with PyTorch: install torch in the run's environment (requirements.txt or pyproject.toml), or run with --launcher none",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn master(addr: &str, port: u16) -> Option<Master> {
        Some(Master {
            addr: addr.into(),
            port,
        })
    }

    #[test]
    fn check() {
        let one = Launch::single(Launcher::Torchrun, None);
        let cases: &[(&str, Launch, Result<(), &str>)] = &[
            ("one node, a process per GPU", one.clone(), Ok(())),
            (
                "one node, two processes",
                Launch::single(Launcher::Torchrun, Some(2)),
                Ok(()),
            ),
            ("no launcher", Launch::single(Launcher::None, None), Ok(())),
            (
                "nproc without torchrun",
                Launch::single(Launcher::None, Some(2)),
                Err("--nproc-per-node is torchrun's"),
            ),
            (
                "no processes",
                Launch::single(Launcher::Torchrun, Some(0)),
                Err("a node runs 1 to 256 processes"),
            ),
            (
                "too many processes",
                Launch::single(Launcher::Torchrun, Some(257)),
                Err("a node runs 1 to 256 processes"),
            ),
            (
                "no nodes",
                Launch {
                    nodes: 0,
                    ..one.clone()
                },
                Err("at least one node"),
            ),
            (
                "rank past the nodes",
                Launch {
                    nodes: 2,
                    rank: 2,
                    master: master("10.0.0.5", 29500),
                    ..one.clone()
                },
                Err("node rank 2 is not below the node count 2"),
            ),
            (
                "two nodes with a master",
                Launch {
                    nodes: 2,
                    rank: 1,
                    master: master("10.0.0.5", 29500),
                    ..one.clone()
                },
                Ok(()),
            ),
            (
                "two nodes, no master",
                Launch {
                    nodes: 2,
                    ..one.clone()
                },
                Err("needs node 0's address"),
            ),
            (
                "port zero",
                Launch {
                    master: master("10.0.0.5", 0),
                    ..one.clone()
                },
                Err("port cannot be 0"),
            ),
            (
                "an address that is not one",
                Launch {
                    master: master("10.0.0.5; rm -rf /", 29500),
                    ..one.clone()
                },
                Err("is not a host name or an IP address"),
            ),
            (
                "an IPv6 master",
                Launch {
                    master: master("fd00::5", 29500),
                    ..one.clone()
                },
                Ok(()),
            ),
        ];
        for (name, launch, want) in cases {
            match (launch.check(), want) {
                (Ok(()), Ok(())) => {}
                (Err(got), Err(want)) => assert!(got.contains(want), "{name}: {got}"),
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn asked() {
        let argv = |s: &str| s.split(' ').map(str::to_owned).collect::<Vec<_>>();
        use Launcher::{None as Plain, Torchrun};
        // launcher, nproc, nodes, command -> launcher
        type Case<'a> = (
            Option<Launcher>,
            Option<u32>,
            u32,
            &'a str,
            Option<Launcher>,
        );
        let cases: &[Case] = &[
            (None, None, 1, "python train.py", None),
            (Some(Torchrun), None, 1, "python train.py", Some(Torchrun)),
            (None, None, 2, "python train.py", Some(Torchrun)),
            (None, None, 2, "python3 -u train.py", Some(Torchrun)),
            (
                None,
                None,
                2,
                "/usr/bin/python3.12 train.py",
                Some(Torchrun),
            ),
            (None, None, 2, "./train.py", Some(Torchrun)),
            (None, None, 2, "python3x train.py", Some(Plain)),
            (None, None, 2, "bash run.sh", Some(Plain)),
            (None, Some(2), 2, "bash run.sh", Some(Torchrun)),
            (Some(Plain), None, 2, "python train.py", Some(Plain)),
        ];
        for (launcher, nproc, nodes, command, want) in cases {
            let got = Launch::asked(*launcher, *nproc, *nodes, &argv(command));
            assert_eq!(
                got.as_ref().map(|l| l.launcher),
                *want,
                "{launcher:?} {nodes} {command}"
            );
            if let Some(got) = got {
                assert_eq!((got.nodes, got.rank, got.master), (*nodes, 0, None));
            }
        }
        let too_many = Launch::asked(None, None, MAX_NODES + 1, &argv("python t.py"));
        assert!(
            too_many
                .expect("asked")
                .check_asked()
                .is_err_and(|e| e.contains("at most 64 nodes"))
        );
        let two = Launch::asked(None, None, 2, &argv("python t.py")).expect("asked");
        assert_eq!(two.check_asked(), Ok(()), "node 0's address comes later");
        assert!(two.check().is_err(), "but a node's launch needs it");
        let node = two.for_node(1, master("10.0.0.5", GANG_PORT));
        assert_eq!((node.rank, node.check()), (1, Ok(())));
    }

    #[test]
    fn the_process_count_comes_from_the_flag_else_the_gpus() {
        let cases: &[(Launcher, Option<u32>, u32, u32)] = &[
            (Launcher::Torchrun, None, 8, 8),
            (Launcher::Torchrun, None, 0, 1),
            (Launcher::Torchrun, Some(2), 8, 2),
            (Launcher::Torchrun, Some(2), 0, 2),
            (Launcher::None, None, 8, 1),
        ];
        for &(launcher, nproc, gpus, want) in cases {
            let got = Launch::single(launcher, nproc).resolve(gpus, 4000);
            assert_eq!(
                got.nproc_per_node, want,
                "{launcher:?} {nproc:?} on {gpus} GPUs"
            );
        }
    }

    #[test]
    fn one_node_meets_on_loopback_at_the_free_port_and_a_gang_at_its_master() {
        let one = Launch::single(Launcher::Torchrun, None).resolve(1, 40123);
        assert_eq!(
            one.master,
            Master {
                addr: "127.0.0.1".into(),
                port: 40123
            }
        );
        let gang = Launch {
            nodes: 2,
            rank: 1,
            master: master("10.0.0.5", 29500),
            ..Launch::single(Launcher::Torchrun, None)
        }
        .resolve(1, 40123);
        assert_eq!(gang.master.port, 29500, "the free port is this node's only");
    }

    fn env_of(r: &Resolved) -> Vec<String> {
        r.env()
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect()
    }

    #[test]
    fn torchrun_gets_the_node_variables_and_sets_the_process_ones_itself() {
        let r = Launch {
            nodes: 2,
            rank: 1,
            master: master("10.0.0.5", 29500),
            ..Launch::single(Launcher::Torchrun, Some(4))
        }
        .resolve(4, 1);
        assert_eq!(
            env_of(&r),
            [
                "MASTER_ADDR=10.0.0.5",
                "MASTER_PORT=29500",
                "NODE_RANK=1",
                "NNODES=2",
                "NPROC_PER_NODE=4",
                "RUNCTL_NODE_RANK=1",
            ]
        );
    }

    #[test]
    fn without_a_launcher_the_nodes_process_is_its_rank() {
        let r = Launch {
            nodes: 3,
            rank: 2,
            master: master("10.0.0.5", 29500),
            ..Launch::single(Launcher::None, None)
        }
        .resolve(8, 1);
        let env = env_of(&r);
        for want in [
            "RANK=2",
            "WORLD_SIZE=3",
            "LOCAL_RANK=0",
            "LOCAL_WORLD_SIZE=1",
            "NODE_RANK=2",
            "NNODES=3",
            "NPROC_PER_NODE=1",
        ] {
            assert!(env.contains(&want.to_owned()), "{want} in {env:?}");
        }
        let command = vec!["python".to_owned(), "train.py".to_owned()];
        assert_eq!(r.argv(&command), command, "run as given");
    }

    #[test]
    fn torchrun_wraps_the_command_as_given() {
        let command: Vec<String> = ["python", "-u", "train.py", "--lr", "3e-4"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        let r = Launch::single(Launcher::Torchrun, Some(2)).resolve(0, 40123);
        assert_eq!(
            r.argv(&command).join(" "),
            "torchrun --nnodes 1 --nproc-per-node 2 --node-rank 0 --master-addr 127.0.0.1 \
             --master-port 40123 --no-python python -u train.py --lr 3e-4"
        );
        let v6 = Launch {
            master: master("fd00::5", 29500),
            ..Launch::single(Launcher::Torchrun, Some(1))
        }
        .resolve(0, 1);
        let argv = v6.argv(&command);
        assert!(
            argv.windows(2).any(|w| w == ["--master-addr", "fd00::5"]),
            "{argv:?}"
        );
    }

    #[test]
    fn words() {
        let cases: &[(Launch, &str)] = &[
            (
                Launch::single(Launcher::Torchrun, Some(2)),
                "torchrun, 1 node x 2 processes",
            ),
            (
                Launch::single(Launcher::Torchrun, None),
                "torchrun, 1 node x a process per GPU",
            ),
            (
                Launch::single(Launcher::None, None),
                "no launcher, 1 node x 1 process",
            ),
            (
                Launch {
                    nodes: 2,
                    ..Launch::single(Launcher::Torchrun, Some(1))
                },
                "torchrun, 2 nodes x 1 process",
            ),
        ];
        for (launch, want) in cases {
            assert_eq!(launch.words(), *want);
        }
    }

    #[test]
    fn only_torchrun_gets_the_install_hint() {
        assert!(not_found_hint("torchrun").is_some_and(|h| h.contains("--launcher none")));
        assert_eq!(not_found_hint("python"), None);
    }
}
