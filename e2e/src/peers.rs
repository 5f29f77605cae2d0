//! Third-party peers: programs in `e2e/python/` built on the official A2A, MCP and OpenAI Python
//! SDKs, run with the virtual environment `bash hack/python-peers.sh` installs at pinned
//! versions. A test that needs them fails when they are missing; it never skips.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{Proc, eventually};

/// The venv's interpreter, or a failure that says how to install it.
pub fn python() -> PathBuf {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: the Python peers are not installed; run `bash hack/python-peers.sh`",
        python.display()
    );
    python
}

/// A program of `e2e/python/`.
pub fn script(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(name);
    assert!(path.exists(), "{} is missing", path.display());
    path
}

/// Starts a long-running peer (an agent or a tool server); it is stopped when dropped.
pub fn spawn(name: &str, program: &str, args: &[String]) -> Proc {
    Proc::spawn(
        name,
        Command::new(python())
            .arg(script(program))
            .args(args)
            // A peer never talks to a provider or a proxy of this machine by accident.
            .env_remove("OPENAI_API_KEY")
            .env_remove("OPENAI_BASE_URL")
            .env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .env_remove("ALL_PROXY")
            .env("NO_PROXY", "*"),
    )
    .unwrap_or_else(|e| panic!("cannot start {program}: {e}"))
}

/// Waits until a peer accepts connections on `addr` (a Python server takes about a second).
pub async fn wait_listening(peer: &Proc, addr: SocketAddr) {
    eventually(
        Duration::from_secs(30),
        &format!("{} to listen on {addr}", peer.name),
        || async { tokio::net::TcpStream::connect(addr).await.ok().map(|_| ()) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{} logged:\n{}", peer.name, peer.logs()));
}

/// Runs a client peer to completion and returns the JSON lines it printed (one per action).
/// Fails the test when it exits non-zero, prints anything but JSON lines, or takes over 60 s.
pub async fn run(program: &str, args: &[String]) -> Vec<serde_json::Value> {
    let out = tokio::process::Command::new(python())
        .arg(script(program))
        .args(args)
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        .env("NO_PROXY", "*")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .unwrap_or_else(|_| panic!("{program} did not finish within 60 s"))
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{program} failed ({}):\n{stderr}\n{stdout}",
        out.status
    );
    stdout
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{program} printed a line that is not JSON: {l:?}: {e}"))
        })
        .collect()
}

/// Starts `e2e/python/a2a_agent.py` as the agent `ports` describes: an A2A SDK agent on its app
/// address serving `binding` (`JSONRPC` or `HTTP+JSON`) in A2A 1.0, calling out through its
/// sidecar, and running `steps` on every message (see the program's help). Returns once it
/// listens.
pub async fn a2a_agent(ports: &crate::AgentPorts, binding: &str, steps: &[&str]) -> Proc {
    a2a_agent_speaking(ports, binding, "1.0", steps).await
}

/// [`a2a_agent`] offering A2A `version` (`1.0`, or `0.3` beside 1.0) in its card.
pub async fn a2a_agent_speaking(
    ports: &crate::AgentPorts,
    binding: &str,
    version: &str,
    steps: &[&str],
) -> Proc {
    let mut args = vec![
        "--name".to_owned(),
        ports.name.clone(),
        "--port".to_owned(),
        ports.app.port().to_string(),
        "--outbound".to_owned(),
        ports.outbound.to_string(),
        "--binding".to_owned(),
        binding.to_owned(),
        "--protocol-version".to_owned(),
        version.to_owned(),
    ];
    for s in steps {
        args.push("--step".to_owned());
        args.push((*s).to_owned());
    }
    let agent = spawn(&ports.name, "a2a_agent.py", &args);
    wait_listening(&agent, ports.app).await;
    agent
}

/// Starts `e2e/python/mcp_tools.py`: the MCP SDK server `server` (`search` or `vault`) over
/// streamable HTTP at `http://<addr>/mcp`. Returns once it listens.
pub async fn mcp_server(server: &str, addr: SocketAddr) -> Proc {
    let args = [
        "--server".to_owned(),
        server.to_owned(),
        "--port".to_owned(),
        addr.port().to_string(),
    ];
    let peer = spawn(&format!("mcp {server}"), "mcp_tools.py", &args);
    wait_listening(&peer, addr).await;
    peer
}
