//! The command line: clap types only. `commands` does the work.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use protocol::{EndAction, InstanceName, RestartPolicy, RunId};

use crate::error::{ErrorCode, UserError};
use crate::provider::ec2::Ec2Launch;
use crate::provider::runpod::RunpodLaunch;
use crate::provider::{LaunchOptions, ProviderKind};
use crate::report::Format;

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  unexpected error
  2  invalid usage, argument or config file
  3  run or instance not found
  4  conflicts with the current state (e.g. the run already ended)
  5  the daemon could not be reached or started
  6  an agent is unreachable or refused the request
  7  the provider has none of what was asked now (capacity, an instance type not offered
     there, a spot price above the maximum, a quota)
  `run` and `logs --follow` exit with the remote command's status instead once it has
  ended: its exit code, 128+N for signal N, 127 if it could not be started.

Examples:
  runctl-controller run --workdir examples/quickstart -- python3 train.py
  runctl-controller --output json list
  runctl-controller logs -f run-3f9a2c1b7d4e
  runctl-controller sync --watch run-3f9a2c1b7d4e";

/// Train on a rented GPU as if it were local. This is the laptop side: it launches
/// instances, uploads your code, runs your command there, and streams its output back.
/// A background daemon (started on demand) holds the connections to the agents, so runs
/// keep going while this terminal or laptop is away.
#[derive(Debug, Parser)]
#[command(name = "runctl-controller", version, after_long_help = EXIT_CODES)]
pub struct Cli {
    /// Output format: human-readable text, or JSON for scripts (errors too).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "human",
        env = "RUNCTL_OUTPUT"
    )]
    pub output: Format,

    /// Leave out runctl's own progress lines and bars (errors, warnings and the remote
    /// command's output stay).
    #[arg(long, short = 'q', global = true)]
    pub quiet: bool,

    /// The controller's state directory (config, CA, database, socket).
    #[arg(long, global = true, env = "RUNCTL_HOME", value_name = "DIR")]
    pub home: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a command on an instance: sync the project there, start the command, stream its
    /// output here, and exit with its exit status.
    #[command(after_long_help = "\
Without --on, a fresh instance is launched for the run and terminated when the run ends
(unless --keep). Ctrl-C stops the remote command gracefully (SIGTERM, then SIGKILL after
the grace period); a second Ctrl-C detaches and leaves it running.

The command gets RUNCTL_RUN_ID, RUNCTL_CHECKPOINT_DIR and RUNCTL_DATA_DIR in its
environment, and PYTHONUNBUFFERED=1 so Python output streams live. After a restart (see
--restart), RUNCTL_RESUME_FROM names the newest checkpoint in RUNCTL_CHECKPOINT_DIR; with
--resume-from, the fetched checkpoint to start from.

Every checkpoint saved in RUNCTL_CHECKPOINT_DIR (a file closed after writing or renamed
into place, a directory renamed into place or quiet for 2 s; hidden, *.tmp and *.partial
names never) is uploaded at once to the checkpoint destination under the run's id, and a
LATEST record written when it is complete. The run ends once they are all uploaded.
--data pulls into RUNCTL_DATA_DIR first, skipping files already present and identical.

Setup (--setup auto, the default) looks at the start directory: a pyproject.toml or
uv.lock runs `uv sync`; a requirements.txt is installed with uv (or python3 -m pip without
uv); a `python script.py` whose script has PEP 723 inline metadata runs with `uv run`.
Packages go into a venv of the run's own, which comes first in the command's PATH.

A runctl.toml at the project root gives the run's settings: [run] takes these flags'
names with _ for - (command as an argv array or a sh -c string, env as a table, secrets
as a list), [profile.NAME] tables overlay it (--profile NAME). A flag given wins over the
file; --env and --secret add to it; a command after -- replaces the file's. --dry-run
shows the result. Before a tree's first sync, more than 20,000 files or 1 GiB is reported,
and asked about on a terminal (--yes skips the question).

Examples:
  runctl-controller run --workdir examples/quickstart -- python3 train.py
  runctl-controller run --dry-run --profile gpu      # with a runctl.toml
  runctl-controller run --secret HF_TOKEN --secret WANDB_API_KEY=@~/.wandb-key -- python3 train.py
  runctl-controller run --on gpu-1 --env SEED=3 -- python3 train.py --epochs 5
  runctl-controller run --restart on-failure:5 --spot-signal USR1 -- python3 train.py
  runctl-controller run --setup 'make data' --setup 'pip install -e .' -- python3 train.py
  runctl-controller run --data s3://my-bucket/imagenet/ --keep-checkpoints 3 -- python3 train.py
  runctl-controller run --resume-from run-3f9a2c1b7d4e -- python3 train.py
  runctl-controller --output json run --detach -- python3 train.py")]
    Run(Box<RunArgs>),

    /// Push local code changes to a run's tree: only what changed travels, and the
    /// training process never sees a half-applied tree.
    #[command(after_long_help = "\
The project root is the one the run was started from, unless --root. Files are compared
by BLAKE3 hash (a stat cache makes an unchanged tree cheap to check); only new and changed
content is sent, zstd-compressed; a moved or copied file the instance already has is not
sent again. Deleted files are deleted there; files the run created itself (outputs) are
left alone. Without --restart the running process keeps going, and sees each changed file
whole (it is paused for the moment the files are swapped in).

Examples:
  runctl-controller sync --dry-run run-3f9a2c1b7d4e
  runctl-controller sync --restart run-3f9a2c1b7d4e
  runctl-controller sync --watch --restart run-3f9a2c1b7d4e")]
    Sync(SyncArgs),

    /// Launch an instance; on a terminal (or with --wait), wait until its agent has
    /// connected.
    #[command(after_long_help = "\
An EC2 launch is checked before it costs anything (instance type, AMI, the running-instance
limit [ec2] max_running, prices), then shown phase by phase: the API call, pending,
running, agent enrolled. The instance gets runctl's tags, IMDSv2 only, a security group with
no inbound rules, and user-data that installs the static agent (see the README's EC2
section for the set-up).

Examples:
  runctl-controller launch
  runctl-controller launch --provider local --name dev-box
  runctl-controller launch --provider ec2 g5.xlarge
  runctl-controller launch --provider ec2 --spot --spot-fallback g6.xlarge
  runctl-controller launch --provider ec2 --volume-size 500 --keep-volume p4d.24xlarge")]
    Launch(LaunchArgs),

    /// EBS volumes for runctl instances (create, list, attach, detach, delete, snapshot,
    /// restore), and RunPod network volumes (create, list, delete).
    #[command(
        subcommand,
        after_long_help = "\
Only volumes runctl created (tagged runctl:managed) are listed or touched. A volume is made
in the availability zone of the instance it is for. Deleting refuses an attached volume,
and one tagged persistent or protected unless --force.

Examples:
  runctl-controller volume create --size 500 --instance ec2-3fa9c1 --persistent
  runctl-controller volume attach vol-0123456789abcdef0 ec2-3fa9c1
  runctl-controller volume snapshot vol-0123456789abcdef0
  runctl-controller volume restore snap-0123456789abcdef0 --instance ec2-3fa9c1

RunPod network volumes are named runctl-NAME (only those are listed or deleted), mount at
/workspace when a pod is launched with them, and only in their own data center:
  runctl-controller volume create --provider runpod --size 100 --datacenter US-KS-2 --name data
  runctl-controller launch --provider runpod --gpu \"A100 PCIe\" --volume 2q9m7x4c"
    )]
    Volume(VolumeCommand),

    /// Stand up a runctl-relay on EC2, list relays, or terminate one. A relay lets agents
    /// reach a daemon behind NAT, or where UDP is blocked.
    #[command(
        subcommand,
        after_long_help = "\
`relay launch` starts the smallest x86_64 instance ([relay] instance_type, default t3.nano)
with a public IPv4 address and a security group admitting the relay's port ([relay] port,
default 443) over UDP and TCP and nothing else. Its user-data installs the static
runctl-relay (from [relay] binary; scripts/build-static-agent.sh --relay builds one) for
this controller's CA only. It shows what the relay costs a month, and the line to add to
config.toml. Region, credentials, subnet and the artifacts bucket are [ec2]'s.

Relays are tagged runctl:role=relay: runs, list, terminate and the instance limit never
touch them; only `relay terminate` ends one. Agents' traffic passes through in QUIC's
encryption; the relay cannot read it or act as the controller.

Examples:
  runctl-controller relay launch --provider ec2
  runctl-controller relay launch --provider ec2 --port 4433 --instance-type t3a.nano
  runctl-controller relay list
  runctl-controller relay terminate relay-3fa9c1"
    )]
    Relay(RelayCommand),

    /// List instances and runs.
    #[command(after_long_help = "\
Instances terminated more than a day ago are left out unless --all.

Examples:
  runctl-controller list
  runctl-controller list --all
  runctl-controller --output json list")]
    List(ListArgs),

    /// One line: instances running, what they cost per hour, runs active.
    #[command(after_long_help = "\
Examples:
  runctl-controller status
  runctl-controller --output json status")]
    Status,

    /// Show a run's output; with --follow, keep streaming until the run ends.
    #[command(after_long_help = "\
Every line the command printed is kept, numbered, and shown exactly once, in order, even
across daemon restarts and disconnections. Setup steps, restarts and notices (spot
interruptions, lines lost to a full disk) are shown on stderr among the lines.

Examples:
  runctl-controller logs run-3f9a2c1b7d4e
  runctl-controller logs -f --tail 20 run-3f9a2c1b7d4e
  runctl-controller logs --since 10m run-3f9a2c1b7d4e
  runctl-controller --output json logs run-3f9a2c1b7d4e")]
    Logs(LogsArgs),

    /// Live resource use: CPU, memory, disk, network, each run's processes, and GPUs.
    #[command(after_long_help = "\
Samples arrive once a second from each connected agent. With a run, only its instance and
its process tree are shown. GPU figures come from nvidia-smi on the instance and are absent
where it has no NVIDIA driver. Ctrl-C ends it.

Examples:
  runctl-controller top
  runctl-controller top run-3f9a2c1b7d4e
  runctl-controller --output json top run-3f9a2c1b7d4e")]
    Top(TopArgs),

    /// Stop a run (SIGTERM to its process group, SIGKILL after the grace period), or
    /// power off an EC2 instance.
    #[command(after_long_help = "\
An instance with active runs is refused unless --force, which stops them first. A spot
instance cannot be stopped, only terminated. A stopped instance costs nothing per hour
but its volumes do.

Examples:
  runctl-controller stop run-3f9a2c1b7d4e
  runctl-controller stop --grace 60 run-3f9a2c1b7d4e
  runctl-controller stop ec2-3fa9c1")]
    Stop(StopArgs),

    /// Start a stopped EC2 instance again.
    #[command(after_long_help = "\
Examples:
  runctl-controller start ec2-3fa9c1")]
    Start(StartArgs),

    /// Terminate an instance: its agent stops its runs and pushes their checkpoints, its
    /// certificate is revoked, and (on EC2 or RunPod) the instance is terminated.
    #[command(after_long_help = "\
Refuses while the instance has active runs, unless --force (which stops them first).
A pod of a RunPod cluster (run --nodes) ends with the whole cluster: terminating one
terminates every pod of it.

Examples:
  runctl-controller terminate local-3fa9c1
  runctl-controller terminate --force gpu-1")]
    Terminate(TerminateArgs),

    /// A run's checkpoints in the object store: list, inspect, download, prune.
    #[command(
        subcommand,
        after_long_help = "\
A checkpoint is complete once all its files are in the store and its record is written;
LATEST names the newest complete one. Only complete checkpoints are listed or fetched, and
every download is checked against the content hashes taken at upload. RUN is a run id, or
the run's checkpoint prefix as s3://BUCKET/PREFIX/RUN/.

Examples:
  runctl-controller checkpoint list run-3f9a2c1b7d4e
  runctl-controller checkpoint info run-3f9a2c1b7d4e ckpt-0015.pt
  runctl-controller checkpoint download run-3f9a2c1b7d4e --to ./restore
  runctl-controller checkpoint prune --keep 3 run-3f9a2c1b7d4e"
    )]
    Checkpoint(CheckpointCommand),

    /// Your own transfers to and from the object store ([storage] in the config): ls, cp,
    /// sync, rm. Parallel, multipart, resumable downloads.
    #[command(
        subcommand,
        after_long_help = "\
Large objects move in parallel parts (ranged GETs, multipart PUTs) with per-part retries; a
download goes to a hidden partial file, renamed into place only when whole, and a cut one
resumes with the parts it lacks. Credentials come from the standard AWS chain (environment,
AWS_PROFILE or [storage] profile, SSO, instance profile).

Examples:
  runctl-controller s3 ls s3://my-bucket/datasets/
  runctl-controller s3 cp ./train.bin s3://my-bucket/datasets/
  runctl-controller s3 cp --recursive s3://my-bucket/datasets/imagenet/ ./imagenet
  runctl-controller s3 sync ./data s3://my-bucket/data
  runctl-controller s3 rm --recursive s3://my-bucket/scratch/"
    )]
    S3(ObjectCommand),

    /// Run a command on a run's instance, in the run's tree with its environment (or in
    /// an instance's home), as `ssh host cmd` would; exit with its status.
    #[command(after_long_help = "\
In a run, the command starts in the run's start directory with the run's environment:
RUNCTL_RUN_ID, RUNCTL_CHECKPOINT_DIR, RUNCTL_DATA_DIR, the run's --env variables, and its
venv first in PATH. Given an instance, it starts in the agent's home with the agent's
environment. Stdout and stderr come back apart; stdin is forwarded when it is not a
terminal (a file or a pipe). Ctrl-C sends SIGINT to the remote command (SIGTERM and SIGHUP
are passed on too); a third Ctrl-C hangs up on it. The command is not a run: nothing restarts it, it ends if this
connection does, and it is a line in the agent's audit log. The exit status is the
command's (128+N for signal N), 255 if the connection was lost.

Examples:
  runctl-controller exec run-3f9a2c1b7d4e -- nvidia-smi
  runctl-controller exec run-3f9a2c1b7d4e -- ls -la outputs/
  runctl-controller exec run-3f9a2c1b7d4e -- python - < inspect.py
  runctl-controller exec gpu-1 -- df -h")]
    Exec(ExecArgs),

    /// An interactive shell on a run's instance (in its tree, with its environment), or in
    /// an instance's home.
    #[command(after_long_help = "\
A terminal on the instance: a PTY sized to this one (and resized with it), TERM passed
through, Ctrl-C and Ctrl-Z going to the remote foreground job as on any terminal. `exit N`
ends it with status N. If the connection drops, the shell is hung up on and this command
says so and exits with 255. Needs a terminal here; use `exec` from scripts.

Examples:
  runctl-controller shell run-3f9a2c1b7d4e
  runctl-controller shell gpu-1")]
    Shell(ShellArgs),

    /// Forward local TCP ports to ports on a run's instance (as ssh -L does), until Ctrl-C.
    #[command(after_long_help = "\
Each forward is [LOCAL:][HOST:]REMOTE: connections to LOCAL on this machine (127.0.0.1
unless --bind; LOCAL defaults to REMOTE, 0 picks a free port) reach HOST:REMOTE as the
instance sees it (HOST defaults to its loopback). Each connection is a stream of the
agent's own channel: nothing listens on the instance beyond the server itself. A line on
stderr says when each forward listens. Hosts other than the instance's loopback are
refused unless the agent's config allows them ([agent] forward_hosts).

Examples:
  runctl-controller forward run-3f9a2c1b7d4e 6006
  runctl-controller forward run-3f9a2c1b7d4e 6006 8888:8888
  runctl-controller forward run-3f9a2c1b7d4e 16006:localhost:6006
  runctl-controller forward --bind 0.0.0.0 gpu-1 8080")]
    Forward(ForwardArgs),

    /// Copy files and directories between this machine and an instance, as `docker cp`
    /// does.
    #[command(after_long_help = "\
One side is RUN:PATH or INSTANCE:PATH. A relative remote path is in the run's tree (from
its start directory), or in the instance's home; absolute ones must be under the agent's
allowed roots (its state directory and home unless [agent] copy_roots says otherwise). A
directory is copied whole; into an existing directory it lands under its own name,
otherwise it is created as DEST. Modes and symlinks are kept. The copy is compressed on
the way and shown with a progress bar on a terminal; it is written beside its destination
and renamed into place only when whole, so a cut copy leaves nothing under the final name.

Examples:
  runctl-controller cp run-3f9a2c1b7d4e:outputs ./results
  runctl-controller cp run-3f9a2c1b7d4e:/var/lib/runctl/runs/run-3f9a2c1b7d4e/checkpoints .
  runctl-controller cp ./configs run-3f9a2c1b7d4e:configs
  runctl-controller cp notes.txt gpu-1:")]
    Cp(CpArgs),

    /// Run the controller daemon in the foreground (other commands start it on demand).
    #[command(after_long_help = "\
Logs go to stderr (RUNCTL_LOG=debug for more). Stops cleanly on SIGTERM or Ctrl-C;
agents and their runs keep going and reconnect when it is back.

Examples:
  runctl-controller daemon
  RUNCTL_LOG=debug runctl-controller --home /tmp/rc daemon")]
    Daemon,

    /// Stop the background daemon. Runs on agents keep going.
    #[command(after_long_help = "\
Examples:
  runctl-controller shutdown")]
    Shutdown,

    /// See and change the controller's configuration (config.toml) by dotted key.
    #[command(
        subcommand,
        after_long_help = "\
Keys are dotted paths into config.toml: daemon.stop_grace_secs, ec2.max_running,
storage.backend, agent.allow_shell. `set` and `unset` keep the file's comments and order,
and check the result as loading does before replacing the file; a value that would not
load is refused with the reason and the file is left alone. A change applies to the
daemon's next start (runctl-controller shutdown) and to instances launched after it.

Examples:
  runctl-controller config path
  runctl-controller config show
  runctl-controller config get ec2.region
  runctl-controller config set daemon.stop_grace_secs 30
  runctl-controller config set agent.forward_hosts '[\"10.0.0.5\"]'
  runctl-controller config unset daemon.stop_grace_secs
  runctl-controller config validate ./other-config.toml"
    )]
    Config(ConfigCommand),

    /// Check the set-up: the config, the daemon, the object store, each configured
    /// provider (credentials, instance profile, GPU quota, the static agent), how agents
    /// reach this daemon, and the clock; one line each, with the fix when something fails.
    #[command(after_long_help = "\
Only harmless calls are made: STS GetCallerIdentity, IAM GetInstanceProfile, Service Quotas
GetServiceQuota, RunPod's GPU catalog, and a probe object written to the checkpoint bucket
and deleted. A provider is checked when config.toml has its table ([ec2], [runpod]) or,
for RunPod, RUNPOD_API_KEY is set. Exits 1 when a check failed, 0 otherwise (warnings
included).

Examples:
  runctl-controller doctor
  runctl-controller --output json doctor")]
    Doctor,

    /// Print a shell completion script for bash, zsh or fish.
    #[command(after_long_help = "\
Load it in the current shell, or install it where the shell looks for completions.

Examples:
  source <(runctl-controller completions bash)
  runctl-controller completions bash > ~/.local/share/bash-completion/completions/runctl-controller
  runctl-controller completions zsh > ~/.zfunc/_runctl-controller   # with fpath+=(~/.zfunc)
  runctl-controller completions fish > ~/.config/fish/completions/runctl-controller.fish")]
    Completions(CompletionsArgs),

    /// Print the man page (roff), or write one page per command into a directory.
    #[command(after_long_help = "\
Examples:
  runctl-controller man | man -l -
  runctl-controller man --dir ~/.local/share/man/man1   # then: man runctl-controller-run")]
    Man(ManArgs),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the config file's path.
    #[command(after_long_help = "Examples:\n  runctl-controller config path")]
    Path,
    /// Every key with its value and where it came from (default, file, environment).
    #[command(
        after_long_help = "Examples:\n  runctl-controller config show\n  runctl-controller --output json config show"
    )]
    Show,
    /// One key's value, bare (strings unquoted); exit 2 for a key that does not exist.
    #[command(after_long_help = "Examples:\n  runctl-controller config get daemon.stop_grace_secs")]
    Get {
        /// A dotted key, e.g. ec2.region.
        #[arg(value_name = "KEY")]
        key: String,
    },
    /// Set a key in config.toml (checked before the file is replaced).
    #[command(
        after_long_help = "Examples:\n  runctl-controller config set ec2.max_running 8\n  runctl-controller config set storage.backend s3"
    )]
    Set {
        /// A dotted key, e.g. ec2.max_running.
        #[arg(value_name = "KEY")]
        key: String,
        /// The value: as it is for a text key, a TOML literal otherwise (8, true,
        /// [\"a\", \"b\"]).
        #[arg(value_name = "VALUE", allow_hyphen_values = true)]
        value: String,
    },
    /// Remove a key from config.toml: its default applies again.
    #[command(after_long_help = "Examples:\n  runctl-controller config unset ec2.max_running")]
    Unset {
        /// A dotted key, e.g. ec2.max_running.
        #[arg(value_name = "KEY")]
        key: String,
    },
    /// Check a config file (default: this home's) as loading does; exit 2 if it is invalid.
    #[command(
        after_long_help = "Examples:\n  runctl-controller config validate\n  runctl-controller config validate ./staging.toml"
    )]
    Validate {
        /// The file to check.
        #[arg(value_name = "FILE")]
        file: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Also instances terminated more than a day ago.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum, value_name = "SHELL")]
    pub shell: CompletionShell,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write runctl-controller.1 and a page for each command (runctl-controller-run.1,
    /// ...) into this directory instead of printing the main page.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Run on this existing instance (see `list`), instead of launching one.
    #[arg(long, value_name = "NAME", conflicts_with = "provider")]
    pub on: Option<InstanceName>,

    /// Where to launch the instance for this run (default: local).
    #[arg(long, value_enum)]
    pub provider: Option<ProviderKind>,

    /// For --provider ec2: the instance type, e.g. g5.xlarge, or types to try in order,
    /// e.g. g6e.xlarge,g5.xlarge: the next is tried when EC2 has none of one (no capacity,
    /// not offered in the region, spot above the maximum, a used-up quota), at launch and
    /// at a relaunch.
    #[arg(long, value_name = "TYPE[,TYPE...]", conflicts_with = "on", value_parser = parse_instance_type)]
    pub instance_type: Option<String>,

    #[command(flatten)]
    pub ec2: Ec2Args,

    #[command(flatten)]
    pub runpod: RunpodArgs,

    /// The directory to start the command in. The project holding it (its git root, else
    /// the directory itself) is synced, honouring .gitignore and .runctlignore.
    /// (Default: the current directory; a run file's `workdir` is relative to the root.)
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<PathBuf>,

    /// Sync this directory as the project root instead of the git root.
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,

    /// An environment variable for the command, as KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,

    /// Return once the command has started, printing the run id, instead of streaming.
    #[arg(long, short = 'd')]
    pub detach: bool,

    /// Forward a local port to the instance while the run goes on (as `forward` does:
    /// [LOCAL:][HOST:]REMOTE, e.g. 6006 for TensorBoard); repeatable. Not with --detach
    /// (use `forward RUN PORT` beside a detached run).
    #[arg(long, value_parser = parse_forward, value_name = "FORWARD", conflicts_with = "detach")]
    pub forward: Vec<crate::ipc::ForwardSpec>,

    /// Keep the instance launched for this run after the run ends.
    #[arg(long, conflicts_with_all = ["on", "end"])]
    pub keep: bool,

    /// Setup before the command: `auto` (detect uv/pip, the default), `none`, or a shell
    /// command (repeatable; run in order, the first failure fails the run).
    #[arg(long, value_name = "auto|none|COMMAND")]
    pub setup: Vec<String>,

    /// Start the command again when it ends by itself: `never`, `on-failure[:N]` (at most N
    /// times, default 3) or `always`; with backoff from 1 s to 60 s.
    #[arg(long, value_name = "POLICY", value_parser = parse_restart)]
    pub restart: Option<RestartPolicy>,

    /// Seconds between SIGTERM and SIGKILL when the command is stopped (default:
    /// [daemon] stop_grace_secs, 10).
    #[arg(long, value_name = "SECS")]
    pub stop_grace: Option<u64>,

    /// What the instance does when the run ends (default: terminate an instance launched
    /// for the run, keep one given with --on).
    #[arg(long, value_enum, value_name = "ACTION")]
    pub end: Option<EndArg>,

    /// The signal sent to the command when a spot interruption notice arrives, so it can
    /// checkpoint: TERM (the default), INT, HUP, QUIT, USR1 or USR2.
    #[arg(long, value_name = "SIGNAL", value_parser = parse_signal)]
    pub spot_signal: Option<i32>,

    /// What a spot run does when its instance is taken back: `end` (the default: the run
    /// ends interrupted) or `relaunch[:N]` (at most N times, default 3): a replacement of
    /// the same type is launched, the project synced to it, and the command started again
    /// from the newest checkpoint in the store (RUNCTL_RESUME_FROM); one run, one log. An
    /// interruption while the daemon is away (the laptop asleep) is relaunched when it is
    /// back. A gang (--nodes) is relaunched whole, on new instances. Needs --spot on
    /// instances launched for the run.
    #[arg(long, value_name = "end|relaunch[:N]", value_parser = crate::relaunch::parse)]
    pub on_interrupt: Option<crate::relaunch::OnInterrupt>,

    /// Stop the run once it has cost this many dollars (its instance's price times its
    /// time, from its launch), the graceful way: SIGTERM, the grace period, checkpoints
    /// pushed, then the end action; it ends `budget exceeded`. The agent holds the cap, so
    /// it holds while this laptop sleeps. Needs a known price (EC2, RunPod).
    #[arg(long, value_name = "DOLLARS", value_parser = parse_dollars)]
    pub max_cost: Option<f64>,

    /// Stop the run the same way once it has taken this many hours (from its launch, or
    /// its start on an existing instance), e.g. 1.5.
    #[arg(long, value_name = "HOURS", value_parser = parse_hours)]
    pub max_hours: Option<f64>,

    /// Launch the command the way PyTorch's distributed training expects. `torchrun`: run
    /// it under torchrun (`torchrun --nproc-per-node N --node-rank R --master-addr ...
    /// --no-python COMMAND`), which starts N copies and sets each one's RANK, LOCAL_RANK
    /// and WORLD_SIZE; torchrun must be in the run's environment (it comes with torch).
    /// `none`: run it as given, as the one process of its node (RANK=NODE_RANK,
    /// WORLD_SIZE=NNODES, LOCAL_RANK=0). Either way it gets MASTER_ADDR, MASTER_PORT (node
    /// 0's), NODE_RANK, NNODES, NPROC_PER_NODE and RUNCTL_NODE_RANK. Default: run as given,
    /// without these, on one node; with --nodes, torchrun for a Python command, else none.
    #[arg(long, value_enum, value_name = "LAUNCHER")]
    pub launcher: Option<LauncherArg>,

    /// Processes torchrun starts on the node (default: one per GPU the node has, one
    /// where it has none).
    #[arg(long, value_name = "N")]
    pub nproc_per_node: Option<u32>,

    /// Run on this many instances at once, launched together for the run (all or none),
    /// each with the code synced and NODE_RANK set; node 0's private address is every
    /// node's MASTER_ADDR. The launcher defaults to torchrun when the command is python,
    /// python3 or a .py file, else to none. A node that fails stops the others; the run
    /// ends when every node has, or, under --restart, starts again on every node from the
    /// newest checkpoint. Local; EC2 (one cluster placement group and zone, a security
    /// group open only to the gang's members); RunPod (one cluster of 2 to 250 on-demand
    /// pods, which end together: no --spot, no --end stop).
    #[arg(long, value_name = "N", conflicts_with = "on")]
    pub nodes: Option<u32>,

    /// Which nodes of a gang push checkpoints: `node0` (the default: every rank of
    /// data-parallel training holds the same weights) or `all` (node R pushes to its own
    /// prefix beside the run's, RUN-nodeR/).
    #[arg(long, value_enum, value_name = "NODES", requires = "nodes")]
    pub checkpoints_from: Option<CheckpointsFrom>,

    /// Pull data before the command starts: every object under an s3:// prefix (or one
    /// object) into DEST inside RUNCTL_DATA_DIR (default: the prefix's last name).
    /// Repeatable. Files already present and identical are skipped.
    #[arg(long, value_name = "s3://BUCKET/PREFIX[=DEST]", value_parser = parse_data)]
    pub data: Vec<protocol::DataSource>,

    /// Start the command while the data is still being pulled.
    #[arg(long, requires = "data")]
    pub pull_alongside: bool,

    /// Push checkpoints to this prefix (the run id is appended; default: [storage]
    /// checkpoints, which for the local store is s3://runctl/checkpoints).
    #[arg(
        long,
        value_name = "s3://BUCKET/PREFIX",
        conflicts_with = "no_checkpoints"
    )]
    pub checkpoints: Option<String>,

    /// Do not push checkpoints.
    #[arg(long)]
    pub no_checkpoints: bool,

    /// Keep only the newest N complete checkpoints in the store (default: [storage]
    /// keep_checkpoints; 0 keeps all). The newest complete one is never deleted.
    #[arg(long, value_name = "N", conflicts_with = "no_checkpoints")]
    pub keep_checkpoints: Option<u32>,

    /// Start from the newest complete checkpoint of an earlier run (its id) or of an
    /// s3:// checkpoint prefix: it is fetched before the command starts and its path given
    /// in RUNCTL_RESUME_FROM.
    #[arg(long, value_name = "RUN|s3://...")]
    pub resume_from: Option<String>,

    /// A secret for the command's environment, from this machine's environment variable
    /// NAME, or NAME=@FILE from a file (repeatable). It travels to the agent at start and
    /// is never stored: not in the daemon's database, `list`, or the agent's files; the
    /// command's output shows it as [secret NAME].
    #[arg(long, value_name = "NAME[=@FILE]", value_parser = parse_secret)]
    pub secret: Vec<SecretSpec>,

    /// Use the run file's [profile.NAME] over its [run] (runctl.toml at the project root).
    #[arg(long, value_name = "NAME")]
    pub profile: Option<String>,

    /// Print the run as resolved from the run file and the flags (what would launch, where,
    /// with what) and the tree that would be synced, without doing anything.
    #[arg(long)]
    pub dry_run: bool,

    /// Send a big tree (over 20,000 files or 1 GiB) without asking.
    #[arg(long, short = 'y')]
    pub yes: bool,

    /// The command to run and its arguments, after `--` (default: the run file's
    /// `command`).
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// `--secret NAME` or `NAME=@FILE`: where a secret's value is read on this machine.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SecretSpec {
    pub name: String,
    /// Read from this file (trailing newline dropped) instead of the environment.
    pub file: Option<PathBuf>,
}

pub(crate) fn parse_secret(s: &str) -> Result<SecretSpec, String> {
    let (name, file) = match s.split_once('=') {
        None => (s, None),
        Some((name, at)) => match at.strip_prefix('@') {
            Some(path) if !path.is_empty() => (name, Some(PathBuf::from(path))),
            _ => {
                return Err(format!(
                    "{name:?}: a secret's value is not written on the command line; use --secret {name} (from the environment) or --secret {name}=@FILE"
                ));
            }
        },
    };
    parse_env(&format!("{name}=")).map_err(|e| format!("secret {e}"))?;
    Ok(SecretSpec {
        name: name.to_owned(),
        file,
    })
}

#[derive(Debug, Subcommand)]
pub enum CheckpointCommand {
    /// The run's complete checkpoints, oldest first, with the one LATEST names.
    List {
        /// A run id, or an s3:// checkpoint prefix.
        #[arg(value_name = "RUN|s3://...")]
        target: String,
    },
    /// One checkpoint's files, sizes and content hashes (default: the latest).
    Info {
        /// A run id, or an s3:// checkpoint prefix.
        #[arg(value_name = "RUN|s3://...")]
        target: String,
        /// The checkpoint's name (see `checkpoint list`).
        name: Option<String>,
    },
    /// Download a checkpoint (default: the latest) and verify its content.
    Download {
        /// A run id, or an s3:// checkpoint prefix.
        #[arg(value_name = "RUN|s3://...")]
        target: String,
        /// The checkpoint's name (see `checkpoint list`).
        name: Option<String>,
        /// The directory to put it in.
        #[arg(long, value_name = "DIR", default_value = ".")]
        to: PathBuf,
    },
    /// Delete all but the newest N complete checkpoints; the latest is never deleted.
    Prune {
        /// A run id, or an s3:// checkpoint prefix.
        #[arg(value_name = "RUN|s3://...")]
        target: String,
        /// How many to keep.
        #[arg(long, value_name = "N")]
        keep: u32,
    },
}

#[derive(Debug, Subcommand)]
pub enum ObjectCommand {
    /// List objects and prefixes under an s3:// URL (one level, unless --recursive).
    Ls {
        /// The bucket and prefix to list.
        #[arg(value_name = "s3://BUCKET/PREFIX")]
        url: String,
        /// Every object below, not just one level.
        #[arg(long, short = 'r')]
        recursive: bool,
    },
    /// Copy a file or directory up, or an object or prefix down.
    Cp {
        /// A local path or an s3:// URL.
        source: String,
        /// A local path or an s3:// URL (a trailing '/' means "into").
        dest: String,
        /// Copy a whole directory or prefix.
        #[arg(long, short = 'r')]
        recursive: bool,
    },
    /// Copy only what differs: up, files missing, resized or newer locally; down, files
    /// missing or not identical (size and time) locally.
    Sync { source: String, dest: String },
    /// Delete an object, or everything under a prefix with --recursive.
    Rm {
        /// The object, or with --recursive the prefix.
        #[arg(value_name = "s3://BUCKET/KEY")]
        url: String,
        #[arg(long, short = 'r')]
        recursive: bool,
    },
}

#[derive(Debug, Args)]
pub struct SyncArgs {
    /// The run whose tree to update, e.g. run-3f9a2c1b7d4e.
    pub run: RunId,

    /// The local project root to sync (default: the one the run was started from).
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,

    /// List what would change, and change nothing.
    #[arg(long, conflicts_with_all = ["watch", "restart"])]
    pub dry_run: bool,

    /// Keep watching the project and push each change within half a second of a save;
    /// Ctrl-C ends it.
    #[arg(long)]
    pub watch: bool,

    /// Restart the run's command after the sync (SIGTERM, SIGKILL after the grace period,
    /// then start it again in the new tree). With --watch, only after syncs that changed
    /// something.
    #[arg(long)]
    pub restart: bool,
}

#[derive(Debug, Args)]
pub struct LaunchArgs {
    /// Where to launch it.
    #[arg(long, value_enum, default_value = "local")]
    pub provider: ProviderKind,

    /// For --provider ec2: the instance type, e.g. g5.xlarge, or types to try in order
    /// (g6e.xlarge,g5.xlarge) when EC2 has none of one.
    #[arg(value_name = "INSTANCE_TYPE[,TYPE...]", value_parser = parse_instance_type)]
    pub instance_type: Option<String>,

    /// The instance's name (default: generated, e.g. local-3fa9c1, ec2-3fa9c1).
    #[arg(long, value_name = "NAME")]
    pub name: Option<InstanceName>,

    /// Wait until the agent has enrolled (the default on a terminal).
    #[arg(long, conflicts_with = "no_wait")]
    pub wait: bool,

    /// Return once the instance exists (the default when output is not a terminal).
    #[arg(long)]
    pub no_wait: bool,

    #[command(flatten)]
    pub ec2: Ec2Args,

    #[command(flatten)]
    pub runpod: RunpodArgs,
}

/// RunPod launch options, shared by `launch` and `run` (with --spot and --max-price).
#[derive(Debug, Clone, Args)]
pub struct RunpodArgs {
    /// For --provider runpod: the GPU type, by RunPod's id or name, e.g. "NVIDIA A100
    /// 80GB PCIe" (checked against RunPod's catalog; near names are suggested).
    #[arg(long, value_name = "GPU")]
    pub gpu: Option<String>,

    /// For --provider runpod: how many GPUs the pod has (default 1).
    #[arg(long, value_name = "N", requires = "gpu")]
    pub gpus: Option<u32>,

    /// For --provider runpod: the image (default: [runpod] image). It needs sh and one of
    /// curl, wget or python3, and an entrypoint that runs its arguments.
    #[arg(long, value_name = "IMAGE", requires = "gpu")]
    pub image: Option<String>,

    /// For --provider runpod: the data center, e.g. US-TX-3 (default: [runpod]
    /// datacenter, else RunPod's choice).
    #[arg(long, value_name = "ID", requires = "gpu")]
    pub datacenter: Option<String>,

    /// For --provider runpod: the container disk in GB (default: [runpod] disk_gb).
    #[arg(long, value_name = "GB", requires = "gpu")]
    pub disk: Option<u32>,

    /// For --provider runpod: a network volume (its id) mounted at /workspace instead of
    /// the pod's own volume.
    #[arg(long, value_name = "VOLUME_ID", requires = "gpu")]
    pub volume: Option<String>,
}

impl RunpodArgs {
    pub fn any(&self) -> bool {
        self.gpu.is_some()
            || self.gpus.is_some()
            || self.image.is_some()
            || self.datacenter.is_some()
            || self.disk.is_some()
            || self.volume.is_some()
    }
}

/// EC2 launch options, shared by `launch` and `run`.
#[derive(Debug, Clone, Args)]
pub struct Ec2Args {
    /// The AMI (default: [ec2] ami, else the newest AWS Deep Learning Base AMI for GPUs).
    #[arg(long, value_name = "ami-ID", value_parser = parse_ami)]
    pub ami: Option<String>,

    /// Launch as a spot instance (EC2: a one-time request; RunPod: an interruptible pod);
    /// interruptions reach the run as --spot-signal.
    #[arg(long)]
    pub spot: bool,

    /// The most to pay per hour for spot, in dollars, for the whole instance (default: the
    /// on-demand price; on RunPod it becomes the bid per GPU).
    #[arg(long, value_name = "DOLLARS", requires = "spot", value_parser = parse_price)]
    pub max_price: Option<f64>,

    /// When spot capacity (or price) is not there, launch on-demand instead, with a warning.
    #[arg(long, requires = "spot")]
    pub spot_fallback: bool,

    /// The IAM instance profile (name or ARN) that gives the agent the bucket (default:
    /// [ec2] instance_profile).
    #[arg(long, value_name = "PROFILE")]
    pub instance_profile: Option<String>,

    /// Attach a new gp3 data volume of this many GiB at launch (device /dev/sdf).
    #[arg(long, value_name = "GIB")]
    pub volume_size: Option<u32>,

    /// Attach a data volume restored from this snapshot at launch (device /dev/sdf).
    #[arg(long, value_name = "snap-ID", value_parser = parse_snapshot)]
    pub volume_snapshot: Option<String>,

    /// Keep the data volume when the instance terminates (default: deleted with it).
    #[arg(long)]
    pub keep_volume: bool,
}

impl Ec2Args {
    pub fn any(&self) -> bool {
        self.ami.is_some()
            || self.spot
            || self.max_price.is_some()
            || self.spot_fallback
            || self.instance_profile.is_some()
            || self.volume_size.is_some()
            || self.volume_snapshot.is_some()
            || self.keep_volume
    }
}

/// The launch options `--provider` and its flags ask for; refuses flags of another
/// provider, an EC2 launch without an instance type and a RunPod one without a GPU.
pub fn launch_options(
    provider: ProviderKind,
    instance_type: Option<String>,
    ec2: &Ec2Args,
    runpod: &RunpodArgs,
) -> Result<LaunchOptions, UserError> {
    let ec2_only = instance_type.is_some()
        || ec2.ami.is_some()
        || ec2.spot_fallback
        || ec2.instance_profile.is_some()
        || ec2.volume_size.is_some()
        || ec2.volume_snapshot.is_some()
        || ec2.keep_volume;
    match provider {
        ProviderKind::Local if ec2_only || ec2.any() || runpod.any() => Err(UserError::new(
            ErrorCode::BadInput,
            "cloud options (an instance type, --gpu, --spot, --ami, ...) apply to --provider ec2 or runpod",
        )
        .resolve("add --provider ec2 or --provider runpod, or leave the cloud options out")),
        ProviderKind::Local => Ok(LaunchOptions::Local),
        ProviderKind::Ec2 if runpod.any() => Err(UserError::new(
            ErrorCode::BadInput,
            "--gpu, --gpus, --image, --datacenter, --disk and --volume apply to --provider runpod",
        )
        .resolve("an EC2 instance's GPUs come with its instance type, e.g. g5.xlarge")),
        ProviderKind::Ec2 => {
            let Some(instance_type) = instance_type else {
                return Err(UserError::new(
                    ErrorCode::BadInput,
                    "an EC2 launch needs an instance type",
                )
                .resolve("e.g. runctl-controller launch --provider ec2 g5.xlarge"));
            };
            let mut types = instance_type.split(',').map(str::to_owned);
            Ok(LaunchOptions::Ec2(Box::new(Ec2Launch {
                instance_type: types.next().unwrap_or_default(),
                other_types: types.collect(),
                ami: ec2.ami.clone(),
                spot: ec2.spot,
                // Spot-only settings (a run file's [run] may hold them under a profile
                // that turns spot off) go with spot.
                max_price: ec2.max_price.filter(|_| ec2.spot),
                spot_fallback: ec2.spot_fallback && ec2.spot,
                instance_profile: ec2.instance_profile.clone(),
                volume_gb: ec2.volume_size,
                volume_snapshot: ec2.volume_snapshot.clone(),
                keep_volume: ec2.keep_volume,
                project: None,
                gang: None,
            })))
        }
        ProviderKind::Runpod if ec2_only => Err(UserError::new(
            ErrorCode::BadInput,
            "instance types, --ami, --spot-fallback, --instance-profile and --volume-size/--volume-snapshot/--keep-volume apply to --provider ec2",
        )
        .resolve("a pod is named by its GPU: --gpu \"NVIDIA A100 80GB PCIe\" [--gpus N]")),
        ProviderKind::Runpod => {
            let Some(gpu) = runpod.gpu.clone() else {
                return Err(UserError::new(ErrorCode::BadInput, "a RunPod launch needs --gpu")
                    .resolve("e.g. runctl-controller launch --provider runpod --gpu \"NVIDIA A100 80GB PCIe\""));
            };
            Ok(LaunchOptions::Runpod(Box::new(RunpodLaunch {
                gpu,
                gpus: runpod.gpus.unwrap_or(1),
                spot: ec2.spot,
                max_price: ec2.max_price.filter(|_| ec2.spot),
                image: runpod.image.clone(),
                datacenter: runpod.datacenter.clone(),
                disk_gb: runpod.disk,
                volume: runpod.volume.clone(),
            })))
        }
    }
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The run (see `list`), e.g. run-3f9a2c1b7d4e.
    pub run: RunId,

    /// Keep streaming new output until the run ends, then exit with its status.
    #[arg(long, short = 'f')]
    pub follow: bool,

    /// Only output since this long ago (e.g. 10m, 2h) or this time (RFC 3339, e.g.
    /// 2026-11-28T09:00:00Z).
    #[arg(long, value_name = "WHEN", value_parser = parse_since)]
    pub since: Option<std::time::SystemTime>,

    /// Only the last N lines of output (and what follows them).
    #[arg(long, value_name = "N")]
    pub tail: Option<u64>,

    /// Only node R's output, of a run of several nodes (`run --nodes`); without it every
    /// node's lines are shown merged, each prefixed `[node R]`.
    #[arg(long, value_name = "R")]
    pub node: Option<u32>,
}

/// A run id or an instance name: where `exec`, `shell`, `forward` and `cp` go.
pub fn parse_target(text: &str) -> Result<crate::ipc::Target, String> {
    use crate::ipc::Target;
    if let Ok(run) = text.parse::<RunId>() {
        return Ok(Target::Run(run));
    }
    text.parse::<InstanceName>()
        .map(Target::Instance)
        .map_err(|e| {
            format!("{text:?} is neither a run id (run-3f9a2c1b7d4e) nor an instance name: {e}")
        })
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// A run (its tree and environment), e.g. run-3f9a2c1b7d4e, or an instance (its
    /// agent's home).
    #[arg(value_parser = parse_target, value_name = "RUN|INSTANCE")]
    pub target: crate::ipc::Target,

    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ShellArgs {
    /// A run (its tree and environment), e.g. run-3f9a2c1b7d4e, or an instance.
    #[arg(value_parser = parse_target, value_name = "RUN|INSTANCE")]
    pub target: crate::ipc::Target,
}

#[derive(Debug, Args)]
pub struct ForwardArgs {
    /// A run, e.g. run-3f9a2c1b7d4e, or an instance.
    #[arg(value_parser = parse_target, value_name = "RUN|INSTANCE")]
    pub target: crate::ipc::Target,

    /// [LOCAL:][HOST:]REMOTE, e.g. 6006, 8888:8888, 16006:localhost:6006.
    #[arg(required = true, value_parser = parse_forward, value_name = "FORWARD")]
    pub forwards: Vec<crate::ipc::ForwardSpec>,

    /// The local address to listen on.
    #[arg(long, default_value = "127.0.0.1", value_name = "ADDR")]
    pub bind: std::net::IpAddr,
}

#[derive(Debug, Args)]
pub struct CpArgs {
    /// RUN:PATH, INSTANCE:PATH or a local path.
    pub source: String,
    /// RUN:PATH, INSTANCE:PATH or a local path (one side must be remote).
    pub dest: String,
}

/// `[LOCAL:][HOST:]REMOTE`, as ssh -L takes it (without the bind address: `--bind`).
pub fn parse_forward(text: &str) -> Result<crate::ipc::ForwardSpec, String> {
    let port = |p: &str, what: &str, zero_ok: bool| -> Result<u16, String> {
        match p.parse::<u16>() {
            Ok(0) if !zero_ok => Err(format!("{what} port 0 is not a port")),
            Ok(n) => Ok(n),
            Err(_) => Err(format!("{what} port {p:?} is not a port number (1-65535)")),
        }
    };
    let bad = || {
        format!(
            "{text:?} is not [LOCAL:][HOST:]REMOTE (e.g. 6006, 8888:8888, 16006:localhost:6006)"
        )
    };
    // An IPv6 host is written in brackets: 8080:[::1]:80.
    let (head, host, remote) = if let Some(open) = text.find('[') {
        let close = text.find(']').ok_or_else(bad)?;
        let head = text[..open].strip_suffix(':').ok_or_else(bad)?;
        let remote = text[close + 1..].strip_prefix(':').ok_or_else(bad)?;
        (Some(head), Some(&text[open + 1..close]), remote)
    } else {
        let parts: Vec<&str> = text.split(':').collect();
        match parts.as_slice() {
            [remote] => (None, None, *remote),
            [a, remote] => (Some(*a), None, *remote),
            [a, host, remote] => (Some(*a), Some(*host), *remote),
            _ => return Err(bad()),
        }
    };
    if host.is_some_and(str::is_empty) || head.is_some_and(str::is_empty) {
        return Err(bad());
    }
    Ok(crate::ipc::ForwardSpec {
        local_port: head.map(|p| port(p, "the local", true)).transpose()?,
        host: host.unwrap_or("127.0.0.1").to_owned(),
        port: port(remote, "the remote", false)?,
    })
}

#[derive(Debug, Args)]
pub struct TopArgs {
    /// Only this run's instance and processes, e.g. run-3f9a2c1b7d4e.
    pub run: Option<RunId>,
}

/// Whose volumes a `volume` command is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum VolumeProvider {
    /// EBS volumes.
    Ec2,
    /// RunPod network volumes (mounted at /workspace by `launch --provider runpod
    /// --volume ID`, in their data center).
    Runpod,
}

/// Where a new volume goes and how it is tagged (`volume create` and `volume restore`).
#[derive(Debug, Args)]
pub struct NewVolumeArgs {
    /// EBS (ec2) or a RunPod network volume (runpod).
    #[arg(long, value_enum, default_value = "ec2")]
    pub provider: VolumeProvider,
    /// RunPod: the data center, e.g. US-KS-2 (pods that mount it run there).
    #[arg(long, value_name = "DC", conflicts_with_all = ["zone", "instance"])]
    pub datacenter: Option<String>,
    /// The instance (name or i- id) whose zone to use.
    #[arg(
        long,
        value_name = "INSTANCE",
        required_unless_present_any = ["zone", "datacenter"],
        conflicts_with = "zone"
    )]
    pub instance: Option<String>,
    /// The availability zone, e.g. us-east-1a.
    #[arg(long, value_name = "ZONE")]
    pub zone: Option<String>,
    /// A Name tag.
    #[arg(long)]
    pub name: Option<String>,
    /// Tag it persistent: `volume delete` refuses it without --force.
    #[arg(long)]
    pub persistent: bool,
    /// Tag it protected: `volume delete` refuses it without --force.
    #[arg(long)]
    pub protected: bool,
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a gp3 volume (encrypted), in the zone of --instance or --zone; or a RunPod
    /// network volume (--provider runpod --datacenter DC).
    Create {
        /// Its size in GiB (a RunPod volume: GB, 10 to 4096).
        #[arg(long, value_name = "GIB")]
        size: u32,
        #[command(flatten)]
        new: NewVolumeArgs,
    },
    /// List runctl's volumes.
    List {
        /// EBS (ec2) or RunPod network volumes (runpod).
        #[arg(long, value_enum, default_value = "ec2")]
        provider: VolumeProvider,
    },
    /// Attach a volume to an instance (in the same zone).
    Attach {
        /// The volume, e.g. vol-0123456789abcdef0.
        #[arg(value_parser = parse_volume)]
        volume: String,
        /// The instance: its runctl name or i- id.
        instance: String,
        /// The device name it gets (/dev/sdf .. /dev/sdz; on Nitro instances it shows up
        /// as an NVMe device).
        #[arg(long, default_value = "/dev/sdf", value_parser = parse_device)]
        device: String,
    },
    /// Detach a volume from its instance.
    Detach {
        /// The volume, e.g. vol-0123456789abcdef0.
        #[arg(value_parser = parse_volume)]
        volume: String,
        /// Force it (the instance may lose data not yet written to the volume).
        #[arg(long)]
        force: bool,
    },
    /// Delete a detached volume (a RunPod one no pod mounts).
    Delete {
        /// The volume, e.g. vol-0123456789abcdef0 (or a RunPod volume's id).
        volume: String,
        /// EBS (ec2) or a RunPod network volume (runpod).
        #[arg(long, value_enum, default_value = "ec2")]
        provider: VolumeProvider,
        /// Delete it even if tagged persistent or protected.
        #[arg(long)]
        force: bool,
    },
    /// Snapshot a volume.
    Snapshot {
        /// The volume, e.g. vol-0123456789abcdef0.
        #[arg(value_parser = parse_volume)]
        volume: String,
        /// The snapshot's description.
        #[arg(long)]
        description: Option<String>,
    },
    /// Make a new volume from a snapshot, in the zone of --instance or --zone.
    Restore {
        /// The snapshot, e.g. snap-0123456789abcdef0.
        #[arg(value_parser = parse_snapshot)]
        snapshot: String,
        /// A size in GiB at least the snapshot's (default: the snapshot's).
        #[arg(long, value_name = "GIB")]
        size: Option<u32>,
        #[command(flatten)]
        new: NewVolumeArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum RelayCommand {
    /// Launch a relay and wait until it has a public address.
    Launch {
        /// Where: only EC2 hosts relays (a pod without UDP cannot).
        #[arg(long, value_enum)]
        provider: RelayProvider,
        /// Its name (default: relay- and 6 hex digits).
        #[arg(long)]
        name: Option<InstanceName>,
        /// The instance type (default: [relay] instance_type, else t3.nano).
        #[arg(long, value_name = "TYPE", value_parser = parse_instance_type)]
        instance_type: Option<String>,
        /// The port it listens on, UDP and TCP (default: [relay] port, else 443).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        port: Option<u16>,
        /// The AMI (default: [relay] ami, else the newest Amazon Linux 2023).
        #[arg(long, value_parser = parse_ami)]
        ami: Option<String>,
    },
    /// List the relays runctl launched, with their address and what they cost a month.
    List,
    /// Terminate a relay (its name or i- id); agents using it fall back to other paths.
    Terminate {
        /// The relay's name or i- id.
        relay: String,
    },
}

/// Where a relay can be launched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RelayProvider {
    Ec2,
}

/// `--checkpoints-from` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CheckpointsFrom {
    /// Node 0 alone, to the run's prefix.
    Node0,
    /// Every node: node 0 to the run's prefix, node R to RUN-nodeR/.
    All,
}

/// `--launcher` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LauncherArg {
    /// Under torchrun, --nproc-per-node processes per node.
    Torchrun,
    /// The command as given, one process per node.
    None,
}

impl From<LauncherArg> for protocol::launch::Launcher {
    fn from(arg: LauncherArg) -> Self {
        match arg {
            LauncherArg::Torchrun => protocol::launch::Launcher::Torchrun,
            LauncherArg::None => protocol::launch::Launcher::None,
        }
    }
}

/// The run's launch from `--launcher` and `--nproc-per-node` (checked by the daemon with
/// the rest of the launch).
pub fn launch_from(
    launcher: Option<LauncherArg>,
    nproc_per_node: Option<u32>,
    nodes: Option<u32>,
    command: &[String],
) -> Result<Option<protocol::launch::Launch>, UserError> {
    let nodes = nodes.unwrap_or(1);
    if nodes == 0 {
        return Err(UserError::new(
            ErrorCode::BadInput,
            "--nodes 0: a run has at least one node",
        )
        .resolve("leave --nodes out for one instance"));
    }
    if let (None, Some(n), 1) = (launcher, nproc_per_node, nodes) {
        return Err(UserError::new(
            ErrorCode::BadInput,
            format!("--nproc-per-node {n} is torchrun's"),
        )
        .resolve(format!("add --launcher torchrun: runctl-controller run --launcher torchrun --nproc-per-node {n} -- python train.py")));
    }
    Ok(protocol::launch::Launch::asked(
        launcher.map(Into::into),
        nproc_per_node,
        nodes,
        command,
    ))
}

/// `--end` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EndArg {
    /// Leave the instance running (an idle timeout configured on the agent still applies).
    Keep,
    /// Power the instance off, restartable.
    Stop,
    /// Power the instance off for good.
    Terminate,
}

impl From<EndArg> for EndAction {
    fn from(arg: EndArg) -> Self {
        match arg {
            EndArg::Keep => EndAction::Keep,
            EndArg::Stop => EndAction::Stop,
            EndArg::Terminate => EndAction::Terminate,
        }
    }
}

pub(crate) fn parse_restart(s: &str) -> Result<RestartPolicy, String> {
    const HELP: &str = "use never, always, on-failure or on-failure:N (e.g. on-failure:5)";
    match s {
        "never" => Ok(RestartPolicy::Never),
        "always" => Ok(RestartPolicy::Always),
        "on-failure" => Ok(RestartPolicy::OnFailure { max_restarts: 3 }),
        _ => {
            let n = s
                .strip_prefix("on-failure:")
                .ok_or_else(|| format!("{s:?} is not a restart policy: {HELP}"))?;
            let max_restarts = n
                .parse()
                .map_err(|_| format!("{n:?} is not a number of restarts: {HELP}"))?;
            Ok(RestartPolicy::OnFailure { max_restarts })
        }
    }
}

/// Signal names as Linux numbers them.
const SIGNALS: [(&str, i32); 6] = [
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("USR1", 10),
    ("USR2", 12),
    ("TERM", 15),
];

pub(crate) fn parse_signal(s: &str) -> Result<i32, String> {
    let name = s.trim_start_matches("SIG").to_ascii_uppercase();
    SIGNALS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, number)| *number)
        .ok_or_else(|| {
            format!("{s:?} is not a signal runctl sends: use TERM, INT, HUP, QUIT, USR1 or USR2")
        })
}

fn parse_since(s: &str) -> Result<std::time::SystemTime, String> {
    if let Ok(ago) = humantime::parse_duration(s) {
        return std::time::SystemTime::now()
            .checked_sub(ago)
            .ok_or_else(|| format!("{s:?} is too long ago"));
    }
    humantime::parse_rfc3339_weak(s).map_err(|_| {
        format!("{s:?} is neither a duration (e.g. 10m, 2h) nor a time (e.g. 2026-11-28T09:00:00Z)")
    })
}

#[derive(Debug, Args)]
pub struct StopArgs {
    /// The run to stop (e.g. run-3f9a2c1b7d4e), or a cloud instance to power off
    /// (restartable with `start`; its disks stay, and so do their charges).
    pub target: String,

    /// For an instance: stop its active runs first (they push their last checkpoints)
    /// instead of refusing.
    #[arg(long)]
    pub force: bool,

    /// Seconds between SIGTERM and SIGKILL (default: the run's own, from `run
    /// --stop-grace`, else [daemon] stop_grace_secs, 10).
    #[arg(long, value_name = "SECS")]
    pub grace: Option<u64>,
}

#[derive(Debug, Args)]
pub struct StartArgs {
    /// The stopped cloud instance to start again; its agent reconnects by itself.
    pub name: InstanceName,
}

#[derive(Debug, Args)]
pub struct TerminateArgs {
    /// The instance to terminate (see `list`).
    pub name: InstanceName,

    /// Stop its active runs first instead of refusing.
    #[arg(long)]
    pub force: bool,
}

/// One instance type, or several to try in order, comma-separated.
pub(crate) fn parse_instance_type(s: &str) -> Result<String, String> {
    for kind in s.split(',') {
        crate::provider::ec2::ids::check_instance_type(kind)?;
    }
    Ok(s.to_owned())
}

pub(crate) fn parse_ami(s: &str) -> Result<String, String> {
    crate::provider::ec2::ids::check_id(s, "ami").map(|()| s.to_owned())
}

fn parse_volume(s: &str) -> Result<String, String> {
    crate::provider::ec2::ids::check_id(s, "vol").map(|()| s.to_owned())
}

pub(crate) fn parse_snapshot(s: &str) -> Result<String, String> {
    crate::provider::ec2::ids::check_id(s, "snap").map(|()| s.to_owned())
}

fn parse_device(s: &str) -> Result<String, String> {
    crate::provider::ec2::ids::check_device(s).map(|()| s.to_owned())
}

pub(crate) fn parse_price(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(price) if price.is_finite() && price > 0.0 => Ok(price),
        _ => Err(format!(
            "{s:?} is not a price in dollars per hour (e.g. 0.45)"
        )),
    }
}

pub(crate) fn parse_dollars(s: &str) -> Result<f64, String> {
    match s.trim_start_matches('$').parse::<f64>() {
        Ok(d) if d.is_finite() && d >= 0.000_001 => Ok(d),
        _ => Err(format!(
            "{s:?} is not an amount in dollars (e.g. 25 or 2.50)"
        )),
    }
}

pub(crate) fn parse_hours(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        // At least a second, at most ten years: beyond is a typo, not a cap.
        Ok(h) if h.is_finite() && h * 3600.0 >= 1.0 && h <= 87_600.0 => Ok(h),
        _ => Err(format!(
            "{s:?} is not a number of hours (e.g. 1.5; at least 1 s, at most 87600)"
        )),
    }
}

pub(crate) fn parse_env(s: &str) -> Result<(String, String), String> {
    let (key, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE (e.g. SEED=3)"))?;
    let valid = key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!(
            "{key:?} is not a valid variable name: use letters, digits and '_', not starting with a digit"
        ));
    }
    Ok((key.to_owned(), value.to_owned()))
}

/// `s3://bucket/prefix[=dest]`: the destination defaults to the prefix's last name.
pub(crate) fn parse_data(s: &str) -> Result<protocol::DataSource, String> {
    let (source, dest) = match s.rsplit_once('=') {
        Some((source, dest)) => (source, Some(dest)),
        None => (s, None),
    };
    let url = storage::ObjectUrl::parse(source).map_err(|e| e.to_string())?;
    let dest = match dest {
        Some(dest) => dest.trim_end_matches('/').to_owned(),
        None => url
            .key
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .filter(|n| !n.is_empty())
            .unwrap_or(&url.bucket)
            .to_owned(),
    };
    if dest.is_empty() {
        return Err(format!("{s:?} has an empty destination after '='"));
    }
    protocol::manifest::check_path(&dest).map_err(|e| format!("destination {dest:?}: {e}"))?;
    Ok(protocol::DataSource {
        source: source.to_owned(),
        dest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn data_sources() {
        let d = parse_data("s3://bkt/imagenet/train/").expect("valid");
        assert_eq!(
            (d.source.as_str(), d.dest.as_str()),
            ("s3://bkt/imagenet/train/", "train")
        );
        let d = parse_data("s3://bkt/x.bin=inputs/x.bin").expect("valid");
        assert_eq!(d.dest, "inputs/x.bin");
        assert_eq!(parse_data("s3://bkt").expect("valid").dest, "bkt");
        assert!(parse_data("s3://bkt/x=../up").is_err());
        assert!(parse_data("s3://bkt/x=").is_err());
        assert!(parse_data("bkt/x").is_err());
    }

    #[test]
    fn forwards_parse_as_ssh_l_takes_them() {
        let check = |text: &str, expected: Option<(Option<u16>, &str, u16)>| {
            let got = parse_forward(text)
                .ok()
                .map(|f| (f.local_port, f.host.clone(), f.port));
            assert_eq!(
                got,
                expected.map(|(l, h, p)| (l, h.to_owned(), p)),
                "{text:?}"
            );
        };
        check("6006", Some((None, "127.0.0.1", 6006)));
        check("16006:6006", Some((Some(16006), "127.0.0.1", 6006)));
        check("0:8000", Some((Some(0), "127.0.0.1", 8000)));
        check("8080:localhost:80", Some((Some(8080), "localhost", 80)));
        check(
            "8080:db.internal:5432",
            Some((Some(8080), "db.internal", 5432)),
        );
        check("8080:[::1]:80", Some((Some(8080), "::1", 80)));
        check("0", None);
        check("70000", None);
        check("tensorboard", None);
        check("1:2:3:4", None);
        check(":6006", None);
        check("8080::80", None);
        check("8080:[::1]80", None);
        check("", None);
    }

    #[test]
    fn targets_are_runs_or_instances() {
        use crate::ipc::Target;
        assert!(matches!(
            parse_target("run-3f9a2c1b7d4e"),
            Ok(Target::Run(_))
        ));
        assert!(matches!(parse_target("gpu-1"), Ok(Target::Instance(_))));
        assert!(parse_target("not a name!").is_err());
    }

    #[test]
    fn cli_is_well_formed_and_documented() {
        Cli::command().debug_assert();
        for sub in Cli::command().get_subcommands() {
            assert!(
                sub.get_after_long_help().is_some(),
                "{} has examples",
                sub.get_name()
            );
            for arg in sub.get_arguments() {
                assert!(
                    arg.get_help().is_some(),
                    "{} --{} has help",
                    sub.get_name(),
                    arg.get_id()
                );
            }
        }
    }

    #[test]
    fn env_entries() {
        assert_eq!(parse_env("SEED=3"), Ok(("SEED".into(), "3".into())));
        assert_eq!(parse_env("A_1=x=y"), Ok(("A_1".into(), "x=y".into())));
        assert!(parse_env("SEED").expect_err("no =").contains("KEY=VALUE"));
        assert!(
            parse_env("1X=2")
                .expect_err("bad name")
                .contains("not a valid variable name")
        );
    }

    #[test]
    fn run_policies_and_signals() {
        assert_eq!(parse_restart("never"), Ok(RestartPolicy::Never));
        assert_eq!(
            parse_restart("on-failure"),
            Ok(RestartPolicy::OnFailure { max_restarts: 3 })
        );
        assert_eq!(
            parse_restart("on-failure:7"),
            Ok(RestartPolicy::OnFailure { max_restarts: 7 })
        );
        assert!(
            parse_restart("sometimes")
                .expect_err("bad")
                .contains("on-failure:N")
        );
        assert!(
            parse_restart("on-failure:x")
                .expect_err("bad")
                .contains("not a number")
        );
        assert_eq!(parse_signal("USR1"), Ok(10));
        assert_eq!(parse_signal("SIGTERM"), Ok(15));
        assert!(parse_signal("KILL").expect_err("bad").contains("USR1"));
        assert!(parse_since("10m").is_ok());
        assert!(parse_since("2026-11-28T09:00:00Z").is_ok());
        assert!(
            parse_since("yesterday")
                .expect_err("bad")
                .contains("e.g. 10m")
        );
    }

    #[test]
    fn output_flag_is_global() {
        let before = Cli::try_parse_from(["runctl-controller", "--output", "json", "status"])
            .expect("parses");
        let after = Cli::try_parse_from(["runctl-controller", "status", "--output", "json"])
            .expect("parses");
        assert_eq!(before.output, Format::Json);
        assert_eq!(after.output, Format::Json);
    }

    #[test]
    fn ids_are_validated_with_a_helpful_message() {
        let err = Cli::try_parse_from(["runctl-controller", "logs", "run-1"]).expect_err("bad id");
        assert!(err.to_string().contains("run-3f9a2c1b7d4e"), "{err}");
        let err = Cli::try_parse_from(["runctl-controller", "terminate", "Bad Name"])
            .expect_err("bad name");
        assert!(err.to_string().contains("starting with a letter"), "{err}");
    }
}
