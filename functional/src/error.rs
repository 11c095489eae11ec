//! Errors of the cluster harness: each names the command, node or condition that failed.

use std::path::PathBuf;
use std::time::Duration;

/// What can go wrong while driving a test cluster.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The harness mounts, creates network namespaces and boots containers.
    #[error(
        "functional tests need root (they mount file systems, create network namespaces and boot \
         systemd containers): run ./test as root"
    )]
    NotRoot,

    /// fleetd or fleetctl was not built where the harness looked.
    #[error(
        "no {name} in {dir}: build it first (cargo build -p fleetd -p fleetctl, which ./test does) \
         or point FLEET_BIN_DIR at a directory holding fleetd and fleetctl"
    )]
    MissingBinary { name: &'static str, dir: PathBuf },

    /// The cluster description cannot be booted.
    #[error("invalid cluster spec for {cluster:?}: {reason}")]
    Spec { cluster: String, reason: String },

    /// A node number outside the cluster.
    #[error("cluster {cluster} has nodes 1..={nodes}, not node {node}")]
    NoSuchNode {
        cluster: String,
        node: usize,
        nodes: usize,
    },

    /// Another process holds the cluster of this name.
    #[error(
        "cluster {cluster} stayed in use by another process for {waited:?} (lock {lock}): \
         another test run? use another cluster name, or wait for it"
    )]
    Busy {
        cluster: String,
        lock: PathBuf,
        waited: Duration,
    },

    /// A command could not be started at all.
    #[error("could not run {what}: {source}")]
    Spawn {
        what: String,
        source: std::io::Error,
    },

    /// A harness command ran but failed.
    #[error("{what} failed ({status})\nstdout:\n{stdout}\nstderr:\n{stderr}")]
    Failed {
        what: String,
        status: String,
        stdout: String,
        stderr: String,
    },

    /// A command did not finish in time and was killed.
    #[error("{what} did not finish within {timeout:?} and was killed")]
    CommandTimeout { what: String, timeout: Duration },

    /// A bounded poll gave up.
    #[error("gave up after {waited:?} waiting for {what}; last attempt: {last}")]
    Timeout {
        what: String,
        waited: Duration,
        last: String,
    },

    /// The harness printed something this crate cannot read.
    #[error("unexpected harness output from {what}: {detail}")]
    Harness { what: String, detail: String },
}
