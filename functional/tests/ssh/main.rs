//! Remote operations over SSH on a real cluster (issue 6), with fleetctl run on the host as a
//! user would: `ssh` to a machine by ID prefix or by unit, `status` and `journal` (also
//! `journal -f` stopped by a signal), `--tunnel` to a node's API socket, trust on first use
//! and changed host keys in a known-hosts file, and rolling `restart` of normal and global
//! units checked against every node's journal. fleetctl logs in as root with the harness key
//! (or through an ssh-agent started here) and keeps its own known-hosts file.
//!
//! One test binary; `support.rs` holds what the tests share, the other modules the tests.

mod known_hosts;
mod restart;
mod status;
mod support;
mod tunnel;
