//! The simulator submits its units as fleetctl does: one create-only PUT per unit, in its
//! desired state, and no other request.

use std::time::Duration;

use fleet_sim::Sim;
use fleet_sim::cluster::ClusterOptions;
use fleet_sim::etcd::sum_metric;
use fleet_systemd::fake::Knobs;

#[test]
fn each_unit_is_submitted_with_one_put() {
    let etcd = fleet_testutil::EtcdServer::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let opts = fleet_sim::Options {
        units: 40,
        cluster: ClusterOptions {
            machines: 3,
            machines_per_channel: 3,
            api_hosts: 1,
            engine_candidates: None,
            config: fleet_config::Config::default(),
            knobs: Knobs {
                keep_call_log: false,
                ..Knobs::default()
            },
        },
        quiet: Duration::ZERO,
        fleetctl: None,
        settle_timeout: Duration::from_secs(60),
        etcd_pid: None,
    };
    runtime.block_on(async {
        let sim = Sim::start(&opts, etcd.endpoint()).await.expect("started");
        sim.wait_registered(Duration::from_secs(30))
            .await
            .expect("registered");
        let requests = |method: &str| {
            let text = sim.cluster.metrics.encode();
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| l.contains(&format!("method=\"{method}\"")))
                .collect();
            sum_metric(&lines.join("\n"), "fleet_api_requests_total")
        };
        let (gets, puts) = (requests("GET"), requests("PUT"));
        sim.submit().await.expect("submitted");
        let submitted = sim.workload.units.len() + sim.workload.templates.len();
        assert_eq!(requests("PUT") - puts, submitted as f64, "PUT requests");
        assert_eq!(requests("GET") - gets, 0.0, "GET requests");
        sim.cluster.shutdown().await;
    });
}
