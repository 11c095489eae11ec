//! The simulation's etcd: one started here on free loopback ports (killed by its PID when
//! dropped), or one given by URL; and what is read from it besides fleet's own requests:
//! its request counters (`/metrics`) and the engine leader key.

use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use fleet_testutil::EtcdServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An etcd process of our own: fleet-testutil's, killed by its PID when dropped.
pub struct OwnEtcd(EtcdServer);

impl OwnEtcd {
    /// Starts etcd with its data in a temporary directory and waits (up to 20 s) until it
    /// accepts connections.
    pub fn start() -> Result<OwnEtcd> {
        EtcdServer::launch(&[])
            .map(OwnEtcd)
            .map_err(|e| anyhow!("{e}; or pass --etcd URL"))
    }

    pub fn endpoint(&self) -> &str {
        self.0.endpoint()
    }

    pub fn pid(&self) -> u32 {
        self.0.pid()
    }
}

/// Resident memory of process `pid` in MiB (`self` for this one), from /proc.
pub fn rss_mib(pid: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// etcd's count of gRPC requests started (every method, unary and streams), summed from
/// its `/metrics`.
pub async fn requests_started(endpoint: &str) -> Result<f64> {
    let text = get_metrics(endpoint).await?;
    Ok(sum_metric(&text, "grpc_server_started_total"))
}

/// etcd's own counters of its key-value store so far: (puts, transactions, ranges), from its
/// `/metrics` (`etcd_mvcc_*_total`). Not requests: a put inside a transaction counts as a
/// put, a transaction only when it does more than one thing, and a transaction's compares
/// count as ranges.
pub async fn kv_operations(endpoint: &str) -> Result<(f64, f64, f64)> {
    let text = get_metrics(endpoint).await?;
    Ok((
        sum_metric(&text, "etcd_mvcc_put_total"),
        sum_metric(&text, "etcd_mvcc_txn_total"),
        sum_metric(&text, "etcd_mvcc_range_total"),
    ))
}

/// The sum of every sample of `name` (all label sets) in Prometheus text.
pub fn sum_metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn get_metrics(endpoint: &str) -> Result<String> {
    let hostport = endpoint
        .strip_prefix("http://")
        .with_context(|| format!("{endpoint}: only http:// endpoints are scraped"))?
        .trim_end_matches('/');
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(hostport).await?;
        let req = format!("GET /metrics HTTP/1.0\r\nHost: {hostport}\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    };
    let out = tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .with_context(|| format!("{endpoint}/metrics timed out"))?
        .with_context(|| format!("reading {endpoint}/metrics"))?;
    let text = String::from_utf8_lossy(&out);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .with_context(|| format!("{endpoint}/metrics: no HTTP answer"))?;
    Ok(body.to_string())
}

/// Moves etcd to a new revision by a write outside fleet's keys: the key
/// `/fleet-sim/revision` is written and deleted (two revisions).
pub async fn new_revision(client: &mut etcd_client::Client) -> Result<()> {
    const KEY: &str = "/fleet-sim/revision";
    tokio::time::timeout(Duration::from_secs(5), async {
        client.put(KEY, "", None).await?;
        client.delete(KEY, None).await
    })
    .await
    .context("writing to etcd timed out")?
    .context("writing to etcd")?;
    Ok(())
}

/// The machine ID in the engine leader key, if there is a leader.
pub async fn leader(client: &mut etcd_client::Client, key_prefix: &str) -> Result<Option<String>> {
    let key = fleet_registry::keys::Keys::new(key_prefix).leader();
    let resp = tokio::time::timeout(Duration::from_secs(5), client.get(key.as_str(), None))
        .await
        .context("reading the leader key timed out")?
        .context("reading the leader key")?;
    Ok(resp
        .kvs()
        .first()
        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
}

/// How many of `ids` still have a machine record in etcd.
pub async fn machines_present(
    client: &mut etcd_client::Client,
    key_prefix: &str,
    ids: &[String],
) -> Result<usize> {
    let keys = fleet_registry::keys::Keys::new(key_prefix);
    let prefix = keys.machine("");
    let opts = etcd_client::GetOptions::new()
        .with_prefix()
        .with_keys_only();
    let resp = tokio::time::timeout(
        Duration::from_secs(5),
        client.get(prefix.as_str(), Some(opts)),
    )
    .await
    .context("listing the machine records timed out")?
    .context("listing the machine records")?;
    let present: std::collections::BTreeSet<&[u8]> = resp.kvs().iter().map(|kv| kv.key()).collect();
    Ok(ids
        .iter()
        .filter(|id| present.contains(keys.machine(id).as_bytes()))
        .count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_every_label_set_of_one_metric_only() {
        let text = "# HELP grpc_server_started_total x\n\
                    grpc_server_started_total{grpc_method=\"Range\"} 10\n\
                    grpc_server_started_total{grpc_method=\"Put\"} 2.5\n\
                    grpc_server_started_total_other 100\n\
                    grpc_server_handled_total{grpc_code=\"OK\"} 7\n";
        assert_eq!(sum_metric(text, "grpc_server_started_total"), 12.5);
        assert_eq!(sum_metric(text, "missing"), 0.0);
    }
}
