//! A run's setup: what to run before the command. `plan` is the pure decision (from what
//! the start directory holds and whether `uv` is installed); `Facts::gather` looks.
//!
//! Invariant: setup never installs into the host's own Python. Packages go into a venv in
//! the run's directory (outside the synced tree, so a sync never sees it), created with
//! `--system-site-packages` so what the image ships (CUDA builds of torch) stays visible;
//! the command then runs with that venv first in `PATH`.

use std::path::{Path, PathBuf};

use protocol::Setup;

/// What the start directory holds, and the tools at hand.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    pub pyproject: bool,
    pub uv_lock: bool,
    pub requirements: bool,
    /// The command is `python <script>.py` and the script has PEP 723 inline metadata.
    pub pep723_script: bool,
    /// `uv`, if found in `PATH`.
    pub uv: Option<PathBuf>,
    /// The agent's `PATH`, extended for the command when a venv is made.
    pub path: String,
}

/// One setup command, shown to the user as `shown`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub shown: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// What to run: the setup steps, then `argv` with `env` added.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
}

fn step(argv: &[&str], env: &[(String, String)]) -> Step {
    Step {
        shown: argv.join(" "),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: env.to_vec(),
    }
}

const NEEDS_UV: &str = "install uv on the host (https://docs.astral.sh/uv/), or give the setup yourself with --setup, or skip it with --setup none";

/// Decides the setup of a run whose command is `argv`, with its venv at `venv`.
pub fn plan(setup: &Setup, argv: &[String], facts: &Facts, venv: &Path) -> Result<Plan, String> {
    let mut plan = Plan {
        argv: argv.to_vec(),
        ..Plan::default()
    };
    match setup {
        Setup::Skip => return Ok(plan),
        Setup::Commands(commands) => {
            plan.steps = commands
                .iter()
                .map(|c| Step {
                    shown: c.clone(),
                    argv: vec!["sh".into(), "-c".into(), c.clone()],
                    env: Vec::new(),
                })
                .collect();
            return Ok(plan);
        }
        Setup::Auto => {}
    }
    let venv_s = venv.display().to_string();
    let python = venv.join("bin").join("python").display().to_string();
    let activate = vec![
        ("VIRTUAL_ENV".to_owned(), venv_s.clone()),
        (
            "PATH".to_owned(),
            format!("{}:{}", venv.join("bin").display(), facts.path),
        ),
    ];
    if facts.pep723_script {
        let Some(uv) = &facts.uv else {
            return Err(format!(
                "{} declares its dependencies inline (PEP 723), which needs uv: {NEEDS_UV}",
                argv.get(1).map(String::as_str).unwrap_or("the script")
            ));
        };
        let mut rewritten = vec![uv.display().to_string(), "run".into(), "--script".into()];
        rewritten.extend(argv.iter().skip(1).cloned());
        plan.argv = rewritten;
        return Ok(plan);
    }
    if facts.pyproject || facts.uv_lock {
        if let Some(uv) = &facts.uv {
            let uv = uv.display().to_string();
            let env = [("UV_PROJECT_ENVIRONMENT".to_owned(), venv_s)];
            plan.steps.push(step(&[&uv, "sync"], &env));
            plan.env = activate;
            plan.env.extend(env);
            return Ok(plan);
        }
        if !facts.requirements {
            return Err(format!(
                "the project has a pyproject.toml, which needs uv (runctl sets it up with `uv sync`): {NEEDS_UV}"
            ));
        }
    }
    if facts.requirements {
        plan.steps = match &facts.uv {
            Some(uv) => {
                let uv = uv.display().to_string();
                vec![
                    step(&[&uv, "venv", "--system-site-packages", &venv_s], &[]),
                    step(
                        &[
                            &uv,
                            "pip",
                            "install",
                            "--python",
                            &python,
                            "-r",
                            "requirements.txt",
                        ],
                        &[],
                    ),
                ]
            }
            None => vec![
                step(
                    &["python3", "-m", "venv", "--system-site-packages", &venv_s],
                    &[],
                ),
                step(
                    &[
                        &python,
                        "-m",
                        "pip",
                        "install",
                        "--disable-pip-version-check",
                        "-r",
                        "requirements.txt",
                    ],
                    &[],
                ),
            ],
        };
        plan.env = activate;
    }
    Ok(plan)
}

/// The key of the environment `plan` builds (see `envs`): its steps with this run's
/// paths taken out, the defining files in the start directory, and the interpreter and
/// uv it would use.
pub fn env_key(plan: &Plan, facts: &Facts, run_dir: &Path, cwd: &Path) -> String {
    let (run_s, cwd_s) = (run_dir.display().to_string(), cwd.display().to_string());
    let generic = |s: &str| s.replace(&cwd_s, "<project>").replace(&run_s, "<run>");
    let steps = plan
        .steps
        .iter()
        .map(|step| {
            let env: Vec<String> = step
                .env
                .iter()
                .map(|(k, v)| format!("{k}={}", generic(v)))
                .collect();
            format!("{} {}", generic(&step.shown), env.join(" "))
        })
        .collect();
    let files = crate::envs::DEFINING_FILES
        .iter()
        .filter_map(|name| Some((*name, std::fs::read(cwd.join(name)).ok()?)))
        .collect();
    let mut tools = Vec::new();
    for program in [find_in_path("python3", &facts.path), facts.uv.clone()]
        .into_iter()
        .flatten()
    {
        tools.push(crate::envs::tool_identity(&program));
    }
    crate::envs::key(&crate::envs::KeyInputs {
        steps,
        files,
        tools,
    })
}

/// Whether `text` (a Python script) holds a PEP 723 `script` metadata block.
pub fn has_pep723_block(text: &str) -> bool {
    let mut lines = text.lines().map(str::trim_end);
    lines.any(|l| l == "# /// script") && lines.any(|l| l == "# ///")
}

impl Facts {
    /// Looks at the start directory `cwd` and the command.
    pub fn gather(cwd: &Path, argv: &[String]) -> Self {
        let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into());
        let is_python = argv.first().is_some_and(|p| {
            let name = Path::new(p)
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("");
            name == "python" || name.starts_with("python3")
        });
        let pep723_script = is_python
            && argv.get(1).is_some_and(|script| {
                script.ends_with(".py")
                    && read_head(&cwd.join(script)).is_some_and(|t| has_pep723_block(&t))
            });
        Facts {
            pyproject: cwd.join("pyproject.toml").is_file(),
            uv_lock: cwd.join("uv.lock").is_file(),
            requirements: cwd.join("requirements.txt").is_file(),
            pep723_script,
            uv: find_in_path("uv", &path),
            path,
        }
    }
}

/// The first MiB of a file, as text.
fn read_head(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut buf = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(1 << 20)
        .read_to_end(&mut buf)
        .ok()?;
    Some(String::from_utf8_lossy(&buf).into_owned())
}

fn find_in_path(program: &str, path: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(path)
        .map(|dir| dir.join(program))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    /// The plan's steps and command, each rendered as one string, or the error.
    fn check(setup: Setup, command: &str, facts: Facts, expected: Result<(&[&str], &str), &str>) {
        let got = plan(&setup, &argv(command), &facts, Path::new("/r/venv"));
        match (got, expected) {
            (Ok(plan), Ok((steps, cmd))) => {
                let shown: Vec<&str> = plan.steps.iter().map(|s| s.shown.as_str()).collect();
                assert_eq!(shown, steps, "{facts:?}");
                assert_eq!(plan.argv.join(" "), cmd, "{facts:?}");
            }
            (Err(e), Err(expected)) => assert!(e.contains(expected), "{e}"),
            (got, expected) => panic!("{facts:?}: got {got:?}, expected {expected:?}"),
        }
    }

    fn uv() -> Option<PathBuf> {
        Some("/bin/uv".into())
    }

    #[test]
    fn detection_table() {
        let none = Facts::default();
        let req = Facts {
            requirements: true,
            ..Facts::default()
        };
        let req_uv = Facts {
            uv: uv(),
            ..req.clone()
        };
        let py = Facts {
            pyproject: true,
            ..Facts::default()
        };
        let py_uv = Facts {
            uv: uv(),
            ..py.clone()
        };
        let lock_uv = Facts {
            uv_lock: true,
            uv: uv(),
            ..Facts::default()
        };
        let pep = Facts {
            pep723_script: true,
            ..Facts::default()
        };
        let pep_uv = Facts {
            uv: uv(),
            ..pep.clone()
        };
        let cmd = "python3 train.py --lr 3";
        check(Setup::Auto, cmd, none.clone(), Ok((&[], cmd)));
        check(
            Setup::Auto,
            cmd,
            req,
            Ok((
                &[
                    "python3 -m venv --system-site-packages /r/venv",
                    "/r/venv/bin/python -m pip install --disable-pip-version-check -r requirements.txt",
                ],
                cmd,
            )),
        );
        check(
            Setup::Auto,
            cmd,
            req_uv,
            Ok((
                &[
                    "/bin/uv venv --system-site-packages /r/venv",
                    "/bin/uv pip install --python /r/venv/bin/python -r requirements.txt",
                ],
                cmd,
            )),
        );
        check(Setup::Auto, cmd, py_uv, Ok((&["/bin/uv sync"], cmd)));
        check(Setup::Auto, cmd, lock_uv, Ok((&["/bin/uv sync"], cmd)));
        check(Setup::Auto, cmd, py, Err("needs uv"));
        check(
            Setup::Auto,
            cmd,
            pep_uv,
            Ok((&[], "/bin/uv run --script train.py --lr 3")),
        );
        check(Setup::Auto, cmd, pep.clone(), Err("PEP 723"));
        check(Setup::Skip, cmd, pep, Ok((&[], cmd)));
        check(
            Setup::Commands(vec!["make data".into(), "pip install -e .".into()]),
            cmd,
            none,
            Ok((&["make data", "pip install -e ."], cmd)),
        );
    }

    #[test]
    fn a_venv_goes_first_in_path() {
        let facts = Facts {
            requirements: true,
            path: "/usr/bin".into(),
            ..Facts::default()
        };
        let plan = plan(
            &Setup::Auto,
            &argv("python3 t.py"),
            &facts,
            Path::new("/r/venv"),
        )
        .expect("plans");
        assert!(
            plan.env
                .contains(&("PATH".into(), "/r/venv/bin:/usr/bin".into()))
        );
        assert!(plan.env.contains(&("VIRTUAL_ENV".into(), "/r/venv".into())));
    }

    #[test]
    fn pep723_blocks() {
        assert!(has_pep723_block(
            "# /// script\n# dependencies = [\"rich\"]\n# ///\nprint(1)\n"
        ));
        assert!(!has_pep723_block("# /// script\nprint(1)\n"));
        assert!(!has_pep723_block("print('# /// script')\n"));
    }
}
