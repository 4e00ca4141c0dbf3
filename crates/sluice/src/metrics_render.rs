//! `/metrics`: sums the workers' counters into the `metrics` recorder and renders Prometheus
//! text with `metrics-exporter-prometheus`.

use std::sync::Arc;

use metrics::{Counter, Gauge, Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use sluice_balance::SnapshotCell;
use sluice_dataplane::{CloseKind, DataPlane, UdpCounters, UdpDrop};
use sluice_health::State;

use crate::health::{BackendView, HealthView};

/// Every state a backend can report, for the `sluice_backend_state` state set.
const STATES: [State; 5] = [
    State::Up,
    State::Unknown,
    State::Down,
    State::Ejected,
    State::Flapping,
];

/// What the admin endpoint renders: the data plane's counters, labelled.
pub(crate) struct MetricsView {
    plane: Arc<DataPlane>,
    snapshots: Arc<SnapshotCell>,
    health: HealthView,
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    listeners: Vec<String>,
    /// Per listener: whether it is a udp listener (its session metrics are rendered).
    udp: Vec<bool>,
    /// Admin connections closed at once because `admin.max_connections` were open (written by
    /// the admin endpoint, on the control plane's thread).
    pub(crate) admin_refused: std::sync::atomic::AtomicU64,
}

static METADATA: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, None);

impl MetricsView {
    pub(crate) fn new(
        plane: Arc<DataPlane>,
        snapshots: Arc<SnapshotCell>,
        health: HealthView,
        listeners: Vec<String>,
        udp: Vec<bool>,
    ) -> Self {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let view = MetricsView {
            plane,
            snapshots,
            health,
            recorder,
            handle,
            listeners,
            udp,
            admin_refused: std::sync::atomic::AtomicU64::new(0),
        };
        view.describe();
        view
    }

    fn describe(&self) {
        use metrics::Unit;
        let d = |name: &'static str, unit: Option<Unit>, text: &'static str| {
            self.recorder
                .describe_counter(name.into(), unit, text.into());
        };
        d(
            "sluice_accept_paused_total",
            None,
            "Times accepting paused, by reason (max_connections in queue mode, fd_exhausted).",
        );
        d(
            "sluice_connections_accepted_total",
            None,
            "Client connections accepted.",
        );
        d(
            "sluice_worker_connections_accepted_total",
            None,
            "Client connections accepted by each worker, over all listeners (how evenly the \
             kernel spreads new connections across the workers' SO_REUSEPORT sockets).",
        );
        d(
            "sluice_connections_closed_total",
            None,
            "Client connections closed, by reason.",
        );
        d(
            "sluice_connections_rejected_total",
            None,
            "Connections reset at accept by max_connections.",
        );
        d(
            "sluice_backend_connections_total",
            None,
            "Successful connects to a backend.",
        );
        d(
            "sluice_backend_connect_failures_total",
            None,
            "Failed connect attempts to a backend.",
        );
        d(
            "sluice_bytes_to_backend_total",
            Some(Unit::Bytes),
            "Bytes written to backends.",
        );
        d(
            "sluice_bytes_to_client_total",
            Some(Unit::Bytes),
            "Bytes written to clients.",
        );
        d(
            "sluice_bytes_spliced_total",
            None,
            "Bytes moved by splice(2) through a pipe rather than copied (all listeners).",
        );
        d(
            "sluice_pipes_shrunk_total",
            None,
            "Pipes the kernel made smaller than asked (fs.pipe-user-pages-soft); copied instead.",
        );
        d(
            "sluice_buffer_waits_total",
            None,
            "Receives that found the worker's buffer pool empty and waited.",
        );
        d(
            "sluice_admin_connections_refused_total",
            None,
            "Admin connections closed at once because admin.max_connections were open.",
        );
        d(
            "sluice_chunks_spilled_total",
            None,
            "Chunks of directions stalled behind peers that do not read, moved out of the buffer \
             pool (running low) to their connection's spill on the heap.",
        );
        self.recorder.describe_gauge(
            "sluice_snapshot_generation".into(),
            None,
            "Generation of the backend snapshot the workers are given.".into(),
        );
        self.recorder.describe_gauge(
            "sluice_balance_info".into(),
            None,
            "1, labelled with each listener's algorithm and table fingerprint: instances with \
             equal fingerprints choose backends alike (see `sluice inspect`)."
                .into(),
        );
        d(
            "sluice_udp_datagrams_total",
            None,
            "Datagrams forwarded by a udp listener, by direction (to_backend, to_client).",
        );
        d(
            "sluice_udp_bytes_total",
            Some(Unit::Bytes),
            "Payload bytes forwarded by a udp listener, by direction.",
        );
        d(
            "sluice_udp_sessions_created_total",
            None,
            "Udp sessions created.",
        );
        d(
            "sluice_udp_sessions_ended_total",
            None,
            "Udp sessions ended, by reason (expired: idle timeout; evicted: table full with \
             evict_lru; closed: responses/requests reached, backend down or drained, ICMP error, \
             shutdown).",
        );
        d(
            "sluice_udp_dropped_total",
            None,
            "Datagrams a udp listener dropped, by reason.",
        );
        self.recorder.describe_gauge(
            "sluice_udp_sessions_active".into(),
            None,
            "Udp sessions open now.".into(),
        );
        d(
            "sluice_backend_ejections_total",
            None,
            "Passive ejections of a backend.",
        );
        self.recorder.describe_gauge(
            "sluice_backend_up".into(),
            None,
            "1 when the backend takes new connections (its health state is up and, with single_primary, it is the elected primary).".into(),
        );
        self.recorder.describe_gauge(
            "sluice_backend_state".into(),
            None,
            "1 for the backend's current health state (up, unknown, down, ejected, flapping), 0 for the others."
                .into(),
        );
        self.recorder.describe_gauge(
            "sluice_backend_weight_effective".into(),
            None,
            "The weight the balancer uses now (below the configured one during slow start).".into(),
        );
        self.recorder.describe_gauge(
            "sluice_backend_probe_duration_seconds".into(),
            Some(Unit::Seconds),
            "How long the backend's latest active probe took, passed or failed.".into(),
        );
        self.recorder.describe_gauge(
            "sluice_pipes_leased".into(),
            None,
            "Pipes leased for splicing now.".into(),
        );
        self.recorder.describe_gauge(
            "sluice_connections_active".into(),
            None,
            "Open client connections.".into(),
        );
        self.recorder.describe_gauge(
            "sluice_backend_connections_active".into(),
            None,
            "Open connections to a backend.".into(),
        );
    }

    /// Sums every worker's counters and renders the exposition text.
    pub(crate) fn render(&self) -> String {
        let workers = self.plane.counters();
        let total = |f: &dyn Fn(&sluice_dataplane::WorkerCounters) -> u64| -> u64 {
            workers.iter().map(|w| f(w)).sum()
        };
        self.gauge("sluice_pipes_leased", vec![])
            .set(total(&|w| w.pipes_leased.get()) as f64);
        let snapshot = self.snapshots.load();
        let health = self.health.lock().map(|h| h.clone()).unwrap_or_default();
        self.gauge("sluice_snapshot_generation", vec![])
            .set(snapshot.generation as f64);
        self.counter("sluice_bytes_spliced_total", vec![])
            .absolute(total(&|w| w.bytes_spliced.get()));
        self.counter("sluice_pipes_shrunk_total", vec![])
            .absolute(total(&|w| w.pipes_shrunk.get()));
        self.counter("sluice_buffer_waits_total", vec![])
            .absolute(total(&|w| w.buffer_waits.get()));
        self.counter("sluice_chunks_spilled_total", vec![])
            .absolute(total(&|w| w.chunks_spilled.get()));
        self.counter("sluice_admin_connections_refused_total", vec![])
            .absolute(
                self.admin_refused
                    .load(std::sync::atomic::Ordering::Relaxed),
            );
        for (wi, worker) in workers.iter().enumerate() {
            let accepted = worker.listeners.iter().map(|l| l.accepted.get()).sum();
            self.counter(
                "sluice_worker_connections_accepted_total",
                vec![Label::new("worker", wi.to_string())],
            )
            .absolute(accepted);
        }
        for (li, name) in self.listeners.iter().enumerate() {
            let listener = || vec![Label::new("listener", name.clone())];
            let sum = |f: &dyn Fn(&sluice_dataplane::ListenerCounters) -> u64| -> u64 {
                workers.iter().map(|w| f(&w.listeners[li])).sum()
            };
            self.counter("sluice_connections_accepted_total", listener())
                .absolute(sum(&|l| l.accepted.get()));
            if self.udp.get(li).copied().unwrap_or(false) {
                let udp: Vec<&UdpCounters> = workers.iter().map(|w| &w.listeners[li].udp).collect();
                self.render_udp(&listener, &udp);
            }
            if let Some(balance) = snapshot.listeners.get(li) {
                let mut labels = listener();
                labels.push(Label::new("algorithm", balance.algorithm.name()));
                let fingerprint = format!("{:016x}", balance.fingerprint());
                labels.push(Label::new("fingerprint", fingerprint));
                self.gauge("sluice_balance_info", labels).set(1.0);
            }
            self.counter("sluice_connections_rejected_total", listener())
                .absolute(sum(&|l| l.rejected.get()));
            self.gauge("sluice_connections_active", listener())
                .set(sum(&|l| l.active.get()) as f64);
            for (reason, value) in [
                ("max_connections", sum(&|l| l.paused_at_cap.get())),
                ("fd_exhausted", sum(&|l| l.accept_fd_exhausted.get())),
            ] {
                let mut labels = listener();
                labels.push(Label::new("reason", reason));
                self.counter("sluice_accept_paused_total", labels)
                    .absolute(value);
            }
            for kind in CloseKind::ALL {
                let mut labels = listener();
                labels.push(Label::new("reason", kind.as_str()));
                self.counter("sluice_connections_closed_total", labels)
                    .absolute(sum(&|l| l.closed[kind.index()].get()));
            }
            // Every backend configured since start, by its address; the health view lists them
            // in `BackendId` order, as the workers' counters are.
            let no_backends = Vec::new();
            for (bi, view) in health.get(li).unwrap_or(&no_backends).iter().enumerate() {
                let backend = view.addr.to_string();
                let labels = || {
                    let mut l = listener();
                    l.push(Label::new("backend", backend.clone()));
                    l
                };
                let bsum = |f: &dyn Fn(&sluice_dataplane::BackendCounters) -> u64| -> u64 {
                    workers
                        .iter()
                        .filter_map(|w| w.listeners[li].backends.get(bi))
                        .map(f)
                        .sum()
                };
                self.counter("sluice_backend_connections_total", labels())
                    .absolute(bsum(&|b| b.connections.get()));
                self.counter("sluice_backend_connect_failures_total", labels())
                    .absolute(bsum(&|b| b.connect_failures.get()));
                self.counter("sluice_bytes_to_backend_total", labels())
                    .absolute(bsum(&|b| b.bytes_to_backend.get()));
                self.counter("sluice_bytes_to_client_total", labels())
                    .absolute(bsum(&|b| b.bytes_to_client.get()));
                self.gauge("sluice_backend_connections_active", labels())
                    .set(bsum(&|b| b.connections_active.get()) as f64);
                self.render_health(view, &labels);
            }
        }
        self.handle.render()
    }

    /// A udp listener's datagrams, sessions and drops, summed over `workers` (each worker's
    /// counters of that listener).
    fn render_udp(&self, listener: &dyn Fn() -> Vec<Label>, workers: &[&UdpCounters]) {
        let sum = |f: &dyn Fn(&UdpCounters) -> u64| -> u64 { workers.iter().map(|u| f(u)).sum() };
        let with = |key: &'static str, value: &'static str| {
            let mut labels = listener();
            labels.push(Label::new(key, value));
            labels
        };
        for (direction, datagrams, bytes) in [
            (
                "to_backend",
                sum(&|u| u.datagrams_to_backend.get()),
                sum(&|u| u.bytes_to_backend.get()),
            ),
            (
                "to_client",
                sum(&|u| u.datagrams_to_client.get()),
                sum(&|u| u.bytes_to_client.get()),
            ),
        ] {
            self.counter("sluice_udp_datagrams_total", with("direction", direction))
                .absolute(datagrams);
            self.counter("sluice_udp_bytes_total", with("direction", direction))
                .absolute(bytes);
        }
        self.gauge("sluice_udp_sessions_active", listener())
            .set(sum(&|u| u.sessions_active.get()) as f64);
        self.counter("sluice_udp_sessions_created_total", listener())
            .absolute(sum(&|u| u.sessions_created.get()));
        for (reason, value) in [
            ("expired", sum(&|u| u.sessions_expired.get())),
            ("evicted", sum(&|u| u.sessions_evicted.get())),
            ("closed", sum(&|u| u.sessions_closed.get())),
        ] {
            self.counter("sluice_udp_sessions_ended_total", with("reason", reason))
                .absolute(value);
        }
        for reason in UdpDrop::ALL {
            self.counter("sluice_udp_dropped_total", with("reason", reason.as_str()))
                .absolute(sum(&|u| u.dropped[reason.index()].get()));
        }
    }

    fn render_health(&self, view: &BackendView, labels: &dyn Fn() -> Vec<Label>) {
        let up = view.available;
        self.gauge("sluice_backend_up", labels())
            .set(if up { 1.0 } else { 0.0 });
        // A backend a reload removed is in no state: every member of the set is 0.
        for state in STATES {
            let mut l = labels();
            l.push(Label::new("state", state.label()));
            let value = if !view.removed && state == view.state {
                1.0
            } else {
                0.0
            };
            self.gauge("sluice_backend_state", l).set(value);
        }
        self.counter("sluice_backend_ejections_total", labels())
            .absolute(view.ejections);
        self.gauge("sluice_backend_weight_effective", labels())
            .set(view.weight_effective);
        if let Some(latency) = view.probe_latency {
            self.gauge("sluice_backend_probe_duration_seconds", labels())
                .set(latency.as_secs_f64());
        }
    }

    fn counter(&self, name: &'static str, labels: Vec<Label>) -> Counter {
        self.recorder
            .register_counter(&Key::from_parts(name, labels), &METADATA)
    }

    fn gauge(&self, name: &'static str, labels: Vec<Label>) -> Gauge {
        self.recorder
            .register_gauge(&Key::from_parts(name, labels), &METADATA)
    }
}
