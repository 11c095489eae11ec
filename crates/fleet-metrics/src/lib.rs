//! fleetd's Prometheus metrics, served at `GET /metrics`, recorded where things happen.
//!
//! The engine and registry metrics keep fleet's names (`fleet_engine_leader_start_time`,
//! `fleet_engine_task_count_total`, `fleet_registry_operation_count_total`, ...) so existing
//! dashboards keep working; the API request metrics are ours. A process has one set,
//! [`global`], which fleetd serves and hands to its engine, agent and API server, and which
//! the etcd registry records its requests in (as fleet's registry did in Prometheus' default
//! registry); tests make their own with [`Metrics::new`].

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Content type of [`Metrics::encode`]'s output (OpenMetrics text, which Prometheus reads).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Why a reconcile round of the engine failed (fleet's `type` label values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineFailure {
    MachineAway,
    Run,
    Schedule,
}

impl EngineFailure {
    fn label(self) -> &'static str {
        match self {
            EngineFailure::MachineAway => "machine_away",
            EngineFailure::Run => "run",
            EngineFailure::Schedule => "schedule",
        }
    }
}

/// Kind of registry operation (fleet's `type` / `ops` label values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistryOp {
    Get,
    Set,
    GetAll,
}

impl RegistryOp {
    fn label(self) -> &'static str {
        match self {
            RegistryOp::Get => "get",
            RegistryOp::Set => "set",
            RegistryOp::GetAll => "get_all",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabel {
    r#type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpsLabel {
    ops: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabel {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    code: String,
}

struct Inner {
    registry: Registry,
    leader_start_time: Gauge<f64, std::sync::atomic::AtomicU64>,
    engine_tasks: Family<TypeLabel, Counter>,
    engine_task_failures: Family<TypeLabel, Counter>,
    reconciles: Counter,
    reconcile_duration: Histogram,
    reconcile_failures: Family<TypeLabel, Counter>,
    registry_ops: Family<TypeLabel, Counter>,
    registry_op_duration: Family<OpsLabel, Histogram>,
    registry_op_failures: Family<TypeLabel, Counter>,
    agent_tasks: Family<TypeLabel, Counter>,
    agent_task_failures: Family<TypeLabel, Counter>,
    systemd_calls: Family<CallLabel, Counter>,
    api_requests: Family<RequestLabels, Counter>,
    api_request_duration: Histogram,
}

/// The metrics of this process: what fleetd serves at `/metrics`.
pub fn global() -> &'static Metrics {
    static GLOBAL: OnceLock<Metrics> = OnceLock::new();
    GLOBAL.get_or_init(Metrics::new)
}

/// All metrics of one fleetd. Cheap to clone: clones share the counters.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn duration_buckets() -> impl Iterator<Item = f64> {
    // 1 ms .. ~16 s, like the Go client's default range
    exponential_buckets(0.001, 2.0, 15)
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("fleet");
        let leader_start_time = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        let engine_tasks = Family::<TypeLabel, Counter>::default();
        let engine_task_failures = Family::<TypeLabel, Counter>::default();
        let reconciles = Counter::default();
        let reconcile_duration = Histogram::new(duration_buckets());
        let reconcile_failures = Family::<TypeLabel, Counter>::default();
        let registry_ops = Family::<TypeLabel, Counter>::default();
        let registry_op_duration = Family::<OpsLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(duration_buckets())
        });
        let registry_op_failures = Family::<TypeLabel, Counter>::default();
        let agent_tasks = Family::<TypeLabel, Counter>::default();
        let agent_task_failures = Family::<TypeLabel, Counter>::default();
        let systemd_calls = Family::<CallLabel, Counter>::default();
        let api_requests = Family::<RequestLabels, Counter>::default();
        let api_request_duration = Histogram::new(duration_buckets());

        // Counters get their `_total` suffix from the encoder.
        let engine = registry.sub_registry_with_prefix("engine");
        engine.register(
            "leader_start_time",
            "Time this fleetd last became the engine leader, in seconds since the epoch",
            leader_start_time.clone(),
        );
        engine.register(
            "task_count",
            "Engine scheduling tasks, by type",
            engine_tasks.clone(),
        );
        engine.register(
            "task_failure_count",
            "Engine scheduling tasks that failed, by type",
            engine_task_failures.clone(),
        );
        engine.register(
            "reconcile_count",
            "Reconcile rounds of the engine",
            reconciles.clone(),
        );
        engine.register(
            "reconcile_duration_second",
            "Time one reconcile round of the engine took, in seconds",
            reconcile_duration.clone(),
        );
        engine.register(
            "reconcile_failure_count",
            "Reconcile rounds of the engine that failed, by reason",
            reconcile_failures.clone(),
        );
        let reg = registry.sub_registry_with_prefix("registry");
        reg.register(
            "operation_count",
            "Registry operations, by type",
            registry_ops.clone(),
        );
        reg.register(
            "operation_duration_second",
            "Time one registry operation took, in seconds",
            registry_op_duration.clone(),
        );
        reg.register(
            "operation_failed_count",
            "Registry operations that failed, by type",
            registry_op_failures.clone(),
        );
        let agent = registry.sub_registry_with_prefix("agent");
        agent.register(
            "task_count",
            "Agent tasks (systemd jobs and file changes), by type",
            agent_tasks.clone(),
        );
        agent.register(
            "task_failure_count",
            "Agent tasks that failed, by type",
            agent_task_failures.clone(),
        );
        registry.sub_registry_with_prefix("systemd").register(
            "call_count",
            "D-Bus method calls to systemd, by method",
            systemd_calls.clone(),
        );
        let api = registry.sub_registry_with_prefix("api");
        api.register(
            "requests",
            "API requests served, by method and status code",
            api_requests.clone(),
        );
        api.register(
            "request_duration_seconds",
            "Time the API took to answer one request, in seconds",
            api_request_duration.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                registry,
                leader_start_time,
                engine_tasks,
                engine_task_failures,
                reconciles,
                reconcile_duration,
                reconcile_failures,
                registry_ops,
                registry_op_duration,
                registry_op_failures,
                agent_tasks,
                agent_task_failures,
                systemd_calls,
                api_requests,
                api_request_duration,
            }),
        }
    }

    /// This fleetd became the engine leader now.
    pub fn engine_leader(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.inner.leader_start_time.set(now.as_secs() as f64);
    }

    /// The engine ran a task (`type` is lowercased, as fleet did).
    pub fn engine_task(&self, task: &str) {
        self.inner
            .engine_tasks
            .get_or_create(&type_label(task))
            .inc();
    }

    pub fn engine_task_failure(&self, task: &str) {
        self.inner
            .engine_task_failures
            .get_or_create(&type_label(task))
            .inc();
    }

    /// A reconcile round succeeded after `took`.
    pub fn engine_reconcile_success(&self, took: Duration) {
        self.inner.reconciles.inc();
        self.inner.reconcile_duration.observe(took.as_secs_f64());
    }

    pub fn engine_reconcile_failure(&self, reason: EngineFailure) {
        self.inner
            .reconcile_failures
            .get_or_create(&type_label(reason.label()))
            .inc();
    }

    /// A registry operation succeeded after `took`.
    pub fn registry_op_success(&self, op: RegistryOp, took: Duration) {
        self.inner
            .registry_ops
            .get_or_create(&type_label(op.label()))
            .inc();
        self.inner
            .registry_op_duration
            .get_or_create(&OpsLabel {
                ops: op.label().to_string(),
            })
            .observe(took.as_secs_f64());
    }

    pub fn registry_op_failure(&self, op: RegistryOp) {
        self.inner
            .registry_op_failures
            .get_or_create(&type_label(op.label()))
            .inc();
    }

    /// A registry request ended after `took`: a success (counted and timed) or a failure.
    pub fn registry_op(&self, op: RegistryOp, took: Duration, ok: bool) {
        if ok {
            self.registry_op_success(op, took);
        } else {
            self.registry_op_failure(op);
        }
    }

    /// The agent ran a task, e.g. `start`, `stop`, `load`, `unload`.
    pub fn agent_task(&self, task: &str) {
        self.inner
            .agent_tasks
            .get_or_create(&type_label(task))
            .inc();
    }

    pub fn agent_task_failure(&self, task: &str) {
        self.inner
            .agent_task_failures
            .get_or_create(&type_label(task))
            .inc();
    }

    /// A D-Bus method call to systemd (`StartUnit`, `Reload`, `ListUnitsByNames`, ...).
    pub fn systemd_call(&self, method: &str) {
        self.inner
            .systemd_calls
            .get_or_create(&CallLabel {
                method: method.to_string(),
            })
            .inc();
    }

    /// The API answered one request.
    pub fn api_request(&self, method: MethodLabel, code: u16, took: Duration) {
        let labels = RequestLabels {
            method: method.as_str().to_string(),
            code: code.to_string(),
        };
        self.inner.api_requests.get_or_create(&labels).inc();
        self.inner.api_request_duration.observe(took.as_secs_f64());
    }

    /// All metrics in the text format (see [`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry);
        out
    }
}

/// The `method` label of an API request: the standard methods by name, every other token
/// `other`, so the label set stays fixed whatever method tokens clients send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodLabel(&'static str);

impl MethodLabel {
    /// The label of `method`.
    pub fn of(method: &http::Method) -> MethodLabel {
        const KNOWN: [&str; 9] = [
            "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT",
        ];
        MethodLabel(
            KNOWN
                .iter()
                .find(|m| **m == method.as_str())
                .copied()
                .unwrap_or("other"),
        )
    }

    /// The label's text.
    pub fn as_str(self) -> &'static str {
        self.0
    }
}

fn type_label(task: &str) -> TypeLabel {
    TypeLabel {
        r#type: task.to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_fleets() {
        let m = Metrics::new();
        m.engine_leader();
        m.engine_task("UnscheduleUnit");
        m.engine_task_failure("ScheduleUnit");
        m.engine_reconcile_success(Duration::from_millis(3));
        m.engine_reconcile_failure(EngineFailure::MachineAway);
        m.registry_op_success(RegistryOp::GetAll, Duration::from_millis(1));
        m.registry_op_failure(RegistryOp::Set);
        m.agent_task("start");
        m.systemd_call("StartUnit");
        m.api_request(
            MethodLabel::of(&http::Method::GET),
            200,
            Duration::from_millis(1),
        );
        let text = m.encode();
        for line in [
            "fleet_engine_leader_start_time ",
            "fleet_engine_task_count_total{type=\"unscheduleunit\"} 1",
            "fleet_engine_task_failure_count_total{type=\"scheduleunit\"} 1",
            "fleet_engine_reconcile_count_total 1",
            "fleet_engine_reconcile_duration_second_count 1",
            "fleet_engine_reconcile_failure_count_total{type=\"machine_away\"} 1",
            "fleet_registry_operation_count_total{type=\"get_all\"} 1",
            "fleet_registry_operation_duration_second_count{ops=\"get_all\"} 1",
            "fleet_registry_operation_failed_count_total{type=\"set\"} 1",
            "fleet_agent_task_count_total{type=\"start\"} 1",
            "fleet_systemd_call_count_total{method=\"StartUnit\"} 1",
            "fleet_api_requests_total{method=\"GET\",code=\"200\"} 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn unknown_methods_share_one_label() {
        let m = Metrics::new();
        for method in ["GET", "BREW", "get", "PROPFIND", "X-1234"] {
            let method = http::Method::from_bytes(method.as_bytes()).expect("method token");
            m.api_request(MethodLabel::of(&method), 405, Duration::ZERO);
        }
        let text = m.encode();
        let mut series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("fleet_api_requests_total{"))
            .collect();
        series.sort();
        assert_eq!(
            series,
            [
                "fleet_api_requests_total{method=\"GET\",code=\"405\"} 1",
                "fleet_api_requests_total{method=\"other\",code=\"405\"} 4",
            ],
            "{text}"
        );
    }

    #[test]
    fn clones_share_counters() {
        let a = Metrics::new();
        let b = a.clone();
        b.engine_reconcile_success(Duration::ZERO);
        assert!(a.encode().contains("fleet_engine_reconcile_count_total 1"));
    }
}
