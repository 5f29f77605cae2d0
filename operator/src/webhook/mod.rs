//! The admission webhooks: sidecar injection for pods and validation for AgentPolicies.
//!
//! - `inject` — pure: whether a pod opts in, its Agent, and the JSONPatch that adds the sidecar.
//! - `validate` — pure: an AgentPolicy judged by the same compiler that builds bundles.
//! - `view` — what admission reads from the cluster (namespace labels, Agents); a test seam.
//! - `server` — AdmissionReview v1 over HTTP: `/inject`, `/validate`, `/healthz`.
//! - `certs` — the serving certificate from the trust domain's CA, renewed behind a rustls
//!   resolver so rotation needs no restart.
//! - `ca_bundle` — keeps the webhook configurations' `caBundle` equal to the CA.
//!
//! [`run`] wires them: it is what `ringfence webhook` runs, and what the operator runs beside
//! its controllers.

pub mod ca_bundle;
pub mod certs;
pub mod inject;
pub mod server;
pub mod validate;
pub mod view;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use tokio::sync::watch;

use crate::identity::Identity;

pub use server::Webhook;
pub use view::{ClusterView, KubeView};

/// The webhook's flags (flattened into `ringfence operator` and `ringfence webhook`).
#[derive(clap::Args, Debug, Clone)]
pub struct WebhookOptions {
    /// Where the admission webhook serves HTTPS (the `ringfence-webhook` Service targets it).
    #[arg(long, env = "RINGFENCE_WEBHOOK_LISTEN", default_value = "0.0.0.0:9443")]
    pub webhook_listen: SocketAddr,
    /// The Service in front of the webhook; its DNS names go into the serving certificate.
    #[arg(
        long,
        env = "RINGFENCE_WEBHOOK_SERVICE",
        default_value = "ringfence-webhook"
    )]
    pub webhook_service: String,
    /// The MutatingWebhookConfiguration and ValidatingWebhookConfiguration (same name) whose
    /// caBundle is kept equal to the trust domain's CA.
    #[arg(long, env = "RINGFENCE_WEBHOOK_CONFIG", default_value = "ringfence")]
    pub webhook_config: String,
    /// The sidecar image injected into pods.
    #[arg(
        long,
        env = "RINGFENCE_SIDECAR_IMAGE",
        default_value = concat!("ghcr.io/ringfence/ringfence-sidecar:", env!("CARGO_PKG_VERSION"))
    )]
    pub sidecar_image: String,
    #[arg(
        long,
        env = "RINGFENCE_SIDECAR_PULL_POLICY",
        default_value = "IfNotPresent"
    )]
    pub sidecar_pull_policy: String,
    /// Inject a native sidecar (an init container with restartPolicy Always, Kubernetes 1.29+):
    /// `auto` asks the API server's version.
    #[arg(long, env = "RINGFENCE_NATIVE_SIDECARS", value_enum, default_value_t = NativeSidecars::Auto)]
    pub native_sidecars: NativeSidecars,
    #[arg(long, env = "RINGFENCE_SIDECAR_CPU_REQUEST", default_value = "50m")]
    pub sidecar_cpu_request: String,
    #[arg(long, env = "RINGFENCE_SIDECAR_MEMORY_REQUEST", default_value = "64Mi")]
    pub sidecar_memory_request: String,
    #[arg(long, env = "RINGFENCE_SIDECAR_CPU_LIMIT")]
    pub sidecar_cpu_limit: Option<String>,
    #[arg(long, env = "RINGFENCE_SIDECAR_MEMORY_LIMIT", default_value = "256Mi")]
    pub sidecar_memory_limit: String,
    /// The control plane URL given to sidecars [default: https://ringfence.<namespace>.svc:15012].
    #[arg(long, env = "RINGFENCE_SIDECAR_CONTROL_PLANE")]
    pub sidecar_control_plane: Option<String>,
    /// The budget service URL given to sidecars
    /// [default: https://ringfence-budget.<namespace>.svc:15013].
    #[arg(long, env = "RINGFENCE_SIDECAR_BUDGET")]
    pub sidecar_budget: Option<String>,
    /// OTLP endpoint for the sidecars' traces (set as their OTEL_EXPORTER_OTLP_ENDPOINT).
    #[arg(long, env = "RINGFENCE_SIDECAR_OTLP_ENDPOINT")]
    pub sidecar_otlp_endpoint: Option<String>,
    /// More namespaces never injected (kube-system and the operator's own always are).
    #[arg(long = "exclude-namespace", value_name = "NAMESPACE")]
    pub exclude_namespaces: Vec<String>,
}

/// Which kind of sidecar to inject.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum NativeSidecars {
    Auto,
    Always,
    Never,
}

/// Why the webhook could not start.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error(transparent)]
    Cert(#[from] certs::CertError),
    #[error("cannot listen on {addr}: {source}; pick another address with --webhook-listen")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The DNS names of the webhook's Service, for its serving certificate.
pub fn serving_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

/// Whether a server of this version runs native sidecars (on by default from 1.29). Minor
/// versions come as e.g. `"29"` or `"29+"`.
pub fn supports_native_sidecars(major: &str, minor: &str) -> Option<bool> {
    let digits = |s: &str| -> Option<u32> {
        let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        s.get(..end)?.parse().ok()
    };
    Some((digits(major)?, digits(minor)?) >= (1, 29))
}

impl WebhookOptions {
    /// The injection settings for an operator running in `namespace`.
    pub fn settings(&self, namespace: &str, native_sidecar: bool) -> inject::Settings {
        let mut requests = BTreeMap::from([
            ("cpu".to_owned(), Quantity(self.sidecar_cpu_request.clone())),
            (
                "memory".to_owned(),
                Quantity(self.sidecar_memory_request.clone()),
            ),
        ]);
        requests.retain(|_, q| !q.0.is_empty());
        let mut limits = BTreeMap::from([(
            "memory".to_owned(),
            Quantity(self.sidecar_memory_limit.clone()),
        )]);
        if let Some(cpu) = &self.sidecar_cpu_limit {
            limits.insert("cpu".to_owned(), Quantity(cpu.clone()));
        }
        limits.retain(|_, q| !q.0.is_empty());
        let mut excluded: std::collections::BTreeSet<String> =
            self.exclude_namespaces.iter().cloned().collect();
        excluded.insert(namespace.to_owned());
        inject::Settings {
            image: self.sidecar_image.clone(),
            pull_policy: self.sidecar_pull_policy.clone(),
            control_plane: self
                .sidecar_control_plane
                .clone()
                .unwrap_or_else(|| format!("https://ringfence.{namespace}.svc:15012")),
            budget: self
                .sidecar_budget
                .clone()
                .unwrap_or_else(|| format!("https://ringfence-budget.{namespace}.svc:15013")),
            native_sidecar,
            resources: ResourceRequirements {
                requests: (!requests.is_empty()).then_some(requests),
                limits: (!limits.is_empty()).then_some(limits),
                ..Default::default()
            },
            otlp_endpoint: self.sidecar_otlp_endpoint.clone(),
            excluded_namespaces: excluded,
        }
    }

    async fn native_sidecar(&self, client: &kube::Client) -> bool {
        match self.native_sidecars {
            NativeSidecars::Always => true,
            NativeSidecars::Never => false,
            NativeSidecars::Auto => match client.apiserver_version().await {
                Ok(v) => supports_native_sidecars(&v.major, &v.minor).unwrap_or_else(|| {
                    tracing::warn!(major = %v.major, minor = %v.minor, "unrecognised server version; injecting regular sidecars (--native-sidecars always overrides)");
                    false
                }),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the server version; injecting regular sidecars (--native-sidecars always overrides)");
                    false
                }
            },
        }
    }
}

/// Serves the admission webhooks for an operator in `namespace` until `shutdown`: issues the
/// serving certificate from `identity`'s CA (and renews it), keeps the webhook configurations'
/// caBundle current, and answers AdmissionReviews.
pub async fn run(
    opts: WebhookOptions,
    namespace: String,
    client: kube::Client,
    identity: Arc<Identity>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), WebhookError> {
    let names = serving_names(&opts.webhook_service, &namespace);
    let first = certs::issue(&identity, &names)?;
    let (cert_tx, cert_rx) = watch::channel(first.key);
    let tls = Arc::new(certs::server_config(cert_rx)?);
    let listener = tokio::net::TcpListener::bind(opts.webhook_listen)
        .await
        .map_err(|source| WebhookError::Listen {
            addr: opts.webhook_listen,
            source,
        })?;

    let native = opts.native_sidecar(&client).await;
    let webhook = Arc::new(Webhook {
        settings: opts.settings(&namespace, native),
        view: KubeView::new(client.clone()),
    });
    tracing::info!(
        listen = %opts.webhook_listen,
        names = %names.join(", "),
        native_sidecars = native,
        "admission webhook serving"
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let renew = tokio::spawn(certs::renew(
        identity.clone(),
        names,
        first.renew_at,
        cert_tx,
        stopped(),
    ));
    let bundle = tokio::spawn(ca_bundle::keep(
        client,
        opts.webhook_config.clone(),
        identity.trust_bundle_pem().to_owned(),
        stopped(),
    ));
    let handler = move |_peer, req| {
        let webhook = webhook.clone();
        async move { webhook.handle(req).await }
    };
    crate::distribute::serve_tls(listener, tls, handler, shutdown).await;
    let _ = stop_tx.send(true);
    let _ = tokio::join!(renew, bundle);
    Ok(())
}
