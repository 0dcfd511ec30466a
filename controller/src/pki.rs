//! The controller's CA and server identity on disk (`$RUNCTL_HOME/pki`), created on first
//! use. Private keys are mode 0600 inside a 0700 directory.

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use anyhow::Context;
use protocol::tls::{self, CertificateAuthority, Identity};

pub struct Pki {
    pub ca: CertificateAuthority,
    pub server: Identity,
    /// The client certificate the daemon registers with a relay under.
    pub relay_client: Identity,
    /// Keys the QUIC endpoint's connection ids and stateless resets. Kept across restarts
    /// so a restarted daemon can tell agents at once that their old connection is gone,
    /// instead of leaving them to wait out the idle timeout.
    pub endpoint_secret: [u8; 32],
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki")
            .field("ca", &self.ca)
            .field("server", &self.server)
            .field("relay_client", &self.relay_client)
            .field("endpoint_secret", &"<redacted>")
            .finish()
    }
}

fn read(path: &Path) -> anyhow::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn save(path: &Path, text: &str) -> anyhow::Result<()> {
    tls::write_private(path, text.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

/// Loads the CA and server identity from `dir`, creating whichever is missing.
pub fn load_or_create(dir: &Path) -> anyhow::Result<Pki> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let (ca_crt, ca_key) = (dir.join("ca.crt"), dir.join("ca.key"));
    let ca = match (read(&ca_crt)?, read(&ca_key)?) {
        (Some(cert), Some(key)) => CertificateAuthority::from_pem(&cert, &key)
            .with_context(|| format!("loading the CA from {}", dir.display()))?,
        _ => {
            let ca = CertificateAuthority::generate()?;
            // Key first: a crash between the two writes leaves no certificate without its key.
            save(&ca_key, &ca.key_pem())?;
            save(&ca_crt, ca.cert_pem())?;
            // A new CA invalidates any old server and relay certificate.
            let _ = std::fs::remove_file(dir.join("server.crt"));
            let _ = std::fs::remove_file(dir.join("relay-client.crt"));
            tracing::info!("created a new controller CA ({})", ca.fingerprint());
            ca
        }
    };
    let (srv_crt, srv_key) = (dir.join("server.crt"), dir.join("server.key"));
    let server = match (read(&srv_crt)?, read(&srv_key)?) {
        (Some(cert_pem), Some(key_pem)) => Identity { cert_pem, key_pem },
        _ => {
            let server = ca.issue_server_identity()?;
            save(&srv_key, &server.key_pem)?;
            save(&srv_crt, &server.cert_pem)?;
            server
        }
    };
    let (relay_crt, relay_key) = (dir.join("relay-client.crt"), dir.join("relay-client.key"));
    let relay_client = match (read(&relay_crt)?, read(&relay_key)?) {
        (Some(cert_pem), Some(key_pem)) => Identity { cert_pem, key_pem },
        _ => {
            let id = ca.issue_relay_client_identity()?;
            save(&relay_key, &id.key_pem)?;
            save(&relay_crt, &id.cert_pem)?;
            id
        }
    };
    let secret_path = dir.join("endpoint.key");
    let endpoint_secret = match read(&secret_path)? {
        Some(text) => {
            let mut secret = [0u8; 32];
            hex::decode_to_slice(text.trim(), &mut secret)
                .with_context(|| format!("{} is not 64 hex digits", secret_path.display()))?;
            secret
        }
        None => {
            let secret: [u8; 32] = rand::random();
            save(&secret_path, &hex::encode(secret))?;
            secret
        }
    };
    Ok(Pki {
        ca,
        server,
        relay_client,
        endpoint_secret,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn created_once_with_owner_only_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki_dir = dir.path().join("pki");
        let first = load_or_create(&pki_dir).expect("create");
        let second = load_or_create(&pki_dir).expect("load");
        assert_eq!(first.ca.fingerprint(), second.ca.fingerprint());
        assert_eq!(first.server.cert_pem, second.server.cert_pem);
        assert_eq!(first.endpoint_secret, second.endpoint_secret);
        for name in [
            "ca.key",
            "server.key",
            "ca.crt",
            "endpoint.key",
            "relay-client.key",
        ] {
            let mode = std::fs::metadata(pki_dir.join(name))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
        let mode = std::fs::metadata(&pki_dir)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
