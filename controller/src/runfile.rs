//! The project run file, `runctl.toml` at the project root: `[run]` holds what `run`
//! takes as flags (named as the flags, `-` as `_`), `[profile.NAME]` tables overlay it
//! (`run --profile NAME`). Values are checked by the flags' own parsers when the file is
//! read, so a bad value is reported with its line. Which of file and flags wins is the
//! pure `apply`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use protocol::{DataSource, RestartPolicy};
use serde::{Deserialize, Deserializer, Serialize};

use crate::cli::{self, EndArg, RunArgs};
use crate::error::{ErrorCode, UserError};
use crate::ipc::ForwardSpec;
use crate::provider::ProviderKind;

/// The run file's name, at the project root.
pub const FILE_NAME: &str = "runctl.toml";

/// The whole file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunFile {
    #[serde(default)]
    pub run: RunSection,
    #[serde(default)]
    pub profile: BTreeMap<String, RunSection>,
}

/// The command: an argv array, or a string run by `sh -c`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum FileCommand {
    Argv(Vec<String>),
    Shell(String),
}

impl FileCommand {
    pub fn argv(&self) -> Vec<String> {
        match self {
            FileCommand::Argv(argv) => argv.clone(),
            FileCommand::Shell(line) => vec!["sh".into(), "-c".into(), line.clone()],
        }
    }
}

/// One or several strings (`setup = "make"` or `setup = ["make", "pip install -e ."]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// `[run]` or one `[profile.NAME]`: every key optional; a profile's keys replace `[run]`'s.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    pub command: Option<FileCommand>,
    #[serde(default, deserialize_with = "env_table")]
    pub env: Option<Vec<(String, String)>>,
    #[serde(default, deserialize_with = "secrets")]
    pub secrets: Option<Vec<cli::SecretSpec>>,
    #[serde(default, deserialize_with = "instance_name")]
    pub on: Option<protocol::InstanceName>,
    pub provider: Option<ProviderKind>,
    #[serde(default, deserialize_with = "instance_type")]
    pub instance_type: Option<String>,
    pub workdir: Option<PathBuf>,
    // EC2 (and --spot/--max-price for RunPod too).
    #[serde(default, deserialize_with = "ami")]
    pub ami: Option<String>,
    pub spot: Option<bool>,
    #[serde(default, deserialize_with = "price")]
    pub max_price: Option<f64>,
    pub spot_fallback: Option<bool>,
    pub instance_profile: Option<String>,
    pub volume_size: Option<u32>,
    #[serde(default, deserialize_with = "snapshot")]
    pub volume_snapshot: Option<String>,
    pub keep_volume: Option<bool>,
    // RunPod.
    pub gpu: Option<String>,
    pub gpus: Option<u32>,
    pub image: Option<String>,
    pub datacenter: Option<String>,
    pub disk: Option<u32>,
    pub volume: Option<String>,
    // The run.
    pub keep: Option<bool>,
    pub detach: Option<bool>,
    #[serde(default, deserialize_with = "forwards")]
    pub forward: Option<Vec<ForwardSpec>>,
    #[serde(default, deserialize_with = "setup")]
    pub setup: Option<Vec<String>>,
    #[serde(default, deserialize_with = "restart")]
    pub restart: Option<RestartPolicy>,
    pub stop_grace: Option<u64>,
    #[serde(default, deserialize_with = "end")]
    pub end: Option<EndArg>,
    #[serde(default, deserialize_with = "signal")]
    pub spot_signal: Option<i32>,
    #[serde(default, deserialize_with = "on_interrupt")]
    pub on_interrupt: Option<crate::relaunch::OnInterrupt>,
    #[serde(default, deserialize_with = "dollars")]
    pub max_cost: Option<f64>,
    #[serde(default, deserialize_with = "hours")]
    pub max_hours: Option<f64>,
    #[serde(default, deserialize_with = "launcher")]
    pub launcher: Option<cli::LauncherArg>,
    pub nproc_per_node: Option<u32>,
    pub nodes: Option<u32>,
    #[serde(default, deserialize_with = "checkpoints_from")]
    pub checkpoints_from: Option<cli::CheckpointsFrom>,
    #[serde(default, deserialize_with = "data")]
    pub data: Option<Vec<DataSource>>,
    pub pull_alongside: Option<bool>,
    pub checkpoints: Option<String>,
    pub no_checkpoints: Option<bool>,
    pub keep_checkpoints: Option<u32>,
    pub resume_from: Option<String>,
}

/// A field read as a string and checked by the flag's own parser.
fn parsed<'de, D: Deserializer<'de>, T>(
    d: D,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<T>, D::Error> {
    let text = String::deserialize(d)?;
    parse(&text).map(Some).map_err(serde::de::Error::custom)
}

/// A list of strings, each checked by the flag's own parser.
fn parsed_list<'de, D: Deserializer<'de>, T>(
    d: D,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<Vec<T>>, D::Error> {
    let texts = match OneOrMany::deserialize(d)? {
        OneOrMany::One(one) => vec![one],
        OneOrMany::Many(many) => many,
    };
    texts
        .iter()
        .map(|t| parse(t))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
        .map_err(serde::de::Error::custom)
}

macro_rules! checked_by {
    ($($name:ident: $ty:ty = $parse:expr;)*) => {$(
        fn $name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<$ty>, D::Error> {
            parsed(d, $parse)
        }
    )*};
}

checked_by! {
    instance_type: String = cli::parse_instance_type;
    ami: String = cli::parse_ami;
    snapshot: String = cli::parse_snapshot;
    restart: RestartPolicy = cli::parse_restart;
    on_interrupt: crate::relaunch::OnInterrupt = crate::relaunch::parse;
    signal: i32 = cli::parse_signal;
    instance_name: protocol::InstanceName = |s: &str| s.parse().map_err(|e| format!("{e}"));
    end: EndArg = |s: &str| <EndArg as clap::ValueEnum>::from_str(s, false)
        .map_err(|_| format!("{s:?} is not an end action: use keep, stop or terminate"));
    launcher: cli::LauncherArg = |s: &str| <cli::LauncherArg as clap::ValueEnum>::from_str(s, false)
        .map_err(|_| format!("{s:?} is not a launcher: use torchrun or none"));
    checkpoints_from: cli::CheckpointsFrom = |s: &str| <cli::CheckpointsFrom as clap::ValueEnum>::from_str(s, false)
        .map_err(|_| format!("{s:?} is not a choice of nodes: use node0 or all"));
}

/// A number (TOML integer or float) checked by the flag's own parser.
fn number<'de, D: Deserializer<'de>>(
    d: D,
    parse: fn(&str) -> Result<f64, String>,
) -> Result<Option<f64>, D::Error> {
    let value = f64::deserialize(d)?;
    parse(&value.to_string())
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn price<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    number(d, cli::parse_price)
}

fn dollars<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    number(d, cli::parse_dollars)
}

fn hours<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    number(d, cli::parse_hours)
}

fn forwards<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<ForwardSpec>>, D::Error> {
    // Ports are written as numbers as often as strings.
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Port {
        Number(u16),
        Text(String),
    }
    let ports: Vec<String> = Vec::<Port>::deserialize(d)?
        .into_iter()
        .map(|p| match p {
            Port::Number(n) => n.to_string(),
            Port::Text(t) => t,
        })
        .collect();
    ports
        .iter()
        .map(|p| cli::parse_forward(p))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn setup<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    parsed_list(d, |s| Ok(s.to_owned()))
}

fn data<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<DataSource>>, D::Error> {
    parsed_list(d, cli::parse_data)
}

fn secrets<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<cli::SecretSpec>>, D::Error> {
    parsed_list(d, cli::parse_secret)
}

/// `env = { SEED = 3, MODE = "fast" }`: numbers and booleans are written as text.
fn env_table<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<(String, String)>>, D::Error> {
    let table = BTreeMap::<String, toml::Value>::deserialize(d)?;
    table
        .into_iter()
        .map(|(key, value)| {
            let text = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_) => {
                    value.to_string()
                }
                other => {
                    return Err(format!(
                        "env.{key} is a {}; give a string, number or boolean",
                        other.type_str()
                    ));
                }
            };
            cli::parse_env(&format!("{key}={text}"))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
        .map_err(serde::de::Error::custom)
}

impl RunSection {
    /// `over`'s keys replace this section's; its `on` sets aside this section's launch
    /// options (and `keep`), and its launch options this section's `on`, as the flags do.
    fn overlaid(mut self, over: RunSection) -> RunSection {
        if over.on.is_some() {
            self = RunSection {
                keep: None,
                ..self.without_launch()
            };
        } else if over.launches() {
            self.on = None;
        }
        macro_rules! pick {
            ($($field:ident),*) => {
                RunSection { $($field: over.$field.or(self.$field)),* }
            };
        }
        pick!(
            command,
            env,
            secrets,
            on,
            provider,
            instance_type,
            workdir,
            ami,
            spot,
            max_price,
            spot_fallback,
            instance_profile,
            volume_size,
            volume_snapshot,
            keep_volume,
            gpu,
            gpus,
            image,
            datacenter,
            disk,
            volume,
            keep,
            detach,
            forward,
            setup,
            restart,
            stop_grace,
            end,
            spot_signal,
            on_interrupt,
            max_cost,
            max_hours,
            launcher,
            nproc_per_node,
            nodes,
            checkpoints_from,
            data,
            pull_alongside,
            checkpoints,
            no_checkpoints,
            keep_checkpoints,
            resume_from
        )
    }

    /// The section with nothing about how an instance is launched.
    fn without_launch(self) -> RunSection {
        RunSection {
            provider: None,
            instance_type: None,
            ami: None,
            spot: None,
            max_price: None,
            spot_fallback: None,
            instance_profile: None,
            volume_size: None,
            volume_snapshot: None,
            keep_volume: None,
            gpu: None,
            gpus: None,
            image: None,
            datacenter: None,
            disk: None,
            volume: None,
            ..self
        }
    }

    /// Whether the section sets anything about how an instance is launched.
    fn launches(&self) -> bool {
        self.clone().without_launch() != *self
    }
}

impl RunFile {
    /// `[run]` with the named profile laid over it.
    pub fn section(&self, profile: Option<&str>) -> Result<RunSection, UserError> {
        let Some(name) = profile else {
            return Ok(self.run.clone());
        };
        match self.profile.get(name) {
            Some(over) => Ok(self.run.clone().overlaid(over.clone())),
            None => {
                let known: Vec<&str> = self.profile.keys().map(String::as_str).collect();
                let error = UserError::new(
                    ErrorCode::BadInput,
                    format!("{FILE_NAME} has no profile {name:?}"),
                );
                Err(if known.is_empty() {
                    error.resolve(format!(
                        "add a [profile.{name}] table to {FILE_NAME}, or leave out --profile"
                    ))
                } else {
                    error.resolve(format!("its profiles: {}", known.join(", ")))
                })
            }
        }
    }
}

/// Reads and checks a run file; `Ok(None)` when there is none.
pub fn load(path: &Path) -> Result<Option<RunFile>, UserError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(UserError::new(
                ErrorCode::BadInput,
                format!("cannot read {}: {e}", path.display()),
            ));
        }
    };
    parse(&text).map(Some).map_err(|message| {
        let error = UserError::new(
            ErrorCode::BadInput,
            format!("{} is invalid: {}", path.display(), message.trim_end()),
        );
        match nearest_key(&message) {
            Some(key) => error.resolve(format!(
                "did you mean {key}? (keys are run's flags with - as _: runctl-controller run --help)"
            )),
            None => error.resolve(
                "fix the file; its keys are run's flags with - as _ (runctl-controller run --help)",
            ),
        }
    })
}

pub fn parse(text: &str) -> Result<RunFile, String> {
    let file: RunFile = toml::from_str(text).map_err(|e| e.to_string())?;
    clashes(&file.run).map_or(Ok(()), |e| Err(format!("[run] {e}")))?;
    for (name, profile) in &file.profile {
        let section = file.run.clone().overlaid(profile.clone());
        clashes(&section).map_or(Ok(()), |e| Err(format!("[profile.{name}] over [run] {e}")))?;
    }
    Ok(file)
}

/// What one section cannot say at once (the flags' own conflicts), in words.
fn clashes(s: &RunSection) -> Option<&'static str> {
    let set = |b: Option<bool>| b == Some(true);
    if s.on.is_some() && s.launches() {
        return Some(
            "sets both `on` and launch options (provider, instance_type, spot, ...): an existing instance is not launched",
        );
    }
    if set(s.keep) && (s.on.is_some() || s.end.is_some()) {
        return Some(
            "sets `keep` with `on` or `end`: keep applies to an instance launched for the run, and is end = \"keep\"",
        );
    }
    if set(s.detach) && s.forward.as_ref().is_some_and(|f| !f.is_empty()) {
        return Some("sets both `detach` and `forward`: a forward lasts while run is attached");
    }
    if set(s.no_checkpoints) && (s.checkpoints.is_some() || s.keep_checkpoints.is_some()) {
        return Some("sets `no_checkpoints` with `checkpoints` or `keep_checkpoints`");
    }
    if let Some(FileCommand::Argv(argv)) = &s.command
        && argv.is_empty()
    {
        return Some("has an empty `command` list: give the program and its arguments");
    }
    None
}

/// For toml's "unknown field `x`, expected one of `a`, `b`": the nearest of the expected.
pub fn nearest_key(message: &str) -> Option<String> {
    let after = message.split("unknown field `").nth(1)?;
    let (unknown, rest) = after.split_once('`')?;
    let expected = rest.split("expected").nth(1)?;
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|k| (strsim::jaro_winkler(k, unknown), k))
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k.to_owned())
}

/// Fills what `args` leaves unsaid from the file. A flag given wins over the file, and so
/// does a flag that excludes a file's key (`--end` the file's `keep`, `--forward` its
/// `detach`, `--checkpoints` its `no_checkpoints`, and the other way round). `env` and
/// `secrets` add to the file's (a flag's of the same name wins). `--on` sets the file's
/// launch options aside, and so does a `--provider` other than the file's; `--provider`
/// sets the file's `on` aside. Booleans can only be switched on by a flag (a profile can
/// switch one off).
pub fn apply(args: &mut RunArgs, file: RunSection) {
    let launch_from_file = args.on.is_none()
        && (args.provider.is_none() || file.provider.is_none() || args.provider == file.provider);
    if args.command.is_empty()
        && let Some(command) = &file.command
    {
        args.command = command.argv();
    }
    if args.on.is_none() && args.provider.is_none() {
        args.on = file.on;
    }
    // Taken from the file only when no flag given excludes them.
    let keep = (args.on.is_none() && args.end.is_none())
        .then_some(file.keep)
        .flatten();
    let end = (!args.keep).then_some(file.end).flatten();
    let detach = args.forward.is_empty().then_some(file.detach).flatten();
    let forward = (!args.detach).then_some(file.forward).flatten();
    let no_checkpoints = (args.checkpoints.is_none() && args.keep_checkpoints.is_none())
        .then_some(file.no_checkpoints)
        .flatten();
    let (checkpoints, keep_checkpoints) = if args.no_checkpoints {
        (None, None)
    } else {
        (file.checkpoints, file.keep_checkpoints)
    };
    macro_rules! fill {
        ($($target:expr => $value:expr),* $(,)?) => {$( if $target.is_none() { $target = $value; } )*};
    }
    macro_rules! switch {
        ($($target:expr => $value:expr),* $(,)?) => {$( if !$target { $target = $value.unwrap_or(false); } )*};
    }
    macro_rules! list {
        ($($target:expr => $value:expr),* $(,)?) => {$( if $target.is_empty() { $target = $value.unwrap_or_default(); } )*};
    }
    if launch_from_file {
        let (ec2, pod) = (&mut args.ec2, &mut args.runpod);
        fill!(
            args.provider => file.provider,
            args.instance_type => file.instance_type,
            args.nodes => file.nodes,
            args.checkpoints_from => file.checkpoints_from,
            ec2.ami => file.ami,
            ec2.max_price => file.max_price,
            ec2.instance_profile => file.instance_profile,
            ec2.volume_size => file.volume_size,
            ec2.volume_snapshot => file.volume_snapshot,
            pod.gpu => file.gpu,
            pod.gpus => file.gpus,
            pod.image => file.image,
            pod.datacenter => file.datacenter,
            pod.disk => file.disk,
            pod.volume => file.volume,
        );
        switch!(ec2.spot => file.spot, ec2.spot_fallback => file.spot_fallback, ec2.keep_volume => file.keep_volume);
    }
    fill!(
        args.workdir => file.workdir,
        args.restart => file.restart,
        args.stop_grace => file.stop_grace,
        args.end => end,
        args.spot_signal => file.spot_signal,
        args.on_interrupt => file.on_interrupt,
        args.max_cost => file.max_cost,
        args.max_hours => file.max_hours,
        args.launcher => file.launcher,
        args.nproc_per_node => file.nproc_per_node,
        args.checkpoints => checkpoints,
        args.keep_checkpoints => keep_checkpoints,
        args.resume_from => file.resume_from,
    );
    switch!(
        args.keep => keep,
        args.detach => detach,
        args.pull_alongside => file.pull_alongside,
        args.no_checkpoints => no_checkpoints,
    );
    list!(args.forward => forward, args.setup => file.setup, args.data => file.data);
    let mut env = file.env.unwrap_or_default();
    env.retain(|(key, _)| !args.env.iter().any(|(k, _)| k == key));
    env.append(&mut args.env);
    args.env = env;
    let mut secrets = file.secrets.unwrap_or_default();
    secrets.retain(|s| !args.secret.iter().any(|a| a.name == s.name));
    secrets.append(&mut args.secret);
    args.secret = secrets;
}

/// The project with the run file's `workdir` (relative to the root) as its start.
pub fn workdir(root: &Path, dir: &Path) -> Result<crate::sync::root::Project, UserError> {
    let inside = dir.is_relative()
        && dir.components().all(|c| {
            matches!(
                c,
                std::path::Component::Normal(_) | std::path::Component::CurDir
            )
        });
    if !inside {
        return Err(UserError::new(
            ErrorCode::BadInput,
            format!(
                "{FILE_NAME}: workdir {:?} must be a path inside the project, relative to its root",
                dir.display().to_string()
            ),
        )
        .resolve("e.g. workdir = \"src\"; or pass --workdir"));
    }
    crate::sync::root::resolve(&root.join(dir), Some(root))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// `run` parsed from these flags, with the file's [run] (and profile) applied.
    fn resolved(flags: &[&str], file: &str, profile: Option<&str>) -> RunArgs {
        let cli = crate::cli::Cli::try_parse_from(
            ["runctl-controller", "run"].iter().chain(flags.iter()),
        )
        .expect("flags parse");
        let crate::cli::Command::Run(mut args) = cli.command else {
            panic!("not run");
        };
        let section = parse(file)
            .expect("file parses")
            .section(profile)
            .expect("profile exists");
        apply(&mut args, section);
        *args
    }

    const FILE: &str = r#"
[run]
command = ["python3", "train.py"]
env = { SEED = 3, LR = 0.1 }
provider = "ec2"
instance_type = "g5.xlarge"
spot = true
restart = "on-failure:2"
keep = true
secrets = ["HF_TOKEN"]

[profile.cheap]
instance_type = "g4dn.xlarge"
spot = false

[profile.box]
on = "gpu-1"
"#;

    #[test]
    fn flags_given_win_and_defaults_do_not() {
        let args = resolved(&[], FILE, None);
        assert_eq!(args.command, ["python3", "train.py"]);
        assert_eq!(args.provider, Some(ProviderKind::Ec2));
        assert_eq!(args.instance_type.as_deref(), Some("g5.xlarge"));
        assert!(args.ec2.spot && args.keep);
        assert_eq!(
            args.restart,
            Some(RestartPolicy::OnFailure { max_restarts: 2 })
        );
        assert_eq!(
            args.env,
            [("LR".into(), "0.1".into()), ("SEED".into(), "3".into())]
        );
        assert_eq!(args.secret.len(), 1);

        type Case<'a> = (
            &'a [&'a str],
            Option<&'a str>,
            &'a dyn Fn(&RunArgs) -> bool,
            &'a str,
        );
        let cases: &[Case] = &[
            (
                &["--", "python3", "eval.py"],
                None,
                &|a| a.command == ["python3", "eval.py"],
                "a command after -- replaces the file's",
            ),
            (
                &["--instance-type", "p4d.24xlarge"],
                None,
                &|a| a.instance_type.as_deref() == Some("p4d.24xlarge"),
                "a flag replaces a value",
            ),
            (
                &["-e", "SEED=4"],
                None,
                &|a| a.env == [("LR".into(), "0.1".into()), ("SEED".into(), "4".into())],
                "env merges; the flag's wins",
            ),
            (
                &["--secret", "WANDB_API_KEY"],
                None,
                &|a| a.secret.len() == 2,
                "secrets add up",
            ),
            (
                &["--restart", "never"],
                None,
                &|a| a.restart == Some(RestartPolicy::Never),
                "a flag equal to clap's old default still wins",
            ),
            (
                &["--end", "stop"],
                None,
                &|a| !a.keep && a.end == Some(EndArg::Stop),
                "--end sets the file's keep aside",
            ),
            (
                &["--on", "gpu-2"],
                None,
                &|a| a.provider.is_none() && a.instance_type.is_none() && !a.ec2.spot && !a.keep,
                "--on sets the file's launch and keep aside",
            ),
            (
                &["--provider", "local"],
                None,
                &|a| {
                    a.provider == Some(ProviderKind::Local)
                        && a.instance_type.is_none()
                        && !a.ec2.spot
                },
                "another --provider sets the file's launch aside",
            ),
            (
                &["--provider", "ec2"],
                None,
                &|a| a.instance_type.as_deref() == Some("g5.xlarge"),
                "the same --provider keeps it",
            ),
            (
                &[],
                Some("cheap"),
                &|a| a.instance_type.as_deref() == Some("g4dn.xlarge") && !a.ec2.spot && a.keep,
                "a profile overlays [run], and can switch a boolean off",
            ),
            (
                &["--spot"],
                Some("cheap"),
                &|a| a.ec2.spot,
                "a flag switches one on again",
            ),
            (
                &[],
                Some("box"),
                &|a| {
                    a.on.as_ref().is_some_and(|o| o.as_str() == "gpu-1")
                        && a.provider.is_none()
                        && !a.keep
                        && a.restart.is_some()
                },
                "a profile's on sets [run]'s launch aside",
            ),
        ];
        for (flags, profile, holds, what) in cases {
            assert!(holds(&resolved(flags, FILE, *profile)), "{what}");
        }
    }

    #[test]
    fn bad_files_are_refused_with_the_fix() {
        let cases = [
            (
                "[run]\ninstnce_type = \"g5.xlarge\"\n",
                "line 2",
                Some("instance_type"),
            ),
            (
                "[run]\nrestart = \"sometimes\"\n",
                "not a restart policy",
                None,
            ),
            ("[run]\nspot_signal = \"KILL\"\n", "not a signal", None),
            (
                "[run]\nenv = { \"1X\" = 3 }\n",
                "not a valid variable name",
                None,
            ),
            (
                "[run]\nenv = { X = [1] }\n",
                "give a string, number or boolean",
                None,
            ),
            ("[run]\ndata = [\"http://x\"]\n", "s3://", None),
            (
                "[run]\nsecrets = [\"HF_TOKEN=hf_abc\"]\n",
                "not written on the command line",
                None,
            ),
            ("[run]\nmax_price = -1.0\n", "not a price", None),
            ("[run]\nend = \"explode\"\n", "not an end action", None),
            ("[run]\ncommand = []\n", "empty `command`", None),
            (
                "[run]\non = \"gpu-1\"\nspot = true\n",
                "both `on` and launch options",
                None,
            ),
            (
                "[run]\nkeep = true\n[profile.p]\nend = \"stop\"\n",
                "[profile.p] over [run]",
                None,
            ),
            (
                "[runs]\ncommand = \"x\"\n",
                "unknown field `runs`",
                Some("run"),
            ),
        ];
        for (text, part, nearest) in cases {
            let message = parse(text).expect_err(text);
            assert!(message.contains(part), "{text}: {message}");
            assert_eq!(nearest_key(&message).as_deref(), nearest, "{text}");
        }
        assert!(parse("").is_ok(), "an empty file is a valid one");
        assert_eq!(
            parse("[run]\ncommand = \"python3 train.py > out\"\n")
                .expect("parses")
                .run
                .command
                .expect("set")
                .argv(),
            ["sh", "-c", "python3 train.py > out"]
        );
    }

    #[test]
    fn every_run_flag_has_its_key() {
        use clap::CommandFactory;
        let cli = crate::cli::Cli::command();
        let run = cli.find_subcommand("run").expect("run");
        for arg in run.get_arguments().filter(|a| !a.is_global_set()) {
            let key = match arg.get_id().as_str() {
                // How the command line reaches the file, not what a run is.
                "profile" | "dry_run" | "yes" | "root" | "help" => continue,
                "secret" => "secrets",
                id => id,
            };
            let answer = parse(&format!("[run]\n{key} = 0\n"));
            assert!(
                !answer.as_ref().is_err_and(|e| e.contains("unknown field")),
                "--{} has no key in [run]: {answer:?}",
                arg.get_id()
            );
        }
    }

    #[test]
    fn a_missing_profile_names_the_ones_there() {
        let file = parse(FILE).expect("parses");
        let e = file.section(Some("gpu")).expect_err("no such profile");
        assert!(e.to_resolve[0].contains("box, cheap"), "{:?}", e.to_resolve);
    }

    #[test]
    fn workdir_stays_inside_the_project() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("src")).expect("mkdir");
        let root = std::fs::canonicalize(dir.path()).expect("canonical");
        assert_eq!(workdir(&root, Path::new("src")).expect("inside").cwd, "src");
        for bad in ["../x", "/etc", "src/../.."] {
            assert!(workdir(&root, Path::new(bad)).is_err(), "{bad}");
        }
    }
}
