//! What EC2 identifiers and names look like, checked before any API call so a typo gets a
//! clear answer instead of a service error (or, worse, a search that finds nothing).

/// Checks `id` is `PREFIX-` followed by 8 or 17 lowercase hex digits (`i-`, `vol-`,
/// `snap-`, `ami-`, `sg-`, `subnet-`).
pub fn check_id(id: &str, prefix: &str) -> Result<(), String> {
    let ok = id
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('-'))
        .is_some_and(|hex| {
            matches!(hex.len(), 8 | 17)
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{id:?} is not a valid {prefix}- id ({prefix}- and 8 or 17 hex digits, e.g. {prefix}-0123456789abcdef0)"
        ))
    }
}

/// Checks `region` looks like an AWS region (`us-east-1`, `ap-southeast-2`,
/// `us-gov-west-1`).
pub fn check_region(region: &str) -> Result<(), String> {
    let parts: Vec<&str> = region.split('-').collect();
    let ok = parts.len() >= 3
        && parts[..parts.len() - 1]
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
        && parts[parts.len() - 1].parse::<u8>().is_ok();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{region:?} is not an AWS region (e.g. us-east-1, eu-west-2)"
        ))
    }
}

/// Checks `kind` has the shape of an instance type (`g5.xlarge`, `p4d.24xlarge`,
/// `g6e.12xlarge`); whether EC2 offers it is asked of EC2.
pub fn check_instance_type(kind: &str) -> Result<(), String> {
    let ok = kind.split_once('.').is_some_and(|(family, size)| {
        family.len() >= 2
            && family.as_bytes()[0].is_ascii_lowercase()
            && family
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !size.is_empty()
            && size
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{kind:?} is not an instance type (e.g. g5.xlarge, g6e.2xlarge, p4d.24xlarge)"
        ))
    }
}

/// Checks a device name for a volume attachment (`/dev/sdf` .. `/dev/sdp`, `/dev/xvdf`).
pub fn check_device(device: &str) -> Result<(), String> {
    let ok = ["/dev/sd", "/dev/xvd"].iter().any(|prefix| {
        device.strip_prefix(prefix).is_some_and(|rest| {
            matches!(rest.as_bytes(), [b'f'..=b'z'] | [b'f'..=b'z', b'a'..=b'z'])
        })
    });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{device:?} is not a device name for a data volume (use /dev/sdf .. /dev/sdz)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(check_id("i-0123456789abcdef0", "i").is_ok());
        assert!(check_id("i-01234567", "i").is_ok());
        assert!(check_id("vol-0123456789abcdef0", "vol").is_ok());
        assert!(check_id("snap-0123456789abcdef0", "snap").is_ok());
        assert!(check_id("ami-0123456789abcdef0", "ami").is_ok());
        for bad in [
            "i-0123456789ABCDEF0",
            "i-0123",
            "i-0123456789abcdef0x",
            "vol-0123456789abcdef0",
            "i0123456789abcdef0",
            "i-",
            "",
            "i-0123456789abcdeg0",
        ] {
            let e = check_id(bad, "i").expect_err("refused");
            assert!(e.contains("not a valid i- id"), "{bad}: {e}");
        }
    }

    #[test]
    fn regions() {
        for good in ["us-east-1", "eu-west-2", "ap-southeast-2", "us-gov-west-1"] {
            assert!(check_region(good).is_ok(), "{good}");
        }
        for bad in ["us-east", "US-EAST-1", "useast1", "us--1", "us-east-x", ""] {
            assert!(check_region(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn instance_types() {
        for good in [
            "g5.xlarge",
            "p4d.24xlarge",
            "g6e.12xlarge",
            "t3.micro",
            "u-6tb1.metal",
        ] {
            assert!(check_instance_type(good).is_ok(), "{good}");
        }
        for bad in [
            "g5",
            "G5.xlarge",
            "g5.",
            ".xlarge",
            "g5.x large",
            "5g.xlarge",
            "",
        ] {
            assert!(check_instance_type(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn devices() {
        assert!(check_device("/dev/sdf").is_ok());
        assert!(check_device("/dev/xvdh").is_ok());
        assert!(check_device("/dev/sda1").is_err());
        assert!(check_device("/dev/sda").is_err());
        assert!(check_device("sdf").is_err());
    }
}
