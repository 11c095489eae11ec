//! Multi-node functional tests: real systemd nodes, real etcd, the real binaries.
//!
//! [`Cluster::up`] boots a cluster with the shell harness in `functional/harness/`: one etcd
//! on a host bridge and N `systemd-nspawn --boot` nodes, each with systemd as PID 1, its own
//! machine-id, address, sshd and fleetd (`fleet.socket` + `fleet.service` from
//! `fleetd/units/`, the binaries bound read-only at `/opt/fleet/bin`). Tests then drive it:
//!
//! ```no_run
//! use functional::{Cluster, ClusterSpec};
//! use std::time::Duration;
//!
//! let cluster = Cluster::up(ClusterSpec::new("hello", 3).metadata(2, "region=east"))?;
//! let out = cluster.fleetctl(1, &["list-machines"])?;
//! assert!(out.success(), "{out}");
//! functional::wait_for("fleet.service active", Duration::from_secs(10), || {
//!     cluster.exec(3, &["systemctl", "is-active", "fleet.service"])?.ok("is-active")
//! })?;
//! cluster.down()?; // also done on drop, so a failing test tears down too
//! # Ok::<(), functional::Error>(())
//! ```
//!
//! Nodes are numbered from 1 (hostnames `node1`, `node2`, ...). The tests need root; they
//! use the debug binaries next to the test executable (`target/debug/fleetd`, `fleetctl`)
//! unless `FLEET_BIN_DIR` names another directory. See `Documentation/functional-harness.md`.

mod cluster;
mod command;
mod error;
pub mod fleet;
mod lock;
mod wait;

pub use cluster::{
    Cluster, ClusterSpec, EtcdPeer, default_bin_dir, harness_dir, is_root, leftovers,
};
pub use command::Output;
pub use error::Error;
pub use fleet::FleetCluster;
pub use wait::wait_for;
