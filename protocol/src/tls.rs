//! Identity on the channel (rcgen + rustls + quinn): the controller's CA and server
//! certificate, agent key pairs and CSRs, certificate issuance, the agent's CA pin, and the
//! QUIC endpoint configurations built from them.
//!
//! The agent reaches the controller by whatever address it was given, so the server
//! certificate names a fixed DNS name, [`SERVER_NAME`]; what makes it trustworthy is the
//! agent's pin of the CA's SHA-256 fingerprint.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::ids::{Fingerprint, InstanceName};

/// The DNS name in the controller's server certificate, and the name agents ask for.
pub const SERVER_NAME: &str = "runctl-controller";
/// The ALPN protocol both sides require.
pub const ALPN: &[u8] = b"runctl";

/// Why an identity operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Generating or signing a certificate failed.
    #[error("certificate operation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// rustls refused a configuration or key.
    #[error("TLS configuration failed: {0}")]
    Rustls(#[from] rustls::Error),
    /// A PEM file did not hold what was expected.
    #[error("{what} is not valid PEM: {detail}")]
    Pem { what: &'static str, detail: String },
    /// The QUIC layer refused the TLS configuration.
    #[error("QUIC TLS configuration failed: {0}")]
    Quic(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// How far before its issue every certificate's validity starts (`not_before` is its issue
/// time less this), for clocks behind the issuer's or set back since: an instance whose
/// clock lags the laptop's, or a laptop whose clock NTP steps back after a wrong hardware
/// clock. With an hour, a clock set back an hour refused every certificate issued in the
/// hour before, so agents could not reconnect. Trust rests on the CA pin and the
/// per-connection fingerprint lookup, not on `not_before`, so two days costs nothing.
pub const BACKDATE: Duration = Duration::from_secs(2 * 86_400);

fn now_offset(delta: Duration, back: bool) -> time::OffsetDateTime {
    let now = time::OffsetDateTime::from(crate::clock::now());
    let delta = time::Duration::try_from(delta).unwrap_or(time::Duration::MAX);
    if back { now - delta } else { now + delta }
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the system random source is available");
    bytes[0] &= 0x7f; // keep the serial positive
    SerialNumber::from_slice(&bytes)
}

/// The controller's certificate authority: signs its server certificate and agents' CSRs.
pub struct CertificateAuthority {
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    key: KeyPair,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("fingerprint", &self.fingerprint())
            .field("key", &"<redacted>")
            .finish()
    }
}

impl CertificateAuthority {
    /// A fresh CA with a new ECDSA P-256 key, valid for ten years.
    pub fn generate() -> Result<Self, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "runctl controller CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = now_offset(BACKDATE, true);
        params.not_after = now_offset(Duration::from_secs(10 * 365 * 86_400), false);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        Ok(CertificateAuthority {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            key,
        })
    }

    /// Loads a CA saved with [`Self::cert_pem`] and [`Self::key_pem`].
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let key = KeyPair::from_pem(key_pem)?;
        let cert_der = pem_certificate(cert_pem, "the CA certificate")?;
        Ok(CertificateAuthority {
            cert_der,
            cert_pem: cert_pem.to_owned(),
            key,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }
    /// The private key in PEM. Store it owner-only.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }
    /// What agents pin.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of_der(&self.cert_der)
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, TlsError> {
        Ok(Issuer::from_ca_cert_der(&self.cert_der, &self.key)?)
    }

    /// A new server key and certificate for [`SERVER_NAME`], signed by this CA.
    pub fn issue_server_identity(&self) -> Result<Identity, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![SERVER_NAME.to_owned()])?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, SERVER_NAME);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = now_offset(BACKDATE, true);
        params.not_after = now_offset(Duration::from_secs(5 * 365 * 86_400), false);
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&key, &self.issuer()?)?;
        Ok(Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs an agent's CSR. Only the CSR's public key is used: the subject is set here to
    /// the instance the enrollment token was minted for, so an agent cannot name itself.
    pub fn sign_agent_csr(
        &self,
        csr_der: &[u8],
        instance: &InstanceName,
        valid_for: Duration,
    ) -> Result<CertificateDer<'static>, TlsError> {
        let csr = CertificateSigningRequestParams::from_der(&csr_der.into())?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, instance.as_str());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::DnsName(
            format!("{}.agent.runctl", instance.as_str()).try_into()?,
        )];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = now_offset(BACKDATE, true);
        params.not_after = now_offset(valid_for, false);
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&csr.public_key, &self.issuer()?)?;
        Ok(cert.der().clone())
    }
}

impl CertificateAuthority {
    /// The identity the daemon registers with a relay under: a client certificate for
    /// [`RELAY_CLIENT_NAME`]. Agent certificates name `<instance>.agent.runctl`, so the
    /// relay, which checks the name, never takes an agent for the daemon.
    pub fn issue_relay_client_identity(&self) -> Result<Identity, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![RELAY_CLIENT_NAME.to_owned()])?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, RELAY_CLIENT_NAME);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = now_offset(BACKDATE, true);
        params.not_after = now_offset(Duration::from_secs(5 * 365 * 86_400), false);
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&key, &self.issuer()?)?;
        Ok(Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// The name in the daemon's relay registration certificate.
pub const RELAY_CLIENT_NAME: &str = "controller.relay.runctl";
/// The name in a relay's own, self-signed certificate. Not [`SERVER_NAME`], and not signed
/// by any controller CA: a relay can never pass for the controller.
pub const RELAY_NAME: &str = "runctl-relay";

/// A relay's own identity: a self-signed certificate for [`RELAY_NAME`].
pub fn self_signed_relay_identity() -> Result<Identity, TlsError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![RELAY_NAME.to_owned()])?;
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, RELAY_NAME);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = now_offset(BACKDATE, true);
    params.not_after = now_offset(Duration::from_secs(10 * 365 * 86_400), false);
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key)?;
    Ok(Identity {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl Identity {
    pub fn cert_der(&self) -> Result<CertificateDer<'static>, TlsError> {
        pem_certificate(&self.cert_pem, "the certificate")
    }
    fn key_der(&self) -> Result<PrivateKeyDer<'static>, TlsError> {
        let key = KeyPair::from_pem(&self.key_pem)?;
        Ok(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            key.serialize_der(),
        )))
    }
    pub fn fingerprint(&self) -> Result<Fingerprint, TlsError> {
        Ok(Fingerprint::of_der(&self.cert_der()?))
    }
}

/// A new agent key pair and a CSR for it. The key stays on the agent.
pub fn agent_key_and_csr() -> Result<(String, Vec<u8>), TlsError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "runctl-agent");
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.der().to_vec()))
}

/// Writes key material readable by the owner only (mode 0600), through a temporary name
/// so a crash never leaves a half-written key.
pub fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// A certificate's validity period (PEM), as seconds since the Unix epoch: from, until.
pub fn validity(cert_pem: &str) -> Option<(u64, u64)> {
    let der = pem::parse(cert_pem).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.contents()).ok()?;
    let validity = cert.validity();
    let secs = |t: x509_parser::time::ASN1Time| u64::try_from(t.timestamp()).ok();
    Some((secs(validity.not_before)?, secs(validity.not_after)?))
}

/// Converts a DER certificate to PEM, for storing it.
pub fn der_to_pem(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

fn pem_certificate(pem: &str, what: &'static str) -> Result<CertificateDer<'static>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem {
        what,
        detail: e.to_string(),
    })
}

/// The largest UDP payload either side accepts and probes for. Path MTU discovery still
/// starts at 1200 bytes and climbs only where the path carries more (loopback, jumbo-frame
/// links such as within a cloud VPC); on the internet it settles near 1452 as before.
/// Bigger packets mean less header, tag and ACK overhead per byte and fewer packets to
/// process. Not 8952: quinn sends up to 10 packets in one GSO batch, which must fit in one
/// 64 KiB UDP datagram, or the whole batch is dropped (measured: losses, then the MTU
/// falls back to 1200 as a "black hole").
pub const MAX_UDP_PAYLOAD_BYTES: u16 = 6500;

/// The socket buffer size asked for (the kernel caps it at `net.core.rmem_max` /
/// `wmem_max`). A bulk transfer has up to a congestion window of packets in flight; with
/// the usual 208 KiB default a receiver busy writing files drops a burst, which QUIC reads
/// as congestion (and, for large packets, as an MTU black hole).
const SOCKET_BUFFER_BYTES: usize = 8 * 1024 * 1024;

/// A UDP socket for a QUIC endpoint, with large send and receive buffers.
pub fn bind_udp(addr: std::net::SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    // Best effort: a smaller buffer still works, only less smoothly.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// An endpoint configuration that accepts packets up to [`MAX_UDP_PAYLOAD_BYTES`].
pub fn endpoint_config(mut config: quinn::EndpointConfig) -> quinn::EndpointConfig {
    config
        .max_udp_payload_size(MAX_UDP_PAYLOAD_BYTES)
        .expect("within QUIC's limits");
    config
}

/// The largest frame either side takes on a connection that has not authenticated
/// (`Hello` and `Enroll` are a few kilobytes): a peer without a certificate can make the
/// daemon hold no more than this for it.
pub const MAX_UNAUTHENTICATED_FRAME_BYTES: usize = 64 * 1024;

/// The daemon's connection receive window before the peer has authenticated.
const PRE_AUTH_RECEIVE_WINDOW: u32 = 128 * 1024;

fn transport(keep_alive: Option<Duration>) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD_BYTES);
    t.mtu_discovery_config(Some(mtu));
    t.keep_alive_interval(keep_alive);
    // A silent peer is dropped after 30 s.
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(30)).expect("30 s is a valid timeout"),
    ));
    Arc::new(t)
}

/// The agent's keep-alive: every 5 s, well inside the 30 s idle timeout and the shortest
/// NAT UDP mapping lifetimes seen in practice (RFC 4787 asks for at least 2 minutes; some
/// carrier-grade NATs keep 30 s). The daemon sends none of its own: an unauthenticated
/// connection must not be kept open by the daemon's effort, and an agent's own keep-alives
/// are answered, which keeps both directions alive.
const AGENT_KEEP_ALIVE: Duration = Duration::from_secs(5);

/// The controller's QUIC server configuration: presents `server` (with the CA in its
/// chain so agents can check their pin), and verifies client certificates against the CA.
/// A connection without a client certificate is let through the handshake: it may only
/// enroll, which the controller enforces.
pub fn server_config(
    ca: &CertificateAuthority,
    server: &Identity,
) -> Result<quinn::ServerConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.cert_der().clone())?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut tls =
        rustls::ServerConfig::builder_with_details(provider(), Arc::new(crate::clock::Clock))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![server.cert_der()?, ca.cert_der().clone()],
                server.key_der()?,
            )?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    let mut t = transport(None);
    let limits = Arc::get_mut(&mut t).expect("just made");
    // What a peer that has not authenticated can make the daemon hold: one stream (the
    // control stream; the daemon opens every other), no unreliable datagrams, and a small
    // connection receive window that the daemon widens once the peer has authenticated.
    limits
        .max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .datagram_receive_buffer_size(None)
        .receive_window(PRE_AUTH_RECEIVE_WINDOW.into());
    config.transport_config(t);
    Ok(config)
}

/// The agent's QUIC client configuration. It trusts exactly the CA whose fingerprint is
/// `ca_pin`, and presents `client` when it has enrolled.
pub fn client_config(
    ca_pin: Fingerprint,
    client: Option<&Identity>,
) -> Result<quinn::ClientConfig, TlsError> {
    let verifier = Arc::new(PinnedCaVerifier {
        pin: ca_pin,
        algorithms: provider().signature_verification_algorithms,
    });
    let builder =
        rustls::ClientConfig::builder_with_details(provider(), Arc::new(crate::clock::Clock))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
    let mut tls = match client {
        Some(id) => builder.with_client_auth_cert(vec![id.cert_der()?], id.key_der()?)?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    let mut t = transport(Some(AGENT_KEEP_ALIVE));
    Arc::get_mut(&mut t)
        .expect("just made")
        .datagram_receive_buffer_size(None);
    config.transport_config(t);
    Ok(config)
}

/// The daemon's TLS-over-TCP listener: its server identity, no client certificate (the
/// QUIC session inside authenticates the agent), ALPN [`crate::carrier::ALPN_DATAGRAMS`].
pub fn datagram_server_config(
    ca: &CertificateAuthority,
    server: &Identity,
) -> Result<rustls::ServerConfig, TlsError> {
    let mut tls =
        rustls::ServerConfig::builder_with_details(provider(), Arc::new(crate::clock::Clock))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(
                vec![server.cert_der()?, ca.cert_der().clone()],
                server.key_der()?,
            )?;
    tls.alpn_protocols = vec![crate::carrier::ALPN_DATAGRAMS.to_vec()];
    Ok(tls)
}

/// A client of an outer TLS link (an agent's TCP path, the daemon's relay link). It
/// presents `client` when given, with the chain the relay needs to find the CA.
///
/// The outer TLS does not pin the server: it is what gets QUIC's datagrams through
/// networks that pass only TCP (and look like HTTPS to them), not what makes the channel
/// trustworthy. Everything inside it is QUIC whose handshake pins the controller's CA, so
/// whoever terminates the outer TLS (the daemon, a relay, anyone in the path) sees the
/// same ciphertext the network would see over UDP, and can drop it but not read or forge it.
pub fn outer_client_config(
    alpn: &[u8],
    client: Option<(&Identity, &CertificateDer<'static>)>,
) -> Result<rustls::ClientConfig, TlsError> {
    let builder =
        rustls::ClientConfig::builder_with_details(provider(), Arc::new(crate::clock::Clock))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(OuterServerVerifier {
                algorithms: provider().signature_verification_algorithms,
            }));
    let mut tls = match client {
        Some((id, ca)) => {
            builder.with_client_auth_cert(vec![id.cert_der()?, ca.clone()], id.key_der()?)?
        }
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(tls)
}

/// A relay's TLS server: its own certificate; a client certificate is optional (agents
/// present none) but, when presented, must be the controller's registration certificate
/// from the CA whose SHA-256 is `ca_pin`. Both ALPNs are offered; the relay requires a
/// verified certificate for [`crate::relay::ALPN_REGISTER`].
pub fn relay_server_config(
    relay: &Identity,
    ca_pin: Fingerprint,
) -> Result<rustls::ServerConfig, TlsError> {
    let verifier = Arc::new(RegistrationVerifier {
        pin: ca_pin,
        algorithms: provider().signature_verification_algorithms,
    });
    let mut tls =
        rustls::ServerConfig::builder_with_details(provider(), Arc::new(crate::clock::Clock))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![relay.cert_der()?], relay.key_der()?)?;
    tls.alpn_protocols = vec![
        crate::carrier::ALPN_DATAGRAMS.to_vec(),
        crate::relay::ALPN_REGISTER.to_vec(),
    ];
    Ok(tls)
}

/// Accepts whatever certificate the outer link's server presents; see
/// [`outer_client_config`] for why that is sound. The handshake signature is still checked
/// against that certificate, so the session is with whoever holds its key.
#[derive(Debug)]
struct OuterServerVerifier {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for OuterServerVerifier {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The relay's check of a client certificate: the chain holds the pinned CA, the CA signed
/// the certificate for client use, and it names [`RELAY_CLIENT_NAME`].
#[derive(Debug)]
struct RegistrationVerifier {
    pin: Fingerprint,
    algorithms: WebPkiSupportedAlgorithms,
}

impl rustls::server::danger::ClientCertVerifier for RegistrationVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| Fingerprint::of_der(c) == self.pin)
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "the client certificate is not from the controller CA this relay serves ({})",
                    self.pin
                ))
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let verified = inner.verify_client_cert(end_entity, &[], now)?;
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        let name = ServerName::try_from(RELAY_CLIENT_NAME).expect("a valid DNS name");
        rustls::client::verify_server_name(&parsed, &name).map_err(|_| {
            rustls::Error::General(
                "the client certificate is not the controller's relay certificate".into(),
            )
        })?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The fingerprint of the client certificate a connection presented, if any.
pub fn peer_fingerprint(conn: &quinn::Connection) -> Option<Fingerprint> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    chain.first().map(|c| Fingerprint::of_der(c))
}

/// Trusts a server whose chain contains the pinned CA and whose certificate that CA signed.
#[derive(Debug)]
struct PinnedCaVerifier {
    pin: Fingerprint,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| Fingerprint::of_der(c) == self.pin)
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "the controller's CA does not match the pinned fingerprint {}",
                    self.pin
                ))
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_round_trips_through_pem() {
        let ca = CertificateAuthority::generate().expect("generate");
        let back = CertificateAuthority::from_pem(ca.cert_pem(), &ca.key_pem()).expect("load");
        assert_eq!(back.fingerprint(), ca.fingerprint());
    }

    #[test]
    fn der_to_pem_round_trips() {
        let ca = CertificateAuthority::generate().expect("generate");
        let pem = der_to_pem(ca.cert_der());
        assert_eq!(pem_certificate(&pem, "x").expect("parses"), *ca.cert_der());
    }

    #[test]
    fn csr_signing_ignores_the_requested_subject() {
        let ca = CertificateAuthority::generate().expect("generate");
        let (_key, csr) = agent_key_and_csr().expect("csr");
        let name: InstanceName = "gpu-1".parse().expect("valid");
        let cert = ca
            .sign_agent_csr(&csr, &name, Duration::from_secs(3600))
            .expect("signs");
        let text = String::from_utf8_lossy(&cert);
        assert!(text.contains("gpu-1"));
        assert!(
            ca.sign_agent_csr(b"not a csr", &name, Duration::from_secs(1))
                .is_err()
        );
    }
}
