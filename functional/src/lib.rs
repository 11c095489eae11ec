//! Multi-node functional tests: real systemd nodes, real etcd, the real binaries.
