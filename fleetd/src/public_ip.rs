//! The address fleetd publishes for this machine when `public_ip` is not set: fleet v1.0's
//! rule (the IPv4 address of the default route's interface, looked at again every minute),
//! with the address used to reach etcd as a fallback where fleet published nothing.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::info;

use crate::Control;

/// How often fleet v1.0 looked at the machine's address again (`machineStateRefreshInterval`).
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(60);

/// An address outside every network a machine is on (TEST-NET-1, RFC 5737), so that the
/// kernel routes it by the default route. Connecting a UDP socket sends nothing: it only
/// makes the kernel choose the route and the source address.
const BEYOND: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 9);

/// What fleet v1.0 accepted as the address of the default route's interface: IPv4 and
/// global unicast in Go's sense (private ranges included; not loopback, link-local,
/// multicast, broadcast or unspecified).
pub fn usable_v4(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_unspecified()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast())
        }
        IpAddr::V6(_) => false,
    }
}

/// The address to publish: the configured one, else the default route's IPv4 address (as
/// fleet), else the address this machine reaches etcd from (ours: fleet published nothing
/// there, and `fleetctl ssh` had no address to go to), else nothing.
pub fn choose(
    configured: &str,
    default_route: Option<IpAddr>,
    etcd_route: Option<IpAddr>,
) -> String {
    if !configured.is_empty() {
        return configured.to_string();
    }
    default_route
        .filter(|ip| usable_v4(*ip))
        .or(etcd_route.filter(|ip| !ip.is_loopback() && !ip.is_unspecified()))
        .map(|ip| ip.to_string())
        .unwrap_or_default()
}

/// The source address the kernel picks for `dest`, without sending anything.
fn source_for(dest: SocketAddr) -> Option<IpAddr> {
    let bind = if dest.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let sock = UdpSocket::bind(bind).ok()?;
    sock.connect(dest).ok()?;
    Some(sock.local_addr().ok()?.ip())
}

/// The address of the first etcd endpoint's route. A host name is resolved first (through
/// the system's resolver, which may ask DNS and blocks): call it off the async runtime.
fn etcd_route(etcd: &[String]) -> Option<IpAddr> {
    let first = etcd.first()?;
    let hostport = first.split("://").nth(1)?.trim_end_matches('/');
    let dest = std::net::ToSocketAddrs::to_socket_addrs(hostport)
        .ok()?
        .next()?;
    source_for(dest)
}

/// The address fleetd publishes when `public_ip` is not set. Blocking (see [`etcd_route`]).
pub fn detect(etcd: &[String]) -> String {
    choose("", source_for(BEYOND), etcd_route(etcd))
}

/// Runs `detect` on the blocking pool, so that a slow name lookup does not hold up the
/// async runtime (the API, the agent's lease); empty when it could not run.
pub async fn detect_off_runtime(etcd: Arc<Vec<String>>, detect: fn(&[String]) -> String) -> String {
    tokio::task::spawn_blocking(move || detect(&etcd))
        .await
        .unwrap_or_default()
}

/// Looks at the detected address every `interval` and asks for a restart of agent, engine
/// and API (units keep running) when it is no longer `published`, so the new one gets
/// published, as fleet's periodic refresh did. Only an address seen on two checks in a row
/// counts, and never an empty one (no route for a moment): a blip restarts nothing. Runs
/// until aborted.
pub async fn refresh(
    etcd: Vec<String>,
    published: String,
    interval: Duration,
    detect: fn(&[String]) -> String,
    control: mpsc::Sender<Control>,
) {
    let etcd = Arc::new(etcd);
    let mut seen: Option<String> = None;
    loop {
        tokio::time::sleep(interval).await;
        let now = detect_off_runtime(etcd.clone(), detect).await;
        if now.is_empty() || now == published {
            seen = None;
            continue;
        }
        if seen.as_deref() != Some(now.as_str()) {
            seen = Some(now);
            continue;
        }
        info!(old = %published, new = %now, "this machine's address changed");
        let _ = control.send(Control::Refresh).await;
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().expect("ip"))
    }

    #[test]
    fn fleets_rule_then_the_etcd_route() {
        for (configured, default_route, etcd, want) in [
            // any configured text wins, as in fleet
            (
                "node-1.example.com",
                ip("10.0.0.5"),
                ip("10.0.0.6"),
                "node-1.example.com",
            ),
            // fleet: IPv4 global unicast of the default route's interface (private is fine)
            ("", ip("10.0.0.5"), ip("172.17.0.2"), "10.0.0.5"),
            ("", ip("203.0.113.7"), None, "203.0.113.7"),
            // not what fleet took: then the etcd route (fleet published nothing)
            ("", ip("169.254.1.1"), ip("172.17.0.2"), "172.17.0.2"),
            ("", ip("2001:db8::1"), ip("172.17.0.2"), "172.17.0.2"),
            ("", None, ip("fd00::2"), "fd00::2"),
            // etcd on this machine (CoreOS's default) says nothing about the address
            ("", None, ip("127.0.0.1"), ""),
            ("", None, None, ""),
        ] {
            assert_eq!(
                choose(configured, default_route, etcd),
                want,
                "{configured:?} {default_route:?} {etcd:?}"
            );
        }
        for (addr, want) in [
            ("10.1.2.3", true),
            ("192.168.1.1", true),
            ("8.8.8.8", true),
            ("127.0.0.1", false),
            ("0.0.0.0", false),
            ("169.254.0.1", false),
            ("224.0.0.1", false),
            ("255.255.255.255", false),
            ("::1", false),
            ("2001:db8::1", false),
        ] {
            assert_eq!(usable_v4(addr.parse().expect("ip")), want, "{addr}");
        }
    }

    /// Before, the address was found once at start and never again; fleet looked every
    /// minute. A change now restarts agent and engine, which publish the new one.
    #[tokio::test(start_paused = true)]
    async fn a_changed_address_asks_for_a_refresh() {
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        fn changing(_: &[String]) -> String {
            let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if n < 2 { "10.0.0.5" } else { "10.0.0.9" }.to_string()
        }
        let (tx, mut rx) = mpsc::channel(4);
        let task = tokio::spawn(refresh(
            vec![],
            "10.0.0.5".into(),
            REFRESH_INTERVAL,
            changing,
            tx,
        ));
        let start = tokio::time::Instant::now();
        assert_eq!(rx.recv().await, Some(Control::Refresh));
        // seen changed at the third check, confirmed at the fourth
        assert_eq!(start.elapsed(), REFRESH_INTERVAL * 4);
        task.await.expect("refresher ends after asking");
    }

    /// A check that finds no address, or a new one only once, restarts nothing.
    #[tokio::test(start_paused = true)]
    async fn an_empty_or_passing_address_is_ignored() {
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        fn blips(_: &[String]) -> String {
            let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            match n % 4 {
                0 => "",
                1 => "10.0.0.9",
                2 => "10.0.0.5",
                _ => "",
            }
            .to_string()
        }
        let (tx, mut rx) = mpsc::channel(4);
        let task = tokio::spawn(refresh(
            vec![],
            "10.0.0.5".into(),
            REFRESH_INTERVAL,
            blips,
            tx,
        ));
        tokio::time::sleep(REFRESH_INTERVAL * 40).await;
        assert!(rx.try_recv().is_err(), "a blip asked for a restart");
        assert!(CALLS.load(std::sync::atomic::Ordering::SeqCst) >= 39);
        task.abort();
    }

    /// The detection (maybe a DNS lookup of an etcd host name) runs off the runtime: other
    /// tasks of a single-threaded runtime go on meanwhile.
    #[tokio::test(flavor = "current_thread")]
    async fn detection_does_not_block_the_runtime() {
        static TICKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        fn slow(_: &[String]) -> String {
            std::thread::sleep(Duration::from_millis(300));
            TICKED.load(std::sync::atomic::Ordering::SeqCst).to_string()
        }
        let ticker = tokio::spawn(async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            TICKED.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        assert_eq!(detect_off_runtime(Arc::new(vec![]), slow).await, "true");
        ticker.await.expect("ticker");
    }
}
