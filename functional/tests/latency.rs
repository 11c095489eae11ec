//! A measurement, not an assertion: how long from `fleetctl start --no-block` to the unit
//! being active in a node's systemd, on a 3-node cluster.

use std::io::Write;
use std::time::Duration;

use functional::FleetCluster;
use functional::fleet::{NODE_UNITS_DIR, boot, must, now_us, quick_spec};

const WAIT: Duration = Duration::from_secs(30);
const SAMPLES: usize = 10;

/// Starts one unit at a time and takes, for each, systemd's own record of when the unit
/// became active (`ActiveEnterTimestampMonotonic`, the clock the host shares with its
/// nodes) minus the moment just before fleetctl ran. Prints the median.
#[test]
fn measure_start_latency() {
    let c = boot(quick_spec("latency", 3));
    must(c.wait_for_machines(1, 3, WAIT));
    must(c.put_fixture(1, "probe@.service"));
    let mut samples = Vec::with_capacity(SAMPLES);
    for i in 1..=SAMPLES {
        let unit = format!("probe@{i}.service");
        let path = format!("{NODE_UNITS_DIR}/{unit}");
        let t0 = now_us();
        must(c.fleetctl_ok(1, &["start", "--no-block", &path]));
        let active = must(c.wait_for_active(1, i, WAIT));
        let machine = match active.get(&unit).map(Vec::as_slice) {
            Some([row]) => row.machine.clone(),
            other => panic!("{unit}: {other:?}"),
        };
        let node = c
            .node_of(&machine)
            .unwrap_or_else(|| panic!("{unit} on unknown machine {machine}"));
        let u = must(c.systemd_unit(node, &unit));
        assert!(
            u.active_enter_us > t0,
            "{unit} active before it was started: {u}"
        );
        samples.push(Duration::from_micros(u.active_enter_us - t0));
    }
    samples.sort();
    let median = (samples[SAMPLES / 2 - 1] + samples[SAMPLES / 2]) / 2;
    let all: Vec<String> = samples
        .iter()
        .map(|d| format!("{:.2}", d.as_secs_f64()))
        .collect();
    // Written to stdout directly, not through println!, which libtest captures: the figure
    // belongs in the output of a passing run (nextest shows it through .config/nextest.toml).
    let report = format!(
        "start-to-active samples (s): {}\nstart-to-active median: {:.2}s\n",
        all.join(" "),
        median.as_secs_f64()
    );
    let mut stdout = std::io::stdout().lock();
    assert!(
        stdout
            .write_all(report.as_bytes())
            .and_then(|()| stdout.flush())
            .is_ok(),
        "cannot print the measurement"
    );
}
