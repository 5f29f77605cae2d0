//! Harness for end-to-end tests: the real `ringfence` and `ringfence-sidecar` binaries, run as
//! processes on loopback, with manifest folders written per test on free ports.
#![forbid(unsafe_code)]

pub mod certs;
pub mod llm;
pub mod local;
pub mod mesh;
pub mod otlp;
pub mod peers;

pub use certs::{
    Wire, expired_creds, foreign_trust_domain_creds, hop_context, mtls_post, mtls_post_over,
    self_signed_creds, tls_creds_for,
};
pub use mesh::sse_response;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The folder holding the workspace's built binaries (`target/debug` for tests).
pub fn bin_dir() -> PathBuf {
    // Test executables live in target/<profile>/deps/.
    let exe = std::env::current_exe().unwrap_or_default();
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_owned)
        .unwrap_or_default()
}

/// The path of a workspace binary, built first (once per test process; a no-op when fresh) so
/// a test never runs a stale binary when only this package's tests were rebuilt.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<bool> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        Command::new(env!("CARGO"))
            .args([
                "build",
                "--quiet",
                "--bins",
                "-p",
                "ringfence",
                "-p",
                "ringfence-sidecar",
            ])
            .status()
            .is_ok_and(|s| s.success())
    });
    assert!(
        *built,
        "cannot build the ringfence binaries (cargo build --bins failed)"
    );
    bin_dir().join(name)
}

/// A free port on 127.0.0.1, for a listener the test binds at once.
///
/// Ports come from below Linux's ephemeral range (32768 and up), which the kernel hands to
/// outgoing connections and to `bind(0)`: a port picked there can be taken by any client socket
/// before the test binds it. A port is checked free when picked, but its listener may only bind
/// it seconds later (a sidecar `ringfence local` spawns, a Python peer), so each test process
/// draws from its own block of ports (see [`port_block`]), at random, never twice.
pub fn free_port() -> u16 {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let given = given.get_or_insert_with(HashSet::new);
    let block = port_block().unwrap_or(PORTS_FROM..PORTS_FROM + PORT_BLOCK * PORT_BLOCKS);
    let seed = std::process::id() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
    let mut x = seed | 1;
    for _ in 0..10_000 {
        // xorshift: cheap, and different per process and call.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = block.start + (x % u64::from(block.end - block.start)) as u16;
        if given.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

const PORTS_FROM: u16 = 20_000;
const PORT_BLOCK: u16 = 250;
const PORT_BLOCKS: u16 = 48;

/// This process's block of [`PORT_BLOCK`] ports: the first block, starting from one chosen by the
/// process id, whose lock file (in the temporary folder) it can lock exclusively. The lock is
/// held until the process exits, so test processes running at once (nextest runs each test in
/// its own, and several checkouts may test on one machine) never share a block. `None` when no
/// block can be locked; ports are then drawn from all blocks.
fn port_block() -> Option<std::ops::Range<u16>> {
    static BLOCK: OnceLock<Option<(std::fs::File, std::ops::Range<u16>)>> = OnceLock::new();
    let held = BLOCK.get_or_init(|| {
        let dir = std::env::temp_dir().join("ringfence-e2e-ports");
        std::fs::create_dir_all(&dir).ok()?;
        let first = (std::process::id() % u32::from(PORT_BLOCKS)) as u16;
        (0..PORT_BLOCKS).find_map(|i| {
            let block = (first + i) % PORT_BLOCKS;
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join(format!("block-{block}.lock")))
                .ok()?;
            file.try_lock().ok()?;
            let start = PORTS_FROM + block * PORT_BLOCK;
            Some((file, start..start + PORT_BLOCK))
        })
    });
    held.as_ref().map(|(_, range)| range.clone())
}

/// Where one agent and its sidecar listen.
#[derive(Debug, Clone)]
pub struct AgentPorts {
    pub name: String,
    pub app: SocketAddr,
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
}

impl AgentPorts {
    pub fn new(name: &str) -> Self {
        let addr = || SocketAddr::from(([127, 0, 0, 1], free_port()));
        Self {
            name: name.to_owned(),
            app: addr(),
            outbound: addr(),
            inbound: addr(),
            admin: addr(),
        }
    }

    /// The Agent manifest, with the local addresses as annotations.
    pub fn manifest(&self, spec: &str) -> String {
        format!(
            "apiVersion: ringfence.dev/v1alpha1\nkind: Agent\nmetadata:\n  name: {}\n  annotations:\n    ringfence.dev/local-app: \"{}\"\n    ringfence.dev/local-outbound: \"{}\"\n    ringfence.dev/local-inbound: \"{}\"\n    ringfence.dev/local-admin: \"{}\"\nspec:\n{}\n",
            self.name, self.app, self.outbound, self.inbound, self.admin, spec
        )
    }
}

/// A child process killed when dropped. Its stderr (where the binaries log) is collected, and
/// echoed so a failing test shows it.
pub struct Proc {
    pub name: String,
    child: Child,
    logs: Arc<Mutex<String>>,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> anyhow::Result<Self> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .env("NO_COLOR", "1")
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let logs = Arc::new(Mutex::new(String::new()));
        if let Some(stderr) = child.stderr.take() {
            let logs = logs.clone();
            let prefix = name.to_owned();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    eprintln!("[{prefix}] {line}");
                    if let Ok(mut l) = logs.lock() {
                        l.push_str(&line);
                        l.push('\n');
                    }
                }
            });
        }
        Ok(Self {
            name: name.to_owned(),
            child,
            logs,
        })
    }

    /// Kills the process with SIGKILL (`kill -9`): no cleanup, no goodbye.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Everything the process logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits up to `within` for the process to exit.
    pub fn terminate(&mut self, within: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM failed");
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {within:?} of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    /// Asks the process to stop (SIGTERM), as a user would, so it can stop what it started;
    /// kills it if it has not within two seconds.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None))
            && self.terminate(Duration::from_secs(2)).is_err()
        {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A plain HTTP GET on loopback: status and body.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(StatusCode, String)> {
    let tcp = TcpStream::connect(addr).await?;
    send(TokioIo::new(tcp), Method::GET, path, Vec::new()).await
}

/// An HTTPS GET, trusting `ca_pem` and presenting no client certificate.
pub async fn get_tls(
    addr: SocketAddr,
    ca_pem: &str,
    path: &str,
) -> anyhow::Result<(StatusCode, String)> {
    let roots = ringfence_crds::svid::trust_bundle_roots(ca_pem)?;
    let config =
        rustls::ClientConfig::builder_with_provider(ringfence_crds::svid::crypto_provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    send(TokioIo::new(tls), Method::GET, path, Vec::new()).await
}

async fn send<IO>(
    io: TokioIo<IO>,
    method: Method,
    path: &str,
    body: Vec<u8>,
) -> anyhow::Result<(StatusCode, String)>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::from(body)))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

/// Polls `f` every 20 ms until it returns `Some`, or fails after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_draws_ports_from_a_block_no_other_process_can_take() {
        let block = port_block().expect("a free block of ports");
        for _ in 0..20 {
            let port = free_port();
            assert!(block.contains(&port), "{port} is outside {block:?}");
        }
        // The lock is on the open file: anyone else opening the block's file is refused it.
        let index = (block.start - PORTS_FROM) / PORT_BLOCK;
        let path = std::env::temp_dir()
            .join("ringfence-e2e-ports")
            .join(format!("block-{index}.lock"));
        let other = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        assert!(other.try_lock().is_err());
    }
}
