//! fleetd's Prometheus metrics, served at `GET /metrics`: they live in `fleet-metrics`, where
//! every crate records them as things happen; re-exported here for the API's users.

pub use fleet_metrics::{CONTENT_TYPE, EngineFailure, MethodLabel, Metrics, RegistryOp};
