//! `s3://bucket/key` URLs, the one way users and run specs name objects and prefixes
//! (for either backend: the local store maps a bucket to a directory).

use std::fmt;

use crate::StoreError;

/// A bucket and a key or key prefix inside it (possibly empty, possibly ending in '/').
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectUrl {
    pub bucket: String,
    pub key: String,
}

impl ObjectUrl {
    pub fn parse(url: &str) -> Result<Self, StoreError> {
        let bad = |reason: &str| StoreError::InvalidUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| bad("it does not start with s3://"))?;
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && !bucket.starts_with(['-', '.'])
            && !bucket.ends_with(['-', '.']);
        if !bucket_ok {
            return Err(bad(
                "the bucket name must be 3-63 lowercase letters, digits, '-' or '.'",
            ));
        }
        let trimmed = key.trim_end_matches('/');
        if !trimmed.is_empty() && crate::validate_key(trimmed).is_err() {
            return Err(bad(
                "the key must be '/'-separated names without '..', '.' or empty segments",
            ));
        }
        Ok(ObjectUrl {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
        })
    }

    /// This URL as a prefix: its key with exactly one trailing '/' (empty stays empty).
    pub fn as_prefix(&self) -> String {
        let key = self.key.trim_end_matches('/');
        if key.is_empty() {
            String::new()
        } else {
            format!("{key}/")
        }
    }

    /// The URL of `key` in the same bucket.
    pub fn with_key(&self, key: impl Into<String>) -> ObjectUrl {
        ObjectUrl {
            bucket: self.bucket.clone(),
            key: key.into(),
        }
    }

    /// The URL `name` below this one, treated as a prefix.
    pub fn join(&self, name: &str) -> ObjectUrl {
        self.with_key(format!("{}{name}", self.as_prefix()))
    }
}

impl fmt::Display for ObjectUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

/// The part of `key` below `prefix`, when it is a safe relative path for a local file
/// (no `..`, no absolute or empty segments). Keys that would escape are refused, never
/// written.
pub fn relative_key<'a>(prefix: &str, key: &'a str) -> Option<&'a str> {
    let rest = key.strip_prefix(prefix)?;
    crate::validate_key(rest).ok().map(|()| rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        let u = ObjectUrl::parse("s3://my-bucket/data/train/").expect("valid");
        assert_eq!(u.bucket, "my-bucket");
        assert_eq!(u.key, "data/train/");
        assert_eq!(u.as_prefix(), "data/train/");
        assert_eq!(u.join("x.bin").key, "data/train/x.bin");
        assert_eq!(ObjectUrl::parse("s3://bkt").expect("valid").as_prefix(), "");
        assert_eq!(ObjectUrl::parse("s3://bkt/").expect("valid").key, "");
        for bad in [
            "bkt/key",
            "s3://",
            "s3://B/x",
            "s3://ab/x",
            "s3://-bkt/x",
            "s3://bkt/../x",
            "s3://bkt/a//b",
            "http://bkt/x",
        ] {
            assert!(ObjectUrl::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            ObjectUrl::parse("s3://bkt/a/b").expect("valid").to_string(),
            "s3://bkt/a/b"
        );
    }

    #[test]
    fn relative_keys_never_escape() {
        assert_eq!(relative_key("data/", "data/a/b.bin"), Some("a/b.bin"));
        assert_eq!(relative_key("data/", "other/a"), None);
        assert_eq!(relative_key("data/", "data/../etc/passwd"), None);
        assert_eq!(relative_key("data/", "data//x"), None);
        assert_eq!(relative_key("data/", "data/"), None);
        assert_eq!(relative_key("", "a"), Some("a"));
    }
}
