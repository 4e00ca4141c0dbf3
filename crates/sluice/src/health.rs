//! The control plane's health manager: it runs each listener's active probes (one task per
//! backend, one probe at a time, jittered), takes the workers' passive reports, drives
//! `sluice-health`'s state machines with them, logs every transition once with its reason, and
//! publishes a new snapshot whenever who may take new connections (or a slow-start weight)
//! changes. Probes never run on a worker's ring.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_balance::random::Rng;
use sluice_balance::{
    Algorithm, Backend, BackendId, BackendLoad, BackendState, ListenerBackends, OnAllDown,
    RAMP_FULL, Snapshot, SnapshotCell,
};
use sluice_dataplane::{BackendEvent, BackendEvents, DataPlane};
use sluice_health::{ActiveCheck, Election, ListenerHealth, Policy, Start, State, Transition};
use sluice_probe::{Failure, Outcome, Prober};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::plan::Resolved;

/// Passive reports waiting for the manager; past this, reports are dropped (a flood of
/// failures says nothing more than the first few thousand).
const EVENTS_QUEUED_MAX: usize = 4096;

/// Probes start at `interval` times a factor in `1 - JITTER ..= 1 + JITTER`, so that the probes
/// of many backends (and of several Sluice instances) do not line up.
const JITTER: f64 = 0.1;

/// What reaches the manager.
pub(crate) enum Event {
    Probe {
        listener: usize,
        addr: SocketAddr,
        outcome: Outcome,
    },
    Passive {
        listener: usize,
        load: Arc<BackendLoad>,
        event: BackendEvent,
    },
    /// SIGHUP: a config that loaded and resolved, and who hears once it is applied (its
    /// snapshot published to the workers).
    Reload(Box<Resolved>, oneshot::Sender<()>),
}

/// The workers' side of the passive reports: a non-blocking send into the manager's queue.
pub(crate) struct PassiveSink(mpsc::Sender<Event>);

impl BackendEvents for PassiveSink {
    fn report(&self, listener: usize, backend: &Arc<BackendLoad>, event: BackendEvent) {
        let _ = self.0.try_send(Event::Passive {
            listener,
            load: Arc::clone(backend),
            event,
        });
    }
}

/// One backend of a listener, configured now or earlier. Members are never removed while the
/// process runs: a member's index is its `BackendId`, which the workers' per-backend counters
/// follow, so a backend a reload removes stays as a tombstone (weight 0, its counters kept) and
/// comes back to the same index if a later reload adds it again.
struct Member {
    addr: SocketAddr,
    /// The configured weight (0 for a removed backend).
    weight: u16,
    backup: bool,
    /// No longer in the config.
    removed: bool,
    load: Arc<BackendLoad>,
    /// When its connections are closed: set when it is removed or set to weight 0, cleared if
    /// it takes traffic again first.
    drain_at: Option<Instant>,
    /// The latest probe's latency, for `/metrics`.
    probe_latency: Option<Duration>,
}

impl Member {
    fn new(addr: SocketAddr, weight: u16, backup: bool) -> Self {
        Member {
            addr,
            weight,
            backup,
            removed: false,
            load: Arc::default(),
            drain_at: None,
            probe_latency: None,
        }
    }
}

struct ListenerState {
    name: String,
    algorithm: Algorithm,
    on_all_down: OnAllDown,
    drain_timeout: Duration,
    /// Members beyond this have no counters in the workers: a reload may not add them.
    members_max: usize,
    members: Vec<Member>,
    health: ListenerHealth<SocketAddr>,
    check: Option<ActiveCheck>,
    prober: Option<Arc<Prober>>,
    /// The listener as configured at start: what a reload cannot change without a restart is
    /// compared with it.
    started: sluice_config::Listener,
}

/// What `/metrics` shows of one backend.
#[derive(Debug, Clone)]
pub(crate) struct BackendView {
    pub addr: SocketAddr,
    /// Removed from the config by a reload (draining or drained): no health state.
    pub removed: bool,
    pub state: State,
    /// Takes new connections: up and, with `single_primary`, the elected primary.
    pub available: bool,
    pub ejections: u64,
    /// The slow-start share of the weight in use, in thousandths.
    pub ramp: u16,
    /// The configured weight times the ramp.
    pub weight_effective: f64,
    pub probe_latency: Option<Duration>,
}

/// Per listener, per backend: the health as of the last change, shared with `/metrics`.
pub(crate) type HealthView = Arc<Mutex<Vec<Vec<BackendView>>>>;

/// The health manager before and after it starts its loop.
pub(crate) struct Manager {
    listeners: Vec<ListenerState>,
    generation: u64,
    view: HealthView,
    tx: mpsc::Sender<Event>,
    rx: mpsc::Receiver<Event>,
    probes: HashMap<(usize, SocketAddr), JoinHandle<()>>,
    /// The reloads applied by the event in hand, answered once its snapshot is published.
    applied: Vec<oneshot::Sender<()>>,
}

impl Manager {
    /// Takes over every listener's backends and prepared probes.
    pub(crate) fn new(resolved: &Resolved) -> Self {
        let mut listeners = Vec::with_capacity(resolved.config.listeners.len());
        let config = &resolved.config;
        for ((listener, addrs), prober) in config
            .listeners
            .iter()
            .zip(&resolved.backends)
            .zip(&resolved.probers)
        {
            let passive = (listener.passive.consecutive_failures > 0).then_some(listener.passive);
            let policy = Policy::new(listener.health.as_ref(), passive, listener.slow_start);
            let mut health = ListenerHealth::new(policy);
            let members: Vec<Member> = listener
                .backends
                .iter()
                .zip(addrs)
                .map(|(spec, &addr)| Member::new(addr, spec.weight, spec.backup))
                .collect();
            for m in &members {
                health.insert(m.addr, Start::Unknown);
            }
            listeners.push(ListenerState {
                name: listener.name.clone(),
                algorithm: listener.algorithm,
                on_all_down: listener.on_all_down,
                drain_timeout: listener.drain_timeout,
                members_max: crate::plan::backends_max(listener.backends.len()),
                members,
                health,
                check: listener.health.clone(),
                prober: prober.clone(),
                started: listener.clone(),
            });
        }
        let (tx, rx) = mpsc::channel(EVENTS_QUEUED_MAX);
        let manager = Manager {
            listeners,
            generation: 0,
            view: Arc::default(),
            tx,
            rx,
            probes: HashMap::new(),
            applied: Vec::new(),
        };
        manager.update_view(Instant::now());
        manager
    }

    /// Where the workers send passive reports.
    pub(crate) fn sink(&self) -> Arc<dyn BackendEvents> {
        Arc::new(PassiveSink(self.tx.clone()))
    }

    pub(crate) fn view(&self) -> HealthView {
        Arc::clone(&self.view)
    }

    /// Probes every backend that has an active check once, all at once, so that no connection
    /// reaches a backend of unknown state (or role). Bounded by the longest probe timeout.
    pub(crate) async fn probe_all_once(&mut self) {
        let mut probes = tokio::task::JoinSet::new();
        for (li, l) in self.listeners.iter().enumerate() {
            let (Some(prober), Some(check)) = (&l.prober, &l.check) else {
                continue;
            };
            for m in &l.members {
                let (prober, addr, timeout) = (Arc::clone(prober), m.addr, check.timeout);
                probes.spawn(async move { (li, addr, prober.probe(addr, timeout).await) });
            }
        }
        while let Some(done) = probes.join_next().await {
            // A probe task only panics on a bug; its backend then stays unknown (no traffic).
            if let Ok((listener, addr, outcome)) = done {
                self.handle(
                    Event::Probe {
                        listener,
                        addr,
                        outcome,
                    },
                    Instant::now(),
                );
            }
        }
        self.update_view(Instant::now());
    }

    /// The snapshot of the current health: the next generation.
    pub(crate) fn snapshot(&mut self, now: Instant) -> Snapshot {
        self.generation += 1;
        let listeners = self
            .listeners
            .iter()
            .map(|l| {
                // With single_primary, only the elected primary: the snapshot that brings a new
                // primary in has the old one out. One election per listener, not per backend.
                let up: HashSet<SocketAddr> = l.health.available().copied().collect();
                let backends = l
                    .members
                    .iter()
                    .enumerate()
                    .map(|(i, m)| {
                        let available = up.contains(&m.addr);
                        let mut b = Backend::new(BackendId(i as u32), m.addr, m.weight);
                        b.ramp = l.ramp(m, now);
                        b.state = if available {
                            BackendState::Up
                        } else {
                            BackendState::Down
                        };
                        b.backup = m.backup;
                        b.load = Arc::clone(&m.load);
                        b
                    })
                    .collect();
                // `use_all` would send writes to every backend while two claim the primary
                // role: single_primary fails closed.
                let on_all_down = if l.health.policy().single_primary {
                    OnAllDown::Reject
                } else {
                    l.on_all_down
                };
                ListenerBackends::with_fallback(l.algorithm, on_all_down, backends)
            })
            .collect();
        Snapshot {
            generation: self.generation,
            listeners,
        }
    }

    /// Starts one probe task per backend with an active check, and the manager's loop, which
    /// publishes into `snapshots` and wakes `plane`'s workers after every change.
    pub(crate) fn spawn(mut self, snapshots: Arc<SnapshotCell>, plane: Arc<DataPlane>) {
        for li in 0..self.listeners.len() {
            let addrs: Vec<SocketAddr> =
                self.listeners[li].members.iter().map(|m| m.addr).collect();
            for addr in addrs {
                self.start_probe(li, addr);
            }
        }
        tokio::spawn(async move { self.run(snapshots, plane).await });
    }

    fn start_probe(&mut self, listener: usize, addr: SocketAddr) {
        let l = &self.listeners[listener];
        let (Some(prober), Some(check)) = (&l.prober, &l.check) else {
            return;
        };
        let (prober, interval, timeout) = (Arc::clone(prober), check.interval, check.timeout);
        let tx = self.tx.clone();
        let seed = {
            use std::hash::BuildHasher;
            std::hash::RandomState::new().hash_one((listener, addr))
        };
        let task = tokio::spawn(async move {
            let mut rng = Rng::new(seed);
            loop {
                tokio::time::sleep(jittered(interval, &mut rng)).await;
                let outcome = prober.probe(addr, timeout).await;
                let event = Event::Probe {
                    listener,
                    addr,
                    outcome,
                };
                if tx.send(event).await.is_err() {
                    return; // The manager is gone: the process is stopping.
                }
            }
        });
        if let Some(old) = self.probes.insert((listener, addr), task) {
            old.abort();
        }
    }

    async fn run(mut self, snapshots: Arc<SnapshotCell>, plane: Arc<DataPlane>) {
        loop {
            let deadline = self.next_deadline(Instant::now());
            let changed = tokio::select! {
                event = self.rx.recv() => match event {
                    Some(event) => self.handle(event, Instant::now()),
                    None => return,
                },
                () = sleep_until(deadline) => self.tick(Instant::now()),
            };
            if changed {
                let now = Instant::now();
                snapshots.publish(self.snapshot(now));
                plane.wake();
                self.update_view(now);
            }
            for applied in self.applied.drain(..) {
                let _ = applied.send(());
            }
        }
    }

    /// Applies one event; true when the snapshot must change.
    fn handle(&mut self, event: Event, now: Instant) -> bool {
        match event {
            Event::Probe {
                listener,
                addr,
                outcome,
            } => {
                let Some(l) = self.listeners.get_mut(listener) else {
                    return false;
                };
                if let Some(m) = l.members.iter_mut().find(|m| m.addr == addr) {
                    m.probe_latency = Some(outcome.latency());
                }
                let transition = match outcome.failure() {
                    None => l.health.probe_passed_on(&addr, now, outcome.timeline()),
                    // A wrong role is an answer: down at once, whatever `fall` says.
                    Some(Failure::WrongRole { actual, want }) => {
                        l.health.probe_wrong_role(&addr, now, actual, want)
                    }
                    Some(failure) => l.health.probe_failed(&addr, now, &failure.to_string()),
                };
                log_transition(&l.name, addr, transition.as_ref()) | l.log_election()
            }
            Event::Reload(resolved, applied) => {
                self.applied.push(applied);
                self.reload(&resolved, now)
            }
            Event::Passive {
                listener,
                load,
                event,
            } => {
                let Some(l) = self.listeners.get_mut(listener) else {
                    return false;
                };
                let Some(addr) = l
                    .members
                    .iter()
                    .find(|m| Arc::ptr_eq(&m.load, &load))
                    .map(|m| m.addr)
                else {
                    return false;
                };
                match event {
                    BackendEvent::Recovered => {
                        l.health.passive_success(&addr);
                        false
                    }
                    BackendEvent::ConnectFailed | BackendEvent::Reset => {
                        let transition = l.health.passive_failure(&addr, now);
                        log_transition(&l.name, addr, transition.as_ref()) | l.log_election()
                    }
                }
            }
        }
    }

    /// Where SIGHUP sends reloaded configs.
    pub(crate) fn sender(&self) -> mpsc::Sender<Event> {
        self.tx.clone()
    }

    /// Applies a reloaded config to the running listeners, matched by name: backends, weights,
    /// backup flags, algorithm, `on_all_down`, `drain_timeout` and health settings. What only a
    /// restart can change (binds, timeouts, limits, retries, listeners added or removed) is
    /// logged as such and left as it runs. True: publish a new snapshot.
    fn reload(&mut self, resolved: &Resolved, now: Instant) -> bool {
        let config = &resolved.config;
        for new in &config.listeners {
            if !self.listeners.iter().any(|l| l.name == new.name) {
                tracing::warn!(listener = %new.name, "reload: new listener; restart to start it");
            }
        }
        let mut starts = Vec::new();
        for (li, l) in self.listeners.iter_mut().enumerate() {
            let Some(((new, addrs), prober)) = config
                .listeners
                .iter()
                .zip(&resolved.backends)
                .zip(&resolved.probers)
                .find(|((new, _), _)| new.name == l.name)
            else {
                tracing::warn!(listener = %l.name, "reload: listener removed from the file; restart to stop it (it keeps running as before)");
                continue;
            };
            for field in restart_only_changes(&l.started, new) {
                tracing::warn!(listener = %l.name, %field, "reload: a restart is needed to change this; kept as running");
            }
            l.algorithm = new.algorithm;
            l.on_all_down = new.on_all_down;
            l.drain_timeout = new.drain_timeout;
            if l.check != new.health {
                l.prober = prober.clone();
                l.check = new.health.clone();
                starts.extend(
                    l.members
                        .iter()
                        .filter(|m| !m.removed)
                        .map(|m| (li, m.addr)),
                );
            }
            let passive = (new.passive.consecutive_failures > 0).then_some(new.passive);
            let policy = Policy::new(l.check.as_ref(), passive, new.slow_start);
            if *l.health.policy() != policy {
                for (addr, t) in l.health.reconfigure(policy, now) {
                    log_transition(&l.name, addr, Some(&t));
                }
            }
            starts.extend(l.update_members(li, new, addrs, now));
            l.log_election();
        }
        // Probes of removed backends stop; new backends (and every backend of a changed
        // check) get a fresh probe task.
        let live: Vec<(usize, SocketAddr)> = self
            .listeners
            .iter()
            .enumerate()
            .flat_map(|(li, l)| {
                l.members
                    .iter()
                    .filter(|m| !m.removed && l.prober.is_some())
                    .map(move |m| (li, m.addr))
            })
            .collect();
        self.probes.retain(|key, task| {
            let keep = live.contains(key);
            if !keep {
                task.abort();
            }
            keep
        });
        for (li, addr) in starts {
            self.start_probe(li, addr);
        }
        tracing::info!(generation = self.generation + 1, "reloaded");
        true
    }

    /// Ends ejections and holds whose time passed, moves slow-start ramps on, and closes the
    /// connections of backends whose drain time is over.
    fn tick(&mut self, now: Instant) -> bool {
        let mut changed = false;
        for l in &mut self.listeners {
            for (addr, transition) in l.health.tick(now) {
                changed |= log_transition(&l.name, addr, Some(&transition));
            }
            changed |= l.log_election();
            for m in &mut l.members {
                if m.drain_at.is_some_and(|at| at <= now) {
                    m.drain_at = None;
                    m.load.set_drained();
                    tracing::info!(
                        listener = %l.name,
                        backend = %m.addr,
                        open = m.load.active(),
                        "drain_timeout reached: closing the backend's connections"
                    );
                    // Publishing makes every worker look for the flagged connections.
                    changed = true;
                }
            }
        }
        changed || self.ramping(now)
    }

    /// Whether any backend's slow-start weight differs from the published one.
    fn ramping(&self, now: Instant) -> bool {
        let view = self.view.lock().unwrap_or_else(|e| e.into_inner());
        self.listeners.iter().zip(view.iter()).any(|(l, backends)| {
            l.members
                .iter()
                .zip(backends)
                .any(|(m, seen)| l.ramp(m, now) != seen.ramp)
        })
    }

    /// The next time something is due; never sooner than a millisecond from `now`, so that a
    /// deadline that is already due cannot spin the loop.
    fn next_deadline(&self, now: Instant) -> Option<Instant> {
        self.listeners
            .iter()
            .flat_map(|l| {
                let drains = l.members.iter().filter_map(|m| m.drain_at);
                [l.health.next_deadline(), l.health.next_weight_change(now)]
                    .into_iter()
                    .flatten()
                    .chain(drains)
            })
            .min()
            .map(|at| at.max(now + Duration::from_millis(1)))
    }

    fn update_view(&self, now: Instant) {
        let view = self
            .listeners
            .iter()
            .map(|l| {
                let up: HashSet<SocketAddr> = l.health.available().copied().collect();
                l.members
                    .iter()
                    .map(|m| {
                        let health = l.health.backend(&m.addr);
                        BackendView {
                            addr: m.addr,
                            removed: m.removed,
                            state: health.map_or(State::Up, |h| h.state()),
                            available: !m.removed && up.contains(&m.addr),
                            ejections: health.map_or(0, |h| h.ejections()),
                            ramp: l.ramp(m, now),
                            weight_effective: f64::from(m.weight) * f64::from(l.ramp(m, now))
                                / f64::from(RAMP_FULL),
                            probe_latency: m.probe_latency,
                        }
                    })
                    .collect()
            })
            .collect();
        *self.view.lock().unwrap_or_else(|e| e.into_inner()) = view;
    }
}

impl ListenerState {
    /// Logs a change of `single_primary` election once; true when there was one (a new
    /// snapshot is due even when no backend changed state, as when a timeline moves).
    fn log_election(&mut self) -> bool {
        let Some(election) = self.health.election_changed() else {
            return false;
        };
        let listener = &self.name;
        let detail = election.to_string();
        match &election {
            Election::Held { primary, .. } => {
                tracing::info!(%listener, backend = %primary, detail, "primary");
            }
            Election::Contested { claimants } => {
                let backends = claimants
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ");
                tracing::warn!(%listener, backends, detail, "primary contested: failing closed");
            }
            Election::Vacant => tracing::warn!(%listener, detail, "no primary"),
        }
        true
    }

    /// A member's slow-start ramp now, in thousandths of its weight.
    fn ramp(&self, m: &Member, now: Instant) -> u16 {
        self.health
            .backend(&m.addr)
            .map_or(RAMP_FULL, |h| h.effective_weight(RAMP_FULL, now))
            .clamp(1, RAMP_FULL)
    }

    /// Brings the members in line with a reloaded backend list; returns the backends that need
    /// a probe task started.
    fn update_members(
        &mut self,
        listener: usize,
        new: &sluice_config::Listener,
        addrs: &[SocketAddr],
        now: Instant,
    ) -> Vec<(usize, SocketAddr)> {
        let mut starts = Vec::new();
        for (spec, &addr) in new.backends.iter().zip(addrs) {
            let count = self.members.len();
            match self.members.iter_mut().find(|m| m.addr == addr) {
                Some(m) => {
                    let was_taking = !m.removed && m.weight > 0;
                    if m.removed && self.prober.is_some() {
                        starts.push((listener, addr));
                    }
                    m.removed = false;
                    m.weight = spec.weight;
                    m.backup = spec.backup;
                    if spec.weight == 0 && was_taking {
                        m.drain_at = Some(now + self.drain_timeout);
                    } else if spec.weight > 0 {
                        m.drain_at = None;
                        m.load.clear_drained();
                    }
                }
                None if count >= self.members_max => {
                    tracing::error!(listener = %self.name, backend = %addr, limit = self.members_max, "reload: too many distinct backends since start; restart to add this one");
                }
                None => {
                    self.members
                        .push(Member::new(addr, spec.weight, spec.backup));
                    if self.prober.is_some() {
                        starts.push((listener, addr));
                    }
                }
            }
        }
        for m in &mut self.members {
            if !m.removed && !addrs.contains(&m.addr) {
                let was_taking = m.weight > 0;
                m.removed = true;
                m.weight = 0;
                if was_taking {
                    m.drain_at = Some(now + self.drain_timeout);
                }
                tracing::info!(listener = %self.name, backend = %m.addr, drain_timeout = %crate::run::Written(self.drain_timeout), open = m.load.active(), "reload: backend removed; draining");
            }
        }
        let keys: Vec<SocketAddr> = self
            .members
            .iter()
            .filter(|m| !m.removed)
            .map(|m| m.addr)
            .collect();
        self.health.set_backends(keys, Start::Unknown);
        starts
    }
}

/// The listener fields that differ between `running` and `new` and that only a restart applies.
fn restart_only_changes(
    running: &sluice_config::Listener,
    new: &sluice_config::Listener,
) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if running.bind != new.bind {
        changed.push("bind");
    }
    if running.protocol != new.protocol {
        changed.push("protocol");
    }
    if running.timeouts != new.timeouts {
        changed.push("timeouts");
    }
    if running.max_connections != new.max_connections {
        changed.push("max_connections");
    }
    if running.on_max_connections != new.on_max_connections {
        changed.push("on_max_connections");
    }
    if running.retries != new.retries {
        changed.push("retries");
    }
    if running.keepalive != new.keepalive {
        changed.push("keepalive");
    }
    changed
}

/// Logs a transition once; true when there was one. The reason is free text (it may quote
/// a backend's reply), so it is logged as a string: quoted, and escaped.
fn log_transition(listener: &str, backend: SocketAddr, transition: Option<&Transition>) -> bool {
    let Some(t) = transition else {
        return false;
    };
    let reason = t.reason.to_string();
    if t.to.is_available() {
        tracing::info!(%listener, %backend, from = %t.from, to = %t.to, reason, "backend state");
    } else {
        tracing::warn!(%listener, %backend, from = %t.from, to = %t.to, reason, "backend state");
    }
    true
}

/// `interval` scaled by a random factor in `1 - JITTER ..= 1 + JITTER`.
fn jittered(interval: Duration, rng: &mut Rng) -> Duration {
    let unit = rng.below(1 << 20) as f64 / f64::from(1u32 << 20);
    interval.mul_f64(1.0 - JITTER + 2.0 * JITTER * unit)
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
