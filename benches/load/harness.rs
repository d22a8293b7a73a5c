//! Closed-loop load and its measurement: `concurrency` workers each send one
//! call, wait for the answer, record its latency in an HDR histogram and send
//! the next, until the round ends. Compared systems are run in short
//! interleaved rounds ([`interleave`]) so machine noise hits them all alike.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use provisioning_gateway::domain::Association;
use provisioning_gateway::pb::DeleteAssociationRequest;
use provisioning_gateway::pb::association_service_client::AssociationServiceClient;
use serde_json::{Value, json};
use tonic::transport::{Channel, Endpoint};
use tonic_types::StatusExt;

pub const API_KEY: &str = "bench-api-key-0123456789";

/// Latencies are recorded in nanoseconds, from 1 ns to 10 minutes.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("constant bounds are valid")
}

/// What one system did over one or more rounds.
#[derive(Clone)]
pub struct Sample {
    pub latency: Histogram<u64>,
    /// Answers by label: `OK`, `HTTP 204`, `ResourceExhausted/BUDGET_EXHAUSTED/deadline`, ...
    pub outcomes: BTreeMap<String, u64>,
    /// Wall time spent sending (sum over rounds).
    pub busy: Duration,
    /// p50 of each round on its own, to show the spread between rounds.
    pub round_p50s: Vec<u64>,
}

impl Sample {
    fn new() -> Self {
        Self {
            latency: histogram(),
            outcomes: BTreeMap::new(),
            busy: Duration::ZERO,
            round_p50s: Vec::new(),
        }
    }

    fn merge(&mut self, other: &Sample) {
        self.latency
            .add(&other.latency)
            .expect("histograms share their bounds");
        for (k, v) in &other.outcomes {
            *self.outcomes.entry(k.clone()).or_default() += v;
        }
        self.busy += other.busy;
        self.round_p50s.push(other.latency.value_at_quantile(0.5));
    }

    pub fn p(&self, q: f64) -> Duration {
        Duration::from_nanos(self.latency.value_at_quantile(q))
    }

    pub fn calls(&self) -> u64 {
        self.latency.len()
    }

    /// Answers per second of sending time.
    pub fn throughput(&self) -> f64 {
        self.calls() as f64 / self.busy.as_secs_f64().max(1e-9)
    }

    pub fn count(&self, prefix: &str) -> u64 {
        self.outcomes
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v)
            .sum()
    }

    pub fn to_json(&self) -> Value {
        let us = |q| self.p(q).as_secs_f64() * 1e6;
        json!({
            "calls": self.calls(),
            "throughput_per_s": self.throughput(),
            "p50_us": us(0.5), "p90_us": us(0.9), "p99_us": us(0.99), "p999_us": us(0.999),
            "max_us": self.latency.max() as f64 / 1e3,
            "mean_us": self.latency.mean() / 1e3,
            "round_p50s_us": self.round_p50s.iter().map(|n| *n as f64 / 1e3).collect::<Vec<_>>(),
            "outcomes": self.outcomes,
        })
    }
}

/// Something to send one call to.
#[derive(Clone)]
pub enum Target {
    /// `DeleteAssociation` over gRPC, spread over several HTTP/2 connections.
    Grpc {
        clients: Arc<Vec<AssociationServiceClient<Channel>>>,
        /// The caller's deadline (`grpc-timeout`), if any.
        timeout: Option<Duration>,
    },
    /// The gateway's upstream request, sent straight to the upstream.
    Http {
        client: reqwest::Client,
        url: String,
        body: Vec<u8>,
    },
}

/// A request no other call in this run sends: the gateway coalesces
/// identical concurrent calls into one upstream call, and a benchmark of many
/// callers must not measure that shortcut instead of the path.
pub fn request() -> DeleteAssociationRequest {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    DeleteAssociationRequest {
        resource_type: provisioning_gateway::pb::ResourceType::Number as i32,
        channel: provisioning_gateway::pb::Channel::Sms as i32,
        application_id: "bench-application".into(),
        entity_id: Some("bench-entity".into()),
        resource_id: format!("bench-{:012}", NEXT.fetch_add(1, Ordering::Relaxed)),
        ..Default::default()
    }
}

impl Target {
    /// gRPC to `addr` over `connections` HTTP/2 connections.
    pub async fn grpc(
        addr: std::net::SocketAddr,
        connections: usize,
        timeout: Option<Duration>,
    ) -> anyhow::Result<Self> {
        let mut clients = Vec::new();
        for _ in 0..connections.max(1) {
            let channel = Endpoint::from_shared(format!("http://{addr}"))?
                .connect()
                .await?;
            clients.push(AssociationServiceClient::new(channel));
        }
        Ok(Self::Grpc {
            clients: Arc::new(clients),
            timeout,
        })
    }

    /// The same DELETE the gateway sends (body, headers, client settings).
    pub fn http(upstream: std::net::SocketAddr) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .user_agent(provisioning_gateway::USER_AGENT)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let body = Association::try_from(request())
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .to_json();
        Ok(Self::Http {
            client,
            url: format!("http://{upstream}{}", provisioning_gateway::mock::PATH),
            body,
        })
    }

    /// Sends one call; returns the outcome label.
    pub async fn call(&self, worker: usize) -> String {
        match self {
            Self::Grpc { clients, timeout } => {
                let mut client = clients[worker % clients.len()].clone();
                let mut req = tonic::Request::new(request());
                if let Some(t) = timeout {
                    req.set_timeout(*t);
                }
                match client.delete_association(req).await {
                    Ok(_) => "OK".into(),
                    Err(status) => label(&status),
                }
            }
            Self::Http { client, url, body } => {
                let sent = client
                    .delete(url)
                    .header("authorization", format!("App {API_KEY}"))
                    .header("content-type", "application/json")
                    .header("accept", "application/json")
                    .body(body.clone())
                    .send()
                    .await;
                match sent {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let _ = r.bytes().await;
                        format!("HTTP {status}")
                    }
                    Err(_) => "HTTP error".into(),
                }
            }
        }
    }
}

/// `Code/REASON/rejection` of a status, as a real caller would read it.
pub fn label(status: &tonic::Status) -> String {
    let details = status.get_error_details();
    match details.error_info() {
        Some(info) => match info.metadata.get("rejection") {
            Some(r) => format!("{:?}/{}/{r}", status.code(), info.reason),
            None => format!("{:?}/{}", status.code(), info.reason),
        },
        None => format!("{:?}/no-details", status.code()),
    }
}

/// Runs `concurrency` closed-loop workers against `target` for `duration`.
pub async fn run(target: &Target, concurrency: usize, duration: Duration) -> Sample {
    let started = Instant::now();
    let end = started + duration;
    let workers = (0..concurrency).map(|worker| {
        let target = target.clone();
        tokio::spawn(async move {
            let mut sample = Sample::new();
            while Instant::now() < end {
                let t0 = Instant::now();
                let outcome = target.call(worker).await;
                sample
                    .latency
                    .saturating_record(t0.elapsed().as_nanos() as u64);
                *sample.outcomes.entry(outcome).or_default() += 1;
            }
            sample
        })
    });
    let mut total = Sample::new();
    for w in futures::future::join_all(workers).await {
        let w = w.expect("a load worker panicked");
        total.latency.add(&w.latency).expect("same bounds");
        for (k, v) in w.outcomes {
            *total.outcomes.entry(k).or_default() += v;
        }
    }
    total.busy = started.elapsed();
    total
}

/// Round-robin rounds: every system gets a warm-up round (discarded), then
/// `rounds` rounds of `round` each, the order rotating every round.
pub async fn interleave(
    systems: &[(&str, Target)],
    concurrency: usize,
    rounds: usize,
    round: Duration,
) -> Vec<Sample> {
    for (_, target) in systems {
        run(target, concurrency, round.min(Duration::from_millis(500))).await;
    }
    let mut totals = vec![Sample::new(); systems.len()];
    for r in 0..rounds {
        for k in 0..systems.len() {
            let i = (r + k) % systems.len();
            let sample = run(&systems[i].1, concurrency, round).await;
            totals[i].merge(&sample);
        }
    }
    totals
}

/// Connections used for `concurrency` callers: one per 16 callers, 1..=8.
pub fn connections(concurrency: usize) -> usize {
    concurrency.div_ceil(16).clamp(1, 8)
}

/// `1.234 ms`-style formatting.
pub fn fmt(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 1e6 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}
