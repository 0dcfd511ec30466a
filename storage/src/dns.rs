//! Name resolution without glibc's NSS, for the static agent. A static glibc binary that
//! calls getaddrinfo may dlopen the host's NSS modules (whatever /etc/nsswitch.conf lists
//! beyond `files` and `dns`), and a dlopen from a static binary crashes when the host's
//! glibc differs from the build's. hickory reads /etc/resolv.conf and /etc/hosts itself.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use aws_smithy_runtime_api::client::dns::{DnsFuture, ResolveDns, ResolveDnsError};
use hickory_resolver::TokioResolver;

/// How a connection resolves host names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dns {
    /// The operating system's resolver (getaddrinfo): what a dynamically linked program,
    /// like the controller on a laptop, should use.
    #[default]
    System,
    /// hickory, from /etc/resolv.conf and /etc/hosts: what the static agent uses.
    Hickory,
}

/// A hickory resolver, cheap to clone.
#[derive(Debug, Clone)]
pub struct Resolver(Arc<TokioResolver>);

impl Resolver {
    /// From the system's resolv.conf (and hosts file).
    pub fn from_system() -> std::io::Result<Self> {
        let builder = TokioResolver::builder_tokio().map_err(std::io::Error::other)?;
        Ok(Resolver(Arc::new(builder.build())))
    }

    /// The addresses of `host` (an IP literal is its own answer).
    pub async fn lookup(&self, host: &str) -> std::io::Result<Vec<IpAddr>> {
        if let Ok(ip) = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            return Ok(vec![ip]);
        }
        let found = self
            .0
            .lookup_ip(host)
            .await
            .map_err(std::io::Error::other)?;
        Ok(found.iter().collect())
    }

    /// Resolves `host:port` to its first address.
    pub async fn socket_addr(&self, endpoint: &str) -> std::io::Result<SocketAddr> {
        if let Ok(addr) = endpoint.parse::<SocketAddr>() {
            return Ok(addr);
        }
        let (host, port) = endpoint
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
            .ok_or_else(|| std::io::Error::other(format!("{endpoint:?} is not host:port")))?;
        let ip = self
            .lookup(host)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| std::io::Error::other(format!("{host} has no address")))?;
        Ok(SocketAddr::new(ip, port))
    }
}

impl ResolveDns for Resolver {
    fn resolve_dns<'a>(&'a self, name: &'a str) -> DnsFuture<'a> {
        DnsFuture::new(async move { self.lookup(name).await.map_err(ResolveDnsError::new) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn literals_and_hosts_file_need_no_server() {
        let resolver = Resolver::from_system().expect("resolver");
        assert_eq!(
            resolver
                .socket_addr("127.0.0.1:7443")
                .await
                .expect("literal"),
            "127.0.0.1:7443".parse::<SocketAddr>().expect("addr")
        );
        assert_eq!(
            resolver.lookup("[::1]").await.expect("v6 literal"),
            vec!["::1".parse::<IpAddr>().expect("ip")]
        );
        // /etc/hosts names localhost on every Linux this runs on.
        let local = resolver
            .socket_addr("localhost:80")
            .await
            .expect("hosts file");
        assert!(local.ip().is_loopback(), "{local}");
        assert!(resolver.socket_addr("no-port").await.is_err());
    }
}
