//! `/metrics`: Prometheus (OpenMetrics text) for people who run payguard.
//!
//! * `payguard_http_requests_total{route,method,status}` and
//!   `payguard_http_request_duration_seconds{route,method}`: every request, by the
//!   route's template (`/v1/orders/{id}/deduct`), never by raw path, and by RFC 9110
//!   method or `other`, so neither ids nor invented methods can blow up the label set;
//! * the engine's counters: ops committed / replayed / rejected / unavailable,
//!   in-flight collisions (the race sentinel) and single-flight joins;
//! * two-phase payments: `payguard_holds_open` (AUTHORIZED orders in the whole
//!   database, read at each scrape) and this instance's
//!   `payguard_holds_{authorized,captured,voided,expired}_total`;
//! * `payguard_lane_queue_depth{lane}`, `payguard_lane_batch_size` and
//!   `payguard_store_commit_seconds` histograms;
//! * connections (`crate::connections`): `payguard_connections{phase}` open by phase,
//!   `payguard_connections_write_blocked`, and
//!   `payguard_connections_closed_total{reason}` (each deadline, eviction, shutdown),
//!   so an operator sees a slow-client attack;
//! * the store's own counters (`Store::counters`), read at each scrape: on
//!   PostgreSQL `payguard_store_pg_batch_retries_total`,
//!   `payguard_store_pg_careful_batches_total`, `payguard_store_pg_ambiguous_commits_total`
//!   and `payguard_store_pg_ambiguous_commits_committed_total`.
//!
//! One registry per server (no globals), so tests can run many in one process.

use crate::AppState;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::Instant;

/// Bucket bounds of the request latency histogram (seconds).
const HTTP_SECONDS_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LaneLabels {
    lane: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CloseLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram>,
    lane_depth: Family<LaneLabels, Gauge>,
    connections_closed: Family<CloseLabels, Counter>,
    connections: Family<PhaseLabels, Gauge>,
    connections_write_blocked: Gauge,
    holds_open: Gauge,
    /// Webhook attempts by what they led to (delivered, retry, failed, gone).
    webhook_attempts: Family<OutcomeLabels, Counter>,
    /// Per endpoint: deliveries not yet made, and the age of the oldest one's event.
    webhook_backlog: Family<EndpointLabels, Gauge>,
    webhook_backlog_age: Family<EndpointLabels, Gauge>,
    /// The feed's last sequence number: events written (and numbered) in all.
    events_last_seq: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: String,
}

impl Metrics {
    pub fn new(engine: &payguard::Engine) -> Arc<Self> {
        let mut registry = Registry::with_prefix("payguard");
        let (requests, latency) = register_http(&mut registry);
        let lane_depth = Family::<LaneLabels, Gauge>::default();
        registry.register(
            "lane_queue_depth",
            "Requests waiting in each lane's queue",
            lane_depth.clone(),
        );
        register_instance(&mut registry, engine);
        let (connections_closed, connections, connections_write_blocked) =
            register_connections(&mut registry);
        register_engine_stats(&mut registry, engine);
        let holds_open = Gauge::default();
        registry.register(
            "holds_open",
            "Open holds (AUTHORIZED orders) in the whole database, read at each scrape",
            holds_open.clone(),
        );
        registry.register_collector(Box::new(StoreCounters(engine.store().clone())));
        let webhook_attempts = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "webhook_attempts",
            "Webhook attempts by this instance, by outcome (delivered, retry, failed, gone)",
            webhook_attempts.clone(),
        );
        let webhook_backlog = Family::<EndpointLabels, Gauge>::default();
        registry.register(
            "webhook_backlog",
            "Deliveries not yet delivered nor failed, per endpoint, read at each scrape",
            webhook_backlog.clone(),
        );
        let webhook_backlog_age = Family::<EndpointLabels, Gauge>::default();
        registry.register(
            "webhook_backlog_oldest_age_seconds",
            "Age of the oldest undelivered event, per endpoint (0: none), read at each scrape",
            webhook_backlog_age.clone(),
        );
        let events_last_seq = Gauge::default();
        registry.register(
            "events_last_seq",
            "The event feed's last sequence number: events written, read at each scrape",
            events_last_seq.clone(),
        );
        Arc::new(Metrics {
            webhook_attempts,
            webhook_backlog,
            webhook_backlog_age,
            events_last_seq,
            registry,
            requests,
            latency,
            lane_depth,
            holds_open,
            connections_closed,
            connections,
            connections_write_blocked,
        })
    }

    pub(crate) fn connection_closed(&self, reason: &'static str) {
        self.connections_closed
            .get_or_create(&CloseLabels { reason })
            .inc();
    }

    pub(crate) fn set_connections(&self, phase: &'static str, n: i64) {
        self.connections
            .get_or_create(&PhaseLabels { phase })
            .set(n);
    }

    pub(crate) fn set_connections_write_blocked(&self, n: i64) {
        self.connections_write_blocked.set(n);
    }
}

/// Every request, counted by route template, method and status, and timed.
fn register_http(
    registry: &mut Registry,
) -> (
    Family<RequestLabels, Counter>,
    Family<RouteLabels, Histogram>,
) {
    let requests = Family::<RequestLabels, Counter>::default();
    let latency = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
        Histogram::new(HTTP_SECONDS_BUCKETS)
    });
    registry.register(
        "http_requests",
        "HTTP requests by route template, method and status",
        requests.clone(),
    );
    registry.register(
        "http_request_duration_seconds",
        "HTTP request latency",
        latency.clone(),
    );
    (requests, latency)
}

/// Which instance this is: its id, guard and store, as an info metric.
fn register_instance(registry: &mut Registry, engine: &payguard::Engine) {
    registry.register(
        "instance",
        "This instance's id, guard and store",
        prometheus_client::metrics::info::Info::new(vec![
            ("instance", engine.config().instance_id.clone()),
            ("guard", engine.config().guard.name().to_owned()),
            ("store", engine.store().kind().to_owned()),
        ]),
    );
}

/// Connections (`crate::connections`): closes by reason, open ones by phase, and the
/// ones whose client is not reading.
fn register_connections(
    registry: &mut Registry,
) -> (
    Family<CloseLabels, Counter>,
    Family<PhaseLabels, Gauge>,
    Gauge,
) {
    let connections_closed = Family::<CloseLabels, Counter>::default();
    for reason in crate::connections::slot::CloseReason::ALL {
        // Every reason shows, at 0 until it happens.
        let _ = connections_closed.get_or_create(&CloseLabels {
            reason: reason.label(),
        });
    }
    registry.register(
        "connections_closed",
        "Connections the server closed, by reason: a deadline (header_timeout, body_timeout, idle_timeout, write_timeout), evicted at the connection limit, shutdown, drain_deadline",
        connections_closed.clone(),
    );
    let connections = Family::<PhaseLabels, Gauge>::default();
    registry.register(
        "connections",
        "Open connections by phase (headers, body, handling, writing, idle)",
        connections.clone(),
    );
    let connections_write_blocked = Gauge::default();
    registry.register(
        "connections_write_blocked",
        "Open connections whose client is not reading its answer",
        connections_write_blocked.clone(),
    );
    (connections_closed, connections, connections_write_blocked)
}

/// The engine's counters and histograms (`EngineStats`): the clones registered share
/// their values with the engine's.
fn register_engine_stats(registry: &mut Registry, engine: &payguard::Engine) {
    let s = engine.stats();
    registry.register(
        "ops_committed",
        "Operations that changed something (first executions)",
        s.committed.clone(),
    );
    registry.register(
        "ops_replayed",
        "Operations answered with an earlier result (duplicates)",
        s.replayed.clone(),
    );
    registry.register(
        "ops_rejected",
        "Operations refused with a definite answer (402/404/409)",
        s.rejected.clone(),
    );
    registry.register(
        "ops_overloaded",
        "Requests refused because a lane queue was full (503)",
        s.overloaded.clone(),
    );
    registry.register(
        "ops_unavailable",
        "Requests that failed with nothing moved: store down, timeout, shutdown (503)",
        s.store_failures.clone(),
    );
    registry.register(
        "inflight_collisions",
        "Race sentinel: a request for an order already in flight",
        s.collisions.clone(),
    );
    registry.register(
        "single_flight_joined",
        "Duplicates that shared an in-flight operation's result",
        s.joined.clone(),
    );
    registry.register(
        "settled_without_lock",
        "Ops answered from committed state without taking their order's lock (just released, or settled hint)",
        s.settled_without_lock.clone(),
    );
    registry.register(
        "cached_replays",
        "Duplicate deducts of paid orders answered from the order cache (no lane, no transaction)",
        s.cached_replays.clone(),
    );
    for (name, help, counter) in [
        (
            "holds_authorized",
            "Holds this instance made (authorize, first executions)",
            &s.holds_authorized,
        ),
        (
            "holds_captured",
            "Holds this instance captured",
            &s.holds_captured,
        ),
        (
            "holds_voided",
            "Holds this instance voided",
            &s.holds_voided,
        ),
        (
            "holds_expired",
            "Holds this instance's sweeper released at their expiry",
            &s.holds_expired,
        ),
    ] {
        registry.register(name, help, counter.clone());
    }
    registry.register(
        "lane_batch_size",
        "Operations per lane batch (group commit)",
        s.batch_sizes.clone(),
    );
    registry.register(
        "store_commit_seconds",
        "Time from handing a batch to the store to its commit",
        s.commit_seconds.clone(),
    );
}

/// A method as a label: RFC 9110's methods by name, any other token a client invents as
/// `other`, so the label set stays bounded whatever arrives (and before any key is checked).
fn method_label(method: &axum::http::Method) -> &'static str {
    match method.as_str() {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "CONNECT" => "CONNECT",
        "OPTIONS" => "OPTIONS",
        "TRACE" => "TRACE",
        "PATCH" => "PATCH",
        _ => "other",
    }
}

/// Counts and times every request.
pub async fn track(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let method = method_label(req.method()).to_owned();
    let started = Instant::now();
    let resp = next.run(req).await;
    metrics
        .latency
        .get_or_create(&RouteLabels {
            route: route.clone(),
            method: method.clone(),
        })
        .observe(started.elapsed().as_secs_f64());
    metrics
        .requests
        .get_or_create(&RequestLabels {
            route,
            method,
            status: resp.status().as_u16(),
        })
        .inc();
    resp
}

pub async fn render(State(state): State<AppState>) -> Response {
    let metrics = &state.metrics;
    for (lane, depth) in state.engine.lane_depths().into_iter().enumerate() {
        metrics
            .lane_depth
            .get_or_create(&LaneLabels { lane: lane as u32 })
            .set(depth as i64);
    }
    match state.engine.store().open_holds().await {
        Ok(n) => {
            metrics.holds_open.set(n as i64);
        }
        // The last value stays; the store's own failure shows on every route.
        Err(e) => tracing::warn!(event = "metrics_open_holds_failed", detail = %e),
    }
    read_outbox(&state).await;
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &metrics.registry) {
        return crate::ApiError::internal(&e).into_response();
    }
    let mut resp = out.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    resp
}

/// The outbox's gauges, read from the store at each scrape (the last values
/// stay when the store cannot answer; its failure shows on every route).
async fn read_outbox(state: &AppState) {
    let (metrics, store) = (&state.metrics, state.engine.store());
    match store.webhook_backlog().await {
        Ok(backlog) => {
            let now = state.webhooks.clock.now_ms();
            // Only the endpoints that exist now: a deleted one leaves no gauge.
            metrics.webhook_backlog.clear();
            metrics.webhook_backlog_age.clear();
            for b in backlog {
                let labels = EndpointLabels {
                    endpoint: b.endpoint_id,
                };
                metrics
                    .webhook_backlog
                    .get_or_create(&labels)
                    .set(b.pending as i64);
                let age_s = b.oldest_created_at.map_or(0, |t| (now - t).max(0) / 1000);
                metrics
                    .webhook_backlog_age
                    .get_or_create(&labels)
                    .set(age_s);
            }
        }
        Err(e) => tracing::warn!(event = "metrics_webhook_backlog_failed", detail = %e),
    }
    match store.last_event_seq().await {
        Ok(seq) => {
            metrics.events_last_seq.set(seq);
        }
        Err(e) => tracing::warn!(event = "metrics_events_failed", detail = %e),
    }
}

impl Metrics {
    /// One webhook attempt ended with `outcome`.
    pub fn webhook_attempt(&self, outcome: &'static str) {
        self.webhook_attempts
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }
}

/// Exports the store's own counters ([`payguard::Store::counters`]) at each scrape.
struct StoreCounters(Arc<dyn payguard::Store>);

impl std::fmt::Debug for StoreCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoreCounters({})", self.0.kind())
    }
}

impl prometheus_client::collector::Collector for StoreCounters {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        for c in self.0.counters() {
            let name = format!("store_{}", c.name);
            let metric = encoder.encode_descriptor(
                &name,
                c.help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            prometheus_client::metrics::counter::ConstCounter::new(c.value).encode(metric)?;
        }
        Ok(())
    }
}
