//! The simulator as a correctness test (run by ./test): 50 machines x 2,000 units on a
//! private etcd, with 10 % of the machines killed and the engine leader killed; asserts
//! invariants only (every unit active exactly once, none on two machines, Conflicts and
//! MachineMetadata held, nothing lost, the failover moved nothing), never times.

use std::time::Duration;

use fleet_sim::cluster::ClusterOptions;
use fleet_sim::{Options, run};
use fleet_systemd::fake::Knobs;

#[test]
fn fifty_machines_two_thousand_units_survive_kills_and_a_failover() {
    let etcd = fleet_testutil::EtcdServer::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let opts = Options {
        units: 2000,
        cluster: ClusterOptions {
            machines: 50,
            machines_per_channel: 25,
            api_hosts: 2,
            engine_candidates: None,
            // short leases so that the kills and the failover take seconds, not minutes
            config: fleet_config::Config {
                agent_ttl: Duration::from_secs(4),
                engine_reconcile_interval: Duration::from_secs(1),
                etcd_request_timeout: Duration::from_secs(3),
                ..fleet_config::Config::default()
            },
            knobs: Knobs {
                start_latency: Duration::from_millis(5),
                stop_latency: Duration::from_millis(5),
                keep_call_log: false,
                ..Knobs::default()
            },
        },
        quiet: Duration::ZERO,
        fleetctl: None,
        settle_timeout: Duration::from_secs(240),
        etcd_pid: None,
    };
    runtime.block_on(async {
        let report = run(&opts, etcd.endpoint())
            .await
            .expect("the simulation ran");
        eprintln!("{}", report.figures.line());
        assert!(
            report.violations.is_empty(),
            "{} invariants broken: {:#?}",
            report.violations.len(),
            &report.violations[..report.violations.len().min(20)]
        );
        assert_eq!(
            report.sim.cluster.live().count(),
            50 - 5 - 1,
            "kills missing"
        );
        assert!(
            report.unverified.is_none(),
            "what the API shows was not verified: {:?}",
            report.unverified
        );
        assert!(report.figures.kill_10pct_reschedule_s.is_some());
        assert_eq!(
            report.figures.leader_failover_moved,
            Some(0),
            "the failover moved units that were fine"
        );
        assert_eq!(report.sim.cluster.failed_count(), 0);
        report.sim.cluster.shutdown().await;
    });
}
