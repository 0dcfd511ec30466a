//! `run --secret`: reading each secret's value on this machine, from its environment
//! variable or its file. The values go to the daemon in the run request and from there to
//! the agent; nothing on either side writes them down.

use protocol::Secret;

use crate::cli::SecretSpec;
use crate::error::{ErrorCode, UserError};

/// Each secret's value; a missing or empty one is refused, naming where it was looked for.
pub fn read(specs: &[SecretSpec]) -> Result<Vec<Secret>, UserError> {
    specs.iter().map(read_one).collect()
}

fn read_one(spec: &SecretSpec) -> Result<Secret, UserError> {
    let name = &spec.name;
    let value = match &spec.file {
        None => std::env::var(name).map_err(|_| {
            UserError::new(
                ErrorCode::BadInput,
                format!("--secret {name}: {name} is not set in this environment"),
            )
            .resolve(format!(
                "export {name}=... first, or read it from a file: --secret {name}=@FILE"
            ))
        })?,
        Some(path) => {
            let path = expand_home(path);
            let text = std::fs::read_to_string(&path).map_err(|e| {
                UserError::new(
                    ErrorCode::BadInput,
                    format!("--secret {name}: cannot read {}: {e}", path.display()),
                )
                .resolve("give a readable file holding only the value")
            })?;
            let value = text.strip_suffix('\n').unwrap_or(&text);
            value.strip_suffix('\r').unwrap_or(value).to_owned()
        }
    };
    if value.is_empty() {
        return Err(UserError::new(
            ErrorCode::BadInput,
            format!("--secret {name}: the value is empty"),
        )
        .resolve("set it to the secret, or leave --secret out"));
    }
    Ok(Secret {
        name: name.clone(),
        value,
    })
}

/// `~/x` as the shell would have it (it does not, after `NAME=@`).
fn expand_home(path: &std::path::Path) -> std::path::PathBuf {
    match (path.strip_prefix("~"), std::env::var_os("HOME")) {
        (Ok(rest), Some(home)) => std::path::Path::new(&home).join(rest),
        _ => path.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("token");
        std::fs::write(&file, "hf_from_file\n").expect("write");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").expect("write");
        let spec = |name: &str, file: Option<&std::path::Path>| SecretSpec {
            name: name.into(),
            file: file.map(Into::into),
        };
        // PATH is set in every test environment; the name below never is.
        let cases: [(SecretSpec, Result<&str, &str>); 4] = [
            (spec("TOKEN", Some(&file)), Ok("hf_from_file")),
            (spec("EMPTY", Some(&empty)), Err("the value is empty")),
            (spec("RUNCTL_TEST_NEVER_SET_9", None), Err("is not set")),
            (
                spec("GONE", Some(&dir.path().join("nope"))),
                Err("cannot read"),
            ),
        ];
        for (spec, want) in cases {
            match (read_one(&spec), want) {
                (Ok(s), Ok(value)) => assert_eq!(s.value, value),
                (Err(e), Err(part)) => assert!(e.message.contains(part), "{}", e.message),
                (got, want) => panic!("{}: {got:?}, want {want:?}", spec.name),
            }
        }
        assert!(read(&[spec("PATH", None)]).is_ok());
    }
}
