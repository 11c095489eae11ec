//! Whole-CLI tests: the real fleetctl binary against a real etcd started by each test
//! (`--driver=etcd`). Machines, placements and unit states are simulated by writing them
//! through `EtcdRegistry` the way fleetd's agent and engine do; no fleetd runs here.
//! Tables and messages are compared byte for byte.
//!
//! One test binary; `support.rs` holds the cluster and the runners, the other modules the tests
//! by area.

mod bursts;
mod flags;
mod remote;
mod scheduling;
mod support;
mod units;
