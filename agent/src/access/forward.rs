//! One forwarded TCP connection: checked against the policy (the instance's loopback, or
//! a host the config lists), connected, then spliced to the stream (`protocol::splice`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Instant;

use protocol::framed::write_frame;
use protocol::streams::{ForwardOpen, ForwardReady};
use protocol::{ErrorKind, WireError};

use super::{Access, AuditLine, policy};

pub async fn serve(
    access: &Access,
    open: ForwardOpen,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
) -> anyhow::Result<()> {
    let began = Instant::now();
    let at_ms = crate::eventlog::now_ms();
    let target = format!("{}:{}", open.host, open.port);
    let line = |end: String| AuditLine {
        at_ms,
        who: open.who.clone(),
        what: "forward",
        place: "instance".to_owned(),
        detail: target.clone(),
        end,
        ms: began.elapsed().as_millis() as u64,
    };
    if let Err(e) = policy::forward(&access.policy, &open.host) {
        access.audit(line(format!("refused: {}", e.message)));
        return super::answer_and_end(&mut send, &ForwardReady { result: Err(e) }).await;
    }
    if open.check_only {
        return super::answer_and_end(&mut send, &ForwardReady { result: Ok(()) }).await;
    }
    let tcp = match connect(&open.host, open.port).await {
        Ok(tcp) => tcp,
        Err(message) => {
            access.audit(line(format!("failed: {message}")));
            let e = WireError::new(ErrorKind::NotFound, message);
            return super::answer_and_end(&mut send, &ForwardReady { result: Err(e) }).await;
        }
    };
    let _ = tcp.set_nodelay(true);
    write_frame(&mut send, &ForwardReady { result: Ok(()) }).await?;
    let spliced = protocol::splice::splice(tcp, send, recv).await;
    access.audit(line(format!(
        "bytes {} in, {} out{}",
        spliced.received,
        spliced.sent,
        if spliced.reset { ", reset" } else { "" }
    )));
    Ok(())
}

/// Connects to `host:port` as the instance sees it: `localhost` is the loopback (no
/// lookup), an address is itself, a name is resolved without NSS (`storage::dns`).
async fn connect(host: &str, port: u16) -> Result<tokio::net::TcpStream, String> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<IpAddr> = if bare.eq_ignore_ascii_case("localhost") {
        vec![
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        ]
    } else if let Ok(ip) = bare.parse::<IpAddr>() {
        vec![ip]
    } else {
        storage::dns::Resolver::from_system()
            .map_err(|e| format!("reading the DNS configuration: {e}"))?
            .lookup(bare)
            .await
            .map_err(|e| format!("resolving {host} on the instance: {e}"))?
    };
    let mut last = None;
    for ip in addrs {
        match tokio::net::TcpStream::connect(SocketAddr::new(ip, port)).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = Some(e),
        }
    }
    let why = last.map_or("no address".to_owned(), |e| e.to_string());
    Err(format!(
        "nothing accepts connections at {host}:{port} on the instance ({why}); is the server running there?"
    ))
}
