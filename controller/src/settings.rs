//! `config path|show|get|set|unset|validate`: the controller's `config.toml` as dotted
//! keys (`daemon.stop_grace_secs`, `ec2.max_running`). Every key and its effective value
//! come from the loaded `Config` itself (serialized), so the list cannot drift from what
//! loading accepts; edits go through `toml_edit`, keeping the file's comments and order,
//! and are checked with the same rules as loading before the file is replaced.

use std::path::Path;

use serde::Serialize;

use crate::config::Config;
use crate::error::{ErrorCode, UserError};

/// Keys whose value is a table of the user's own names (not more keys).
const MAP_KEYS: &[&str] = &["ec2.prices"];

/// Keys whose default comes from the environment when the file does not set them.
const ENV_KEYS: &[(&str, &str)] = &[("local.agent_binary", "RUNCTL_AGENT_BIN")];

/// One key, its effective value and where that came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Setting {
    pub key: String,
    /// `null` for an optional key that is not set.
    pub value: serde_json::Value,
    /// `default`, `file`, or `environment (NAME)`.
    pub source: String,
}

/// Every key of `config`, in the order the config declares them.
pub fn keys(config: &Config) -> Vec<(String, serde_json::Value)> {
    let value = serde_json::to_value(config).expect("the config serializes");
    let mut out = Vec::new();
    flatten(&value, "", &mut out);
    out
}

fn flatten(value: &serde_json::Value, prefix: &str, out: &mut Vec<(String, serde_json::Value)>) {
    match value {
        serde_json::Value::Object(map) if !MAP_KEYS.contains(&prefix) => {
            for (name, v) in map {
                let key = if prefix.is_empty() {
                    name.clone()
                } else {
                    format!("{prefix}.{name}")
                };
                flatten(v, &key, out);
            }
        }
        leaf => out.push((prefix.to_owned(), leaf.clone())),
    }
}

/// The file's value at `key`, if it sets one.
fn in_file<'d>(doc: &'d toml_edit::DocumentMut, key: &str) -> Option<&'d toml_edit::Item> {
    let mut item = doc.as_item();
    for part in key.split('.') {
        item = item.get(part)?;
    }
    Some(item)
}

/// Every setting of the file `text` (already loaded as `config`), with its source.
pub fn show(config: &Config, text: &str) -> Vec<Setting> {
    let doc: toml_edit::DocumentMut = text.parse().unwrap_or_default();
    keys(config)
        .into_iter()
        .map(|(key, value)| {
            if in_file(&doc, &key).is_some() {
                return Setting {
                    key,
                    value,
                    source: "file".into(),
                };
            }
            if let Some((_, var)) = ENV_KEYS.iter().find(|(k, _)| *k == key)
                && let Some(from_env) = std::env::var_os(var)
            {
                return Setting {
                    key,
                    value: from_env.to_string_lossy().into_owned().into(),
                    source: format!("environment ({var})"),
                };
            }
            Setting {
                key,
                value,
                source: "default".into(),
            }
        })
        .collect()
}

/// The setting named `key`, or the refusal naming the nearest key.
pub fn get(settings: &[Setting], key: &str) -> Result<Setting, UserError> {
    settings
        .iter()
        .find(|s| s.key == key)
        .cloned()
        .ok_or_else(|| unknown(key, settings.iter().map(|s| s.key.as_str())))
}

fn unknown<'a>(key: &str, known: impl Iterator<Item = &'a str>) -> UserError {
    let nearest = known
        .map(|k| (strsim::jaro_winkler(k, key), k))
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k.to_owned());
    let error = UserError::new(
        ErrorCode::BadInput,
        format!("there is no config key {key:?}"),
    );
    match nearest {
        Some(k) => error.resolve(format!(
            "did you mean {k}? (runctl-controller config show lists every key)"
        )),
        None => error.resolve("runctl-controller config show lists every key"),
    }
}

/// A value for people: strings bare, everything else as TOML writes it.
pub fn bare(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Null => String::new(),
        serde_json::Value::String(s) => s.clone(),
        other => toml_literal(other),
    }
}

fn toml_literal(value: &serde_json::Value) -> String {
    #[derive(Serialize)]
    struct V<'a> {
        v: &'a serde_json::Value,
    }
    toml::to_string(&V { v: value })
        .map(|t| t.trim_start_matches("v = ").trim_end().to_owned())
        .unwrap_or_else(|_| value.to_string())
}

/// `text` with `key` set to `raw`, typed as the key's current value is (a string key
/// takes `raw` as it is; others take a TOML literal: `4`, `true`, `["a", "b"]`), checked
/// as loading checks the file. The new text, or the refusal with its fix.
pub fn set(text: &str, key: &str, raw: &str) -> Result<String, UserError> {
    let mut doc = parse_doc(text)?;
    let config = Config::parse(text).unwrap_or_default();
    let all = keys(&config);
    let known = all.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    let under_map = MAP_KEYS.iter().any(|m| {
        key.strip_prefix(m)
            .is_some_and(|rest| rest.starts_with('.') && rest.len() > 1)
    });
    let Some(current) = known.or(under_map.then_some(serde_json::Value::Null)) else {
        return Err(unknown(key, all.iter().map(|(k, _)| k.as_str())));
    };
    let value =
        match current {
            serde_json::Value::String(_) => toml_edit::Value::from(raw),
            _ => match raw.parse::<toml_edit::Value>() {
                Ok(v) => v,
                // An optional key with no value yet: a bare word is a string.
                Err(_) if current.is_null() => toml_edit::Value::from(raw),
                Err(_) => {
                    return Err(UserError::new(
                    ErrorCode::BadInput,
                    format!("{raw:?} is not a value for {key} (now {})", toml_literal(&current)),
                )
                .resolve(format!(
                    "give a value like its current one, e.g. runctl-controller config set {key} {}",
                    toml_literal(&current)
                )));
                }
            },
        };
    let parts: Vec<&str> = if under_map {
        let map = MAP_KEYS
            .iter()
            .find(|m| key.starts_with(*m))
            .expect("matched above");
        let mut parts: Vec<&str> = map.split('.').collect();
        parts.push(&key[map.len() + 1..]);
        parts
    } else {
        key.split('.').collect()
    };
    let (last, tables) = parts.split_last().expect("a key has a name");
    let mut table = doc.as_table_mut();
    for part in tables {
        let entry = table
            .entry(part)
            .or_insert_with(|| toml_edit::Item::Table(toml_edit::Table::new()));
        table = entry.as_table_mut().ok_or_else(|| {
            UserError::new(
                ErrorCode::BadInput,
                format!("{part} in config.toml is not a table, so {key} cannot be set in it"),
            )
        })?;
    }
    match table.get_mut(last).and_then(toml_edit::Item::as_value_mut) {
        // In place: the key, its comment above and the one after the value stay.
        Some(existing) => {
            let decor = existing.decor().clone();
            *existing = value;
            *existing.decor_mut() = decor;
        }
        None => {
            table.insert(last, toml_edit::Item::Value(value));
        }
    }
    checked(doc.to_string(), key)
}

/// `text` without `key` (its default applies again).
pub fn unset(text: &str, key: &str) -> Result<String, UserError> {
    let mut doc = parse_doc(text)?;
    let config = Config::parse(text).unwrap_or_default();
    let all = keys(&config);
    if !all.iter().any(|(k, _)| k == key) {
        return Err(unknown(key, all.iter().map(|(k, _)| k.as_str())));
    }
    let (tables, last) = key.rsplit_once('.').unwrap_or(("", key));
    let mut table = doc.as_table_mut();
    for part in tables.split('.').filter(|p| !p.is_empty()) {
        match table.get_mut(part).and_then(toml_edit::Item::as_table_mut) {
            Some(t) => table = t,
            None => return Ok(doc.to_string()),
        }
    }
    table.remove(last);
    checked(doc.to_string(), key)
}

fn parse_doc(text: &str) -> Result<toml_edit::DocumentMut, UserError> {
    text.parse().map_err(|e| {
        UserError::new(ErrorCode::BadInput, format!("config.toml is not TOML: {e}"))
            .resolve("fix it first: runctl-controller config validate")
    })
}

fn checked(text: String, key: &str) -> Result<String, UserError> {
    Config::parse(&text).map_err(|e| {
        UserError::new(
            ErrorCode::BadInput,
            format!("{key} would make the config invalid: {}", e.trim_end()),
        )
        .resolve("the file was left as it was; give a value that passes (see the README's configuration section)")
    })?;
    Ok(text)
}

/// Checks the config file at `path` as loading does.
pub fn validate(path: &Path) -> Result<(), UserError> {
    if path
        .file_name()
        .is_some_and(|n| n == crate::runfile::FILE_NAME)
    {
        return match crate::runfile::load(path)? {
            Some(_) => Ok(()),
            None => Err(UserError::new(
                ErrorCode::BadInput,
                format!("there is no {}", path.display()),
            )),
        };
    }
    let text = std::fs::read_to_string(path).map_err(|e| {
        UserError::new(
            ErrorCode::BadInput,
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    Config::parse(&text).map(|_| ()).map_err(|e| {
        let error = UserError::new(
            ErrorCode::BadInput,
            format!("{} is invalid: {}", path.display(), e.trim_end()),
        );
        match crate::runfile::nearest_key(&e) {
            Some(key) => error.resolve(format!(
                "did you mean {key}? (runctl-controller config show lists every key)"
            )),
            None => error.resolve("fix the file (see the README's configuration section)"),
        }
    })
}

/// Replaces `path` with `text` whole (a temporary file renamed over it), owner-only.
pub fn write(path: &Path, text: &str) -> Result<(), UserError> {
    protocol::tls::write_private(path, text.as_bytes()).map_err(|e| {
        UserError::new(
            ErrorCode::Internal,
            format!("writing {}: {e}", path.display()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "# my settings\n[daemon]\n# how long a stop waits\nstop_grace_secs = 30\n\n[ec2]\nregion = \"eu-west-1\" # Ireland\n";

    #[test]
    fn every_key_is_listed_with_its_source() {
        let config = Config::parse(FILE).expect("valid");
        let settings = show(&config, FILE);
        let find = |k: &str| get(&settings, k).expect(k);
        assert_eq!(find("daemon.stop_grace_secs").value, 30);
        assert_eq!(find("daemon.stop_grace_secs").source, "file");
        assert_eq!(find("daemon.token_ttl_secs").source, "default");
        assert_eq!(find("ec2.region").value, "eu-west-1");
        assert_eq!(find("ec2.max_running").source, "default");
        assert!(find("ec2.ami").value.is_null());
        assert_eq!(find("storage.backend").value, "local");
        assert!(find("ec2.prices").value.is_object());
        assert!(settings.iter().any(|s| s.key == "agent.allow_shell"));
        let e = get(&settings, "daemon.stop_grace").expect_err("unknown");
        assert_eq!(e.code, ErrorCode::BadInput);
        assert!(e.to_resolve[0].contains("daemon.stop_grace_secs"), "{e:?}");
    }

    #[test]
    fn edits_keep_comments_and_are_checked() {
        let check = |key: &str, raw: &str, expect: Result<&str, &str>| match (
            set(FILE, key, raw),
            expect,
        ) {
            (Ok(text), Ok(needle)) => {
                assert!(text.contains(needle), "{key}={raw}: {text}");
                assert!(text.contains("# how long a stop waits"), "{text}");
                assert!(text.contains("# Ireland"), "{text}");
                assert!(Config::parse(&text).is_ok());
            }
            (Err(e), Err(needle)) => {
                let all = format!("{} {:?}", e.message, e.to_resolve);
                assert!(all.contains(needle), "{key}={raw}: {all}");
            }
            (got, want) => panic!("{key}={raw}: got {got:?}, want {want:?}"),
        };
        check("daemon.stop_grace_secs", "60", Ok("stop_grace_secs = 60"));
        check("ec2.max_running", "8", Ok("max_running = 8"));
        check("ec2.region", "us-west-2", Ok("region = \"us-west-2\""));
        check(
            "ec2.ami",
            "ami-0123456789abcdef0",
            Ok("ami = \"ami-0123456789abcdef0\""),
        );
        check("storage.backend", "s3", Ok("backend = \"s3\""));
        check("agent.allow_shell", "false", Ok("allow_shell = false"));
        check(
            "agent.forward_hosts",
            "[\"10.0.0.5\"]",
            Ok("forward_hosts = [\"10.0.0.5\"]"),
        );
        check("ec2.prices.g5.xlarge", "1.5", Ok("\"g5.xlarge\" = 1.5"));
        check(
            "daemon.stop_grace_secs",
            "soon",
            Err("not a value for daemon.stop_grace_secs"),
        );
        check(
            "storage.backend",
            "ftp",
            Err("would make the config invalid"),
        );
        check("relay.port", "0", Err("[relay] port"));
        check("agent.copy_roots", "[\"data\"]", Err("copy_roots"));
        check("daemon.stop_grace", "3", Err("daemon.stop_grace_secs"));
    }

    #[test]
    fn unset_returns_a_key_to_its_default() {
        let text = unset(FILE, "daemon.stop_grace_secs").expect("unset");
        assert!(!text.contains("stop_grace_secs"), "{text}");
        assert!(text.contains("# Ireland"), "{text}");
        let config = Config::parse(&text).expect("valid");
        assert_eq!(config.daemon.stop_grace_secs, 10);
        assert_eq!(
            unset(FILE, "ec2.ami").expect("not set: nothing to do"),
            FILE
        );
        assert!(unset(FILE, "ec2.nope").is_err());
    }

    #[test]
    fn values_read_bare() {
        assert_eq!(bare(&"eu-west-1".into()), "eu-west-1");
        assert_eq!(bare(&30.into()), "30");
        assert_eq!(bare(&true.into()), "true");
        assert_eq!(bare(&serde_json::json!(["a", "b"])), "[\"a\", \"b\"]");
        assert_eq!(bare(&serde_json::Value::Null), "");
    }
}
