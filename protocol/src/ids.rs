//! Validated identifiers that cross the wire: run ids, instance names, enrollment tokens and
//! certificate fingerprints. Parsing rejects bad values with a message that says what a
//! valid one looks like.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// A run id is `run-` followed by 12 lowercase hex digits.
    #[error(
        "{0:?} is not a run id: a run id looks like `run-3f9a2c1b7d4e` (`run-` and 12 lowercase hex digits)"
    )]
    RunId(String),
    /// An instance name is 1-40 characters of `a-z`, `0-9` and `-`, starting with a letter.
    #[error(
        "{0:?} is not a valid instance name: use 1-40 characters of a-z, 0-9 and '-', starting with a letter (e.g. `local-1` or `gpu-box`)"
    )]
    InstanceName(String),
    /// A token is 64 lowercase hex digits.
    #[error("the enrollment token is malformed: a token is 64 lowercase hex digits")]
    Token,
    /// A fingerprint is a SHA-256 digest written as 64 lowercase hex digits.
    #[error("{0:?} is not a SHA-256 fingerprint: expected 64 lowercase hex digits")]
    Fingerprint(String),
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Identifies one run: `run-` and 12 lowercase hex digits.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RunId(String);

impl RunId {
    /// A run id from 6 random bytes (the caller supplies them, so this stays pure).
    pub fn from_random(bytes: [u8; 6]) -> Self {
        RunId(format!("run-{}", hex::encode(bytes)))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for RunId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        match s.strip_prefix("run-") {
            Some(rest) if rest.len() == 12 && is_lower_hex(rest) => Ok(RunId(s.to_owned())),
            _ => Err(IdError::RunId(s.to_owned())),
        }
    }
}

/// The name of an instance (a cloud VM, a pod, or a local agent).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct InstanceName(String);

impl InstanceName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for InstanceName {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let ok = (1..=40).contains(&s.len())
            && s.starts_with(|c: char| c.is_ascii_lowercase())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(InstanceName(s.to_owned()))
        } else {
            Err(IdError::InstanceName(s.to_owned()))
        }
    }
}

/// A single-use enrollment secret. It never appears in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EnrollToken(String);

impl EnrollToken {
    pub fn from_random(bytes: [u8; 32]) -> Self {
        EnrollToken(hex::encode(bytes))
    }
    /// The secret itself, for writing into an agent's config. Handle with care.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for EnrollToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EnrollToken(<redacted>)")
    }
}

impl FromStr for EnrollToken {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        if s.len() == 64 && is_lower_hex(s) {
            Ok(EnrollToken(s.to_owned()))
        } else {
            Err(IdError::Token)
        }
    }
}

/// The SHA-256 digest of a DER certificate: how the agent pins the controller's CA and how
/// the controller names the certificates it issued.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    pub fn of_der(der: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        Fingerprint(out)
    }
}

impl FromStr for Fingerprint {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let mut out = [0u8; 32];
        if s.len() != 64 || !is_lower_hex(s) || hex::decode_to_slice(s, &mut out).is_err() {
            return Err(IdError::Fingerprint(s.to_owned()));
        }
        Ok(Fingerprint(out))
    }
}

macro_rules! string_id {
    ($($ty:ident),*) => {$(
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&String::from(self.clone()))
            }
        }
        impl TryFrom<String> for $ty {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                s.parse()
            }
        }
    )*};
}
string_id!(RunId, InstanceName, Fingerprint);

impl TryFrom<String> for EnrollToken {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        s.parse()
    }
}

impl From<RunId> for String {
    fn from(id: RunId) -> String {
        id.0
    }
}
impl From<InstanceName> for String {
    fn from(name: InstanceName) -> String {
        name.0
    }
}
impl From<EnrollToken> for String {
    fn from(token: EnrollToken) -> String {
        token.0
    }
}
impl From<Fingerprint> for String {
    fn from(fp: Fingerprint) -> String {
        hex::encode(fp.0)
    }
}

impl fmt::Debug for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RunId({})", self.0)
    }
}
impl fmt::Debug for InstanceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InstanceName({})", self.0)
    }
}
impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check<T: FromStr>(input: &str, valid: bool) {
        assert_eq!(input.parse::<T>().is_ok(), valid, "{input:?}");
    }

    #[test]
    fn run_ids() {
        check::<RunId>("run-0123456789ab", true);
        check::<RunId>("run-0123456789AB", false);
        check::<RunId>("run-0123456789a", false);
        check::<RunId>("0123456789ab", false);
        check::<RunId>("run-0123456789abc", false);
        assert_eq!(
            RunId::from_random([0, 1, 2, 3, 4, 255]).as_str(),
            "run-0001020304ff"
        );
    }

    #[test]
    fn instance_names() {
        check::<InstanceName>("local-1", true);
        check::<InstanceName>("a", true);
        check::<InstanceName>(&"a".repeat(40), true);
        check::<InstanceName>(&"a".repeat(41), false);
        check::<InstanceName>("", false);
        check::<InstanceName>("1abc", false);
        check::<InstanceName>("Gpu", false);
        check::<InstanceName>("gpu box", false);
        check::<InstanceName>("../etc", false);
    }

    #[test]
    fn tokens_redact_themselves() {
        let token = EnrollToken::from_random([7; 32]);
        assert_eq!(format!("{token:?}"), "EnrollToken(<redacted>)");
        check::<EnrollToken>(token.expose(), true);
        check::<EnrollToken>("abc", false);
    }

    #[test]
    fn fingerprints_round_trip() {
        let fp = Fingerprint::of_der(b"certificate");
        let text = fp.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<Fingerprint>(), Ok(fp));
        check::<Fingerprint>(&text.to_uppercase(), false);
    }
}
