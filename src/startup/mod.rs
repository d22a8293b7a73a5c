//! Build, then run: [`App::build`] checks nothing more (config is already
//! valid), installs the metrics recorder before anything can emit, binds
//! every listener (port 0 allowed), wires the accounts, the budget backend
//! and the service, and exposes the bound addresses;
//! [`App::run_until_stopped`] serves until the shutdown future completes,
//! then drains within the grace period. Imports everything; nothing imports it
//! but `main`, `demo` and `testing`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::auth::Authenticator;
use crate::budget::{Backend, WallClock};
use crate::config::{BackendConfig, Config};
use crate::grpc::{Accounts, CallLimits, Gateway, OperationsService};
use crate::idempotency::Records;
use crate::pb::association_service_server::AssociationServiceServer;
use crate::proto::google::longrunning::operations_server::OperationsServer;
use crate::telemetry::refusals::SUMMARY_INTERVAL;
use crate::telemetry::{GrpcTraceLayer, metrics};
use crate::upstream::Upstream;

mod http;
mod methods;
mod tls;

/// Largest request message tonic decodes at all (a memory guard, refused
/// with a bare OUT_OF_RANGE). The handler refuses anything over its 4 KiB
/// (`MAX_REQUEST_BYTES` in `grpc/service.rs`) with the gateway's ErrorInfo.
const MAX_DECODED_BYTES: usize = 64 * 1024;

/// Longest a TLS handshake on the gRPC listener may take.
pub(crate) const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle time before TCP keepalive probes on accepted gRPC connections
/// (plain TCP; `tls.rs` sets the same on TLS ones).
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// A built gateway: listeners bound, not yet serving.
pub struct App {
    grpc: TcpListener,
    metrics: TcpListener,
    gateway: Gateway,
    accounts: Arc<Accounts>,
    backend: Backend,
    tls: Option<Arc<tls::Tls>>,
    shutdown_grace: Duration,
}

impl App {
    /// Binds the gRPC and metrics listeners and wires the service.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        Self::build_with(config, WallClock::default()).await
    }

    /// [`Self::build`], with this replica's wall clock as `clock` reads it
    /// (tests skew it; only `/healthz`'s skew figure uses it).
    pub(crate) async fn build_with(config: Config, clock: WallClock) -> anyhow::Result<Self> {
        // Before anything that emits (the Redis backend sets its gauges).
        metrics::handle();
        let grpc = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot bind --listen {}", config.listen))?;
        let metrics = TcpListener::bind(config.metrics_listen)
            .await
            .with_context(|| format!("cannot bind --metrics-listen {}", config.metrics_listen))?;
        let backend = Backend::start(&config.backend, clock)
            .await
            .context("cannot set up the budget backend")?;
        let accounts = Accounts::build(&config, &backend).map_err(anyhow::Error::msg)?;
        let accounts = Arc::new(accounts);
        let upstream = Upstream::new(config.upstream_timeout, config.upstream_proxy.as_ref())
            .context("cannot build the HTTP client")?;
        let limits = CallLimits {
            upstream_timeout: config.upstream_timeout,
            upstream_reserve: config.budget.upstream_reserve,
            default_deadline: config.default_deadline(),
        };
        if !config.auth.required() {
            tracing::warn!(
                "no caller authentication configured (--client-ca or [[callers]] tokens): \
                 every caller is anonymous"
            );
        }
        let auth = Authenticator::new(&config.auth, &config.accounts);
        let tls = config
            .auth
            .tls
            .as_ref()
            .map(tls::Tls::new)
            .transpose()
            .map_err(anyhow::Error::msg)
            .context("invalid --tls-cert/--tls-key/--client-ca")?
            .map(Arc::new);
        // Request ids are kept where the budget is: in Redis, every replica
        // sees them.
        let max_entries = config.idempotency_max_entries;
        let records = match (&config.backend, backend.redis()) {
            (BackendConfig::Redis(redis), Some(shared)) => Records::redis(
                max_entries,
                Arc::clone(shared),
                &redis.key_prefix,
                redis.fallback,
            ),
            _ => Records::memory(max_entries),
        };
        let operations = crate::operations::start(&config.backend, config.operation_retention);
        let gateway = Gateway::new(
            Arc::clone(&accounts),
            auth,
            upstream,
            limits,
            records,
            operations,
        );
        Ok(Self {
            grpc,
            metrics,
            gateway,
            accounts,
            backend,
            tls,
            shutdown_grace: config.shutdown_grace,
        })
    }

    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The bound metrics address.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `shutdown` completes; then reports NOT_SERVING, answers
    /// queued callers with UNAVAILABLE, lets in-flight calls finish, and
    /// returns within the grace period.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<AssociationServiceServer<Gateway>>()
            .await;
        health
            .set_serving::<OperationsServer<OperationsService>>()
            .await;
        // Each build_* consumes its builder. google.rpc error details are
        // registered so grpcurl can decode ErrorInfo/BadRequest/RetryInfo.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;
        let refusals = self.gateway.refusals();
        let operations = OperationsServer::new(OperationsService::new(self.gateway.clone()));
        // Batch drainers stop at shutdown, leaving what is queued.
        let stop_draining = CancellationToken::new();
        let mut drainers = tokio::spawn(crate::grpc::drain_all(
            self.gateway.clone(),
            stop_draining.clone(),
        ));
        let service = methods::ByMethod {
            single: AssociationServiceServer::new(self.gateway.clone())
                .max_decoding_message_size(MAX_DECODED_BYTES),
            batch: AssociationServiceServer::new(self.gateway)
                .max_decoding_message_size(methods::MAX_BATCH_BYTES),
        };

        let stop = CancellationToken::new();
        let grpc_addr = self.grpc.local_addr()?;
        let metrics_addr = self.metrics.local_addr()?;
        let keys = self
            .accounts
            .iter()
            .map(|a| (a.name().to_owned(), Arc::clone(&a.key)))
            .collect();
        let reload = tokio::spawn(crate::keys::watch(keys));
        let router = Server::builder()
            // The server span wraps everything of a call, including tonic's
            // decoding and size limits, so refusals there are traced too.
            .layer(GrpcTraceLayer)
            // Keepalive finds dead callers (and keeps NATs and load balancers
            // from dropping idle HTTP/2 connections).
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .max_concurrent_streams(Some(1024))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(service)
            .add_service(operations);
        let stopped = stop.clone().cancelled_owned();
        let (grpc, tls_reload): (BoxFuture<'static, _>, _) = match self.tls {
            // TLS by our own acceptor (`tls.rs`): the certificate rotates,
            // and a handshake that never comes is dropped after
            // TLS_HANDSHAKE_TIMEOUT. Client certificates are required, not
            // optional, with --client-ca: a call without a valid one never
            // reaches the service.
            Some(tls) => {
                let incoming = tls::incoming(
                    self.grpc,
                    Arc::clone(&tls),
                    TLS_HANDSHAKE_TIMEOUT,
                    stop.clone(),
                );
                let reload = tokio::spawn(tls::watch(tls));
                let serve = router.serve_with_incoming_shutdown(incoming, stopped);
                (Box::pin(serve), Some(reload))
            }
            None => {
                // TCP_NODELAY, as `Server::serve` would set: an answer that
                // completes after its HEADERS were flushed goes out as a
                // second small write, which Nagle would hold for the
                // caller's delayed ACK (40 ms on Linux). TCP keepalive finds
                // callers that vanished without a FIN (a node gone, a NAT
                // that forgot the flow).
                let incoming = TcpIncoming::from(self.grpc)
                    .with_nodelay(Some(true))
                    .with_keepalive(Some(TCP_KEEPALIVE));
                let serve = router.serve_with_incoming_shutdown(incoming, stopped);
                (Box::pin(serve), None)
            }
        };
        let mut grpc = tokio::spawn(grpc);
        let prometheus = metrics::handle();
        let upkeep = tokio::spawn({
            let prometheus = prometheus.clone();
            async move {
                // Histograms are folded into their buckets here, off the request path.
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tick.tick().await;
                    prometheus.run_upkeep();
                }
            }
        });
        let summaries = tokio::spawn({
            let refusals = Arc::clone(&refusals);
            async move {
                let mut tick = tokio::time::interval(SUMMARY_INTERVAL);
                tick.tick().await; // the first tick is now
                loop {
                    tick.tick().await;
                    refusals.summarize();
                }
            }
        });
        let metrics = tokio::spawn(http::serve(
            self.metrics,
            http::router(prometheus, self.backend),
            stop.clone(),
        ));
        tracing::info!(%grpc_addr, %metrics_addr, "serving");

        tokio::select! {
            () = shutdown => {}
            res = &mut grpc => {
                stop.cancel();
                return res?.context("gRPC server failed");
            }
        }

        tracing::info!(grace = ?self.shutdown_grace, "shutting down: NOT_SERVING, draining");
        // Queued and new calls get SHUTTING_DOWN from here on; then probes
        // see NOT_SERVING while in-flight calls finish.
        self.accounts.iter().for_each(|a| a.line.close());
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        health
            .set_not_serving::<AssociationServiceServer<Gateway>>()
            .await;
        health
            .set_not_serving::<OperationsServer<OperationsService>>()
            .await;
        stop.cancel();
        stop_draining.cancel();
        let grace_ends = tokio::time::Instant::now() + self.shutdown_grace;
        match tokio::time::timeout_at(grace_ends, &mut grpc).await {
            Ok(res) => res?.context("gRPC server failed while draining")?,
            Err(_) => {
                tracing::warn!("shutdown grace elapsed with calls still in flight");
                grpc.abort();
            }
        }
        // A batch request in flight upstream finishes and is recorded.
        if tokio::time::timeout_at(grace_ends, &mut drainers)
            .await
            .is_err()
        {
            tracing::warn!("shutdown grace elapsed with a batch request still in flight");
            drainers.abort();
        }
        let _ = metrics.await;
        upkeep.abort();
        summaries.abort();
        if let Some(tls_reload) = tls_reload {
            tls_reload.abort();
        }
        // What the last interval held back, so no refusal goes uncounted.
        refusals.summarize();
        reload.abort();
        tracing::info!("stopped");
        Ok(())
    }
}

/// Completes on the first SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}
