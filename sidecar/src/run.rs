//! Wiring: the admin server at once, then the SVID, then the bundle stream.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::{self, AdminState};
use crate::bundle::{BundleWatch, Snapshot};
use crate::config::Config;
use crate::control_plane::{ControlPlane, ControlPlaneError, KEEP_ALIVE_MAX_AGE};
use crate::identity::{CredentialStore, Credentials, Identity, SystemClock};
use crate::listen;
use crate::metrics::{Metrics, MetricsError};
use crate::pricing::Pricing;
use crate::proxy::{Proxy, Wiring};
use crate::spend::Spend;
use crate::telemetry::{self, Telemetry};

/// Why the sidecar cannot start; each names the flag to check.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot read --ca-file {path}")]
    CaFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    ControlPlane(#[from] ControlPlaneError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("cannot listen on --admin {addr}; is another process using it?")]
    Admin {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen on {flag} {addr}; is another process using it?")]
    Listen {
        flag: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot use --pricing {path}: {reason}")]
    Pricing { path: PathBuf, reason: String },
    #[error("cannot set up the run-context seal: {0}")]
    Seal(#[from] crate::context::ContextError),
    #[error(transparent)]
    DecisionLog(#[from] crate::telemetry::decisions::DecisionLogError),
    #[error(transparent)]
    Otlp(#[from] crate::telemetry::otlp::OtlpError),
}

/// A started sidecar: what it publishes, and its tasks.
pub struct Running {
    /// Where the admin server listens (useful with port 0).
    pub admin_addr: SocketAddr,
    /// Where the agent calls out.
    pub outbound_addr: SocketAddr,
    /// Where other sidecars call in.
    pub inbound_addr: SocketAddr,
    pub credentials: watch::Receiver<Option<Arc<Credentials>>>,
    pub snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    pub metrics: Metrics,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops every task. Nothing is in flight that must complete: an interrupted CSR or ack is
    /// simply made again by the next sidecar process.
    pub async fn shutdown(self) {
        for task in &self.tasks {
            task.abort();
        }
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// This sidecar among its agent's others: the pod name in Kubernetes (`HOSTNAME`), plus the
/// process id, which tells apart several sidecars on one machine.
fn instance_name() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "sidecar".to_owned());
    let name: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        .take(100)
        .collect();
    format!("{name}:{}", std::process::id())
}

/// Starts the sidecar's tasks on the current runtime and returns once the admin server listens.
pub async fn start(config: &Config) -> Result<Running, StartError> {
    let metrics = Metrics::new()?;
    let ca_pem = tokio::fs::read(&config.ca_file)
        .await
        .map_err(|source| StartError::CaFile {
            path: config.ca_file.clone(),
            source,
        })?;
    let store = CredentialStore::new();
    let control_plane = ControlPlane::new(
        &config.control_plane,
        &ca_pem,
        store.resolver(),
        config.tuning.request_timeout,
        &instance_name(),
    )?;
    let identity = Identity::new(
        config.agent.clone(),
        control_plane.clone(),
        SystemClock,
        config.token_file.clone(),
        config.tuning.identity_backoff,
        store.clone(),
        metrics.clone(),
    );
    let watch = BundleWatch::new(
        config.agent.clone(),
        control_plane,
        store.subscribe(),
        metrics.clone(),
        config.tuning.watch,
    );
    let listener = TcpListener::bind(config.admin)
        .await
        .map_err(|source| StartError::Admin {
            addr: config.admin,
            source,
        })?;
    let admin_addr = listener.local_addr().map_err(|source| StartError::Admin {
        addr: config.admin,
        source,
    })?;
    let bind = |flag: &'static str, addr: SocketAddr| async move {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Listen { flag, addr, source })?;
        let local = l
            .local_addr()
            .map_err(|source| StartError::Listen { flag, addr, source })?;
        Ok::<_, StartError>((l, local))
    };
    let (outbound, outbound_addr) = bind("--outbound", config.outbound).await?;
    let (inbound, inbound_addr) = bind("--inbound", config.inbound).await?;
    let budget_client = ControlPlane::new(
        config.budget.as_deref().unwrap_or(&config.control_plane),
        &ca_pem,
        store.resolver(),
        config.tuning.request_timeout,
        &instance_name(),
    )?
    .keep_alive(KEEP_ALIVE_MAX_AGE);
    let exporter = telemetry::otlp::from_env(&config.agent)?;
    let (ledger_tx, ledger_rx) = telemetry::ledger::queue();
    let (span_tx, span_rx) = match &exporter {
        Some(_) => {
            let (tx, rx) = telemetry::otlp::queue();
            (Some(tx), Some(rx))
        }
        None => (None, None),
    };
    let mut telemetry = Telemetry::new(span_tx, Some(ledger_tx), metrics.clone());
    let mut telemetry_tasks = vec![tokio::spawn(telemetry::ledger::run(
        ledger_rx,
        budget_client.clone(),
        metrics.clone(),
    ))];
    if config.decision_log != telemetry::decisions::Level::Off {
        let out = telemetry::decisions::open(config.decision_log_file.as_deref()).await?;
        let (log, rx) = telemetry::decisions::DecisionLog::new(
            config.decision_log,
            telemetry::decisions::DECISION_QUEUE,
        );
        telemetry = telemetry.with_decisions(log);
        telemetry_tasks.push(tokio::spawn(telemetry::decisions::write(
            rx,
            out,
            metrics.clone(),
        )));
    }
    if let (Some(exporter), Some(rx)) = (exporter, span_rx) {
        telemetry_tasks.push(tokio::spawn(exporter.run(rx, metrics.clone())));
    }
    let spend = Arc::new(Spend::new(budget_client));
    let mut pricing = Pricing::default_table();
    if let Some(path) = &config.pricing {
        let text = tokio::fs::read_to_string(path)
            .await
            .map_err(|source| StartError::Pricing {
                path: path.clone(),
                reason: source.to_string(),
            })?;
        let table = Pricing::from_json(&text).map_err(|e| StartError::Pricing {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        pricing.merge_override(table);
    }
    let proxy = Arc::new(Proxy::new(Wiring {
        agent: config.agent.clone(),
        snapshots: watch.subscribe(),
        credentials: store.subscribe(),
        metrics: metrics.clone(),
        app: config.app,
        outbound: outbound_addr,
        spend: spend.clone(),
        pricing: Arc::new(pricing),
        telemetry,
        mesh_http1_per_peer: config.tuning.mesh_http1_per_peer,
    })?);
    let state = AdminState {
        agent: config.agent.clone(),
        credentials: store.subscribe(),
        svid_problem: identity.problems(),
        snapshots: watch.subscribe(),
        bundle_problem: watch.problems(),
        metrics: metrics.clone(),
    };
    let mut running = Running {
        admin_addr,
        outbound_addr,
        inbound_addr,
        credentials: store.subscribe(),
        snapshots: watch.subscribe(),
        metrics,
        tasks: vec![
            tokio::spawn(admin::serve(listener, state)),
            tokio::spawn(identity.run()),
            tokio::spawn(watch.run()),
            tokio::spawn(listen::serve_outbound(outbound, proxy.clone())),
            tokio::spawn(listen::serve_inbound(inbound, proxy)),
            tokio::spawn(spend.clone().run_reporter()),
            tokio::spawn(spend.run_halts()),
        ],
    };
    running.tasks.extend(telemetry_tasks);
    tracing::info!(
        agent = %config.agent,
        control_plane = %config.control_plane,
        admin = %admin_addr,
        outbound = %outbound_addr,
        inbound = %inbound_addr,
        app = %config.app,
        "sidecar started"
    );
    Ok(running)
}
