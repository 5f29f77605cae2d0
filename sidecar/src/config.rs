//! Command-line flags, each with an environment variable of the same meaning.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use ringfence_crds::spiffe::AgentKey;

use crate::backoff::Backoff;
use crate::bundle::WatchSettings;

/// The sidecar's configuration.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "ringfence-sidecar",
    version,
    about = "Ringfence sidecar: identity, policy and limits for one agent",
    long_about = "Ringfence sidecar: obtains this agent's X.509-SVID from the control plane, \
                  follows its policy bundle, and serves health, readiness and metrics on the \
                  admin address."
)]
pub struct Config {
    /// The agent this sidecar speaks for, as <namespace>/<name>.
    #[arg(long, env = "RINGFENCE_AGENT", value_name = "NAMESPACE/NAME")]
    pub agent: AgentKey,

    /// The control plane's URL, https://host:port. Its certificate must be signed by --ca-file
    /// and name that host.
    #[arg(long, env = "RINGFENCE_CONTROL_PLANE", value_name = "URL")]
    pub control_plane: String,

    /// PEM file with the trust domain's CA certificate(s), the only roots trusted for the
    /// control plane.
    #[arg(long, env = "RINGFENCE_CA_FILE", value_name = "PATH")]
    pub ca_file: PathBuf,

    /// File holding the bootstrap token that proves this agent's identity for the first SVID
    /// (sent as a bearer token; re-read at each request, so a projected token may rotate).
    #[arg(long, env = "RINGFENCE_TOKEN_FILE", value_name = "PATH")]
    pub token_file: Option<PathBuf>,

    /// Address of the admin server: /healthz, /readyz, /debug/bundle, /metrics.
    #[arg(
        long,
        env = "RINGFENCE_ADMIN",
        value_name = "ADDR",
        default_value = "127.0.0.1:15020"
    )]
    pub admin: SocketAddr,

    /// Where this agent calls out: other agents at /agents/<name>/…, MCP servers at
    /// /tools/<server>/…, and plain forward-proxy requests (HTTP_PROXY).
    #[arg(
        long,
        env = "RINGFENCE_OUTBOUND",
        value_name = "ADDR",
        default_value = "127.0.0.1:15001"
    )]
    pub outbound: SocketAddr,

    /// Where other agents' sidecars call this agent (mTLS only).
    #[arg(
        long,
        env = "RINGFENCE_INBOUND",
        value_name = "ADDR",
        default_value = "0.0.0.0:15006"
    )]
    pub inbound: SocketAddr,

    /// The agent app's own address: authorized inbound calls are forwarded there.
    #[arg(
        long,
        env = "RINGFENCE_APP",
        value_name = "ADDR",
        default_value = "127.0.0.1:8080"
    )]
    pub app: SocketAddr,

    /// The budget service's URL, https://host:port [default: the control plane's URL].
    #[arg(long, env = "RINGFENCE_BUDGET", value_name = "URL")]
    pub budget: Option<String>,

    /// A pricing file in LiteLLM's format, merged over the shipped table.
    #[arg(long, env = "RINGFENCE_PRICING", value_name = "PATH")]
    pub pricing: Option<PathBuf>,

    /// Which calls get a JSON decision line (run, caller, callee, method, decision, rule,
    /// status, latency, tokens, cost, depth, taint): `all`, only refused ones (`deny`), or none.
    #[arg(
        long,
        env = "RINGFENCE_DECISION_LOG",
        value_name = "LEVEL",
        value_enum,
        default_value = "all"
    )]
    pub decision_log: crate::telemetry::decisions::Level,

    /// Append decision lines to this file instead of standard output.
    #[arg(long, env = "RINGFENCE_DECISION_LOG_FILE", value_name = "PATH")]
    pub decision_log_file: Option<PathBuf>,

    /// Exit when the process that started this sidecar goes away (`ringfence local` starts its
    /// sidecars so; killed with -9, it could not stop them itself).
    #[arg(long)]
    pub exit_with_parent: bool,

    /// Timings that only tests change.
    #[arg(skip)]
    pub tuning: Tuning,
}

/// Retry and timeout settings; production uses the defaults.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// Backoff between attempts to obtain or renew the SVID.
    pub identity_backoff: Backoff,
    /// The bundle stream's reconnect backoff, idle timeout and line cap.
    pub watch: WatchSettings,
    /// Bound on connecting to the control plane and getting an answer to a request.
    pub request_timeout: Duration,
    /// Calls in flight to one peer over HTTP/1.1 before more go over HTTP/2.
    pub mesh_http1_per_peer: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            identity_backoff: Backoff::default(),
            watch: WatchSettings::default(),
            request_timeout: Duration::from_secs(15),
            mesh_http1_per_peer: crate::forward::H1_PER_PEER,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_with_defaults() {
        let c = Config::try_parse_from([
            "ringfence-sidecar",
            "--agent",
            "team-a/research",
            "--control-plane",
            "https://ringfence.ringfence-system.svc:8443",
            "--ca-file",
            "/var/run/ringfence/ca.pem",
        ])
        .unwrap();
        assert_eq!(c.agent, AgentKey::new("team-a", "research").unwrap());
        assert_eq!(c.admin, "127.0.0.1:15020".parse().unwrap());
        assert_eq!(c.token_file, None);
        assert_eq!(c.decision_log, crate::telemetry::decisions::Level::All);
        assert_eq!(c.decision_log_file, None);
    }

    #[test]
    fn an_agent_without_a_namespace_is_refused() {
        let err = Config::try_parse_from([
            "ringfence-sidecar",
            "--agent",
            "research",
            "--control-plane",
            "https://cp:8443",
            "--ca-file",
            "ca.pem",
        ])
        .unwrap_err();
        assert!(err.to_string().contains("<namespace>/<name>"), "{err}");
    }
}
