//! The product as a user runs it on one machine: `ringfence local DIR --spawn-sidecars` on a
//! manifest folder written by the test, one real `ringfence-sidecar` process per agent (real
//! mTLS between them), and the agents themselves started by the test on the app addresses the
//! manifests give.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use crate::{AgentPorts, Proc, binary, eventually, free_port, get, get_tls};

/// A running `ringfence local --spawn-sidecars`, its folder and where each agent listens.
pub struct LocalMesh {
    /// Dropped first (fields drop in order): SIGTERM stops the control plane and the sidecars
    /// it spawned before their folder goes.
    pub process: Proc,
    pub dir: tempfile::TempDir,
    /// The control plane (and budget service) endpoint.
    pub plane: SocketAddr,
    pub agents: BTreeMap<String, AgentPorts>,
}

impl LocalMesh {
    /// Writes `agents` (name, spec lines indented by two spaces) with their local addresses and
    /// `manifests` (policies, budgets) into a new folder, starts `ringfence local` on it with
    /// `env` set (for the sidecars it spawns), and waits until every sidecar is ready.
    pub async fn start(agents: &[(&str, &str)], manifests: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut ports = BTreeMap::new();
        let mut docs = Vec::new();
        for (name, spec) in agents {
            let p = AgentPorts::new(name);
            let spec = if spec.is_empty() {
                "  appPort: 8080"
            } else {
                spec
            };
            docs.push(p.manifest(spec));
            ports.insert((*name).to_owned(), p);
        }
        std::fs::write(dir.path().join("agents.yaml"), docs.join("---\n")).unwrap();
        std::fs::write(dir.path().join("policies.yaml"), manifests).unwrap();

        let plane = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut cmd = Command::new(binary("ringfence"));
        cmd.arg("local")
            .arg(dir.path())
            .arg("--spawn-sidecars")
            .args(["--listen", &plane.to_string()])
            .arg("--sidecar-bin")
            .arg(binary("ringfence-sidecar"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let process = Proc::spawn("ringfence local", &mut cmd).unwrap();
        let mesh = Self {
            process,
            dir,
            plane,
            agents: ports,
        };
        for a in mesh.agents.values() {
            eventually(
                Duration::from_secs(60),
                &format!("{}'s sidecar to be ready", a.name),
                || async {
                    get(a.admin, "/readyz")
                        .await
                        .ok()
                        .filter(|(status, _)| status.is_success())
                },
            )
            .await
            .unwrap_or_else(|e| panic!("{e}\nringfence local logged:\n{}", mesh.process.logs()));
        }
        mesh
    }

    pub fn ports(&self, agent: &str) -> &AgentPorts {
        &self.agents[agent]
    }

    /// The base URL `agent`'s app calls `callee` at: its sidecar's `/agents/<callee>` route.
    pub fn agent_url(&self, agent: &str, callee: &str) -> String {
        format!("http://{}/agents/{callee}", self.ports(agent).outbound)
    }

    /// `agent`'s sidecar's `/metrics`.
    pub async fn metrics(&self, agent: &str) -> String {
        get(self.ports(agent).admin, "/metrics")
            .await
            .map(|(_, text)| text)
            .unwrap_or_default()
    }

    /// A GET on the control plane's HTTPS endpoint (status, `/v1/runs`, ...), as JSON.
    pub async fn api(&self, path: &str) -> Option<serde_json::Value> {
        let ca = std::fs::read_to_string(self.dir.path().join(".ringfence/ca/cert.pem")).ok()?;
        let (status, body) = get_tls(self.plane, &ca, path).await.ok()?;
        status
            .is_success()
            .then(|| serde_json::from_str(&body).ok())
            .flatten()
    }
}
