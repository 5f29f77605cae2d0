//! The sidecar against a fake control plane over real TLS on loopback.

mod fake;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ringfence_crds::api::BundleAck;
use ringfence_crds::bundle::Bundle;
use ringfence_crds::spiffe::AgentKey;
use ringfence_sidecar::backoff::Backoff;
use ringfence_sidecar::bundle::WatchSettings;
use ringfence_sidecar::config::{Config, Tuning};
use ringfence_sidecar::run::{Running, start};
use ringfence_sidecar::testing::bundle_content;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use fake::{FakeControlPlane, TOKEN};

const WAIT: Duration = Duration::from_secs(15);

const ORCHESTRATOR_DELEGATES: (&str, &str) = (
    "default/article/orchestrator-delegates",
    r#"permit (principal == Agent::"orchestrator", action == Action::"invoke", resource)
       when { [Agent::"research", Agent::"writer", Agent::"critic"].contains(resource) };"#,
);
const NO_CALLS_BACK: (&str, &str) = (
    "default/article/no-calls-back",
    r#"forbid (principal, action == Action::"invoke", resource == Agent::"orchestrator")
       when { [Agent::"research", Agent::"writer"].contains(principal) };"#,
);

fn agent() -> AgentKey {
    AgentKey::new("default", "research").unwrap()
}

fn bundle(version: u64, policies: &[(&str, &str)]) -> Bundle {
    Bundle::new(version, bundle_content(&agent(), policies))
}

fn line(b: &Bundle) -> String {
    serde_json::to_string(b).unwrap()
}

struct Sidecar {
    running: Option<Running>,
    _dir: tempfile::TempDir,
}

impl Sidecar {
    async fn start(fake: &FakeControlPlane, control_plane: SocketAddr) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        let token_file = dir.path().join("token");
        std::fs::write(&ca_file, fake.ca.pem()).unwrap();
        std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
        let fast = Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(400),
        };
        let config = Config {
            agent: agent(),
            control_plane: format!("https://{control_plane}"),
            ca_file,
            token_file: Some(token_file),
            admin: "127.0.0.1:0".parse().unwrap(),
            outbound: "127.0.0.1:0".parse().unwrap(),
            inbound: "127.0.0.1:0".parse().unwrap(),
            app: "127.0.0.1:9".parse().unwrap(),
            budget: None,
            pricing: None,
            decision_log: ringfence_sidecar::telemetry::decisions::Level::Off,
            decision_log_file: None,
            exit_with_parent: false,
            tuning: Tuning {
                identity_backoff: fast,
                watch: WatchSettings {
                    backoff: fast,
                    idle_timeout: Duration::from_secs(30),
                    max_line: 1 << 20,
                },
                request_timeout: Duration::from_secs(5),
                ..Tuning::default()
            },
        };
        let running = start(&config).await.unwrap();
        Self {
            running: Some(running),
            _dir: dir,
        }
    }

    fn running(&self) -> &Running {
        self.running.as_ref().unwrap()
    }

    async fn admin(&self, path: &str) -> (u16, String) {
        get(self.running().admin_addr, path).await
    }

    async fn wait_ready(&self) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (status, body) = self.admin("/readyz").await;
            if status == 200 {
                return body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never ready: {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_enforced(&self, version: u64) {
        let mut rx = self.running().snapshots.clone();
        tokio::time::timeout(
            WAIT,
            rx.wait_for(|s| s.as_ref().is_some_and(|s| s.bundle.version == version)),
        )
        .await
        .unwrap_or_else(|_| panic!("version {version} never enforced"))
        .unwrap();
    }

    fn enforced(&self) -> Option<u64> {
        self.running()
            .snapshots
            .borrow()
            .as_ref()
            .map(|s| s.bundle.version)
    }

    async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

/// A bare HTTP/1.1 GET against the admin server.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

async fn wait_ack(fake: &FakeControlPlane, version: u64) -> BundleAck {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(ack) = fake.acks().into_iter().rev().find(|a| a.version == version) {
            return ack;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no ack for version {version}; acks: {:?}",
            fake.acks()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn obtains_its_svid_with_the_token_and_becomes_ready() {
    let (fake, addr, server) = fake::start("127.0.0.1:0".parse().unwrap()).await;
    fake.push(line(&bundle(1, &[ORCHESTRATOR_DELEGATES])));
    let sidecar = Sidecar::start(&fake, addr).await;

    let (status, _) = sidecar.admin("/healthz").await;
    assert_eq!(status, 200);
    let ready = sidecar.wait_ready().await;
    assert!(
        ready.contains("spiffe://cluster.local/ns/default/agent/research"),
        "{ready}"
    );

    let first = &fake.csrs()[0];
    assert_eq!(first.agent, "default/research");
    assert_eq!(first.token.as_deref(), Some(TOKEN));
    assert!(first.client_cert.is_none(), "no SVID to present yet");

    let (status, debug) = sidecar.admin("/debug/bundle").await;
    assert_eq!(status, 200);
    let debug: serde_json::Value = serde_json::from_str(&debug).unwrap();
    assert_eq!(debug["version"], 1);
    assert_eq!(debug["hash"], bundle(1, &[ORCHESTRATOR_DELEGATES]).hash);
    assert_eq!(debug["policies"], 1);
    assert_eq!(debug["peers"], 3);

    let (_, metrics) = sidecar.admin("/metrics").await;
    assert!(metrics.contains("ringfence_bundle_version 1"), "{metrics}");
    assert!(
        metrics.contains("ringfence_svid_renewals_total{outcome=\"success\"} 1"),
        "{metrics}"
    );

    sidecar.stop().await;
    server.abort();
}

#[tokio::test]
async fn receives_v1_then_v2_pushed_later_and_acks_both() {
    let (fake, addr, server) = fake::start("127.0.0.1:0".parse().unwrap()).await;
    let v1 = bundle(1, &[ORCHESTRATOR_DELEGATES]);
    fake.push(line(&v1));
    let sidecar = Sidecar::start(&fake, addr).await;

    sidecar.wait_enforced(1).await;
    let ack = wait_ack(&fake, 1).await;
    assert_eq!(
        ack,
        BundleAck {
            version: 1,
            hash: v1.hash.clone(),
            rejected: None
        }
    );

    let v2 = bundle(2, &[ORCHESTRATOR_DELEGATES, NO_CALLS_BACK]);
    fake.push(line(&v2));
    sidecar.wait_enforced(2).await;
    let ack = wait_ack(&fake, 2).await;
    assert_eq!(
        ack,
        BundleAck {
            version: 2,
            hash: v2.hash.clone(),
            rejected: None
        }
    );
    let snapshot = sidecar.running().snapshots.borrow().clone().unwrap();
    assert_eq!(snapshot.authorizer.policy_count(), 2);

    sidecar.stop().await;
    server.abort();
}

#[tokio::test]
async fn a_bad_hash_or_an_invalid_policy_is_rejected_and_the_previous_bundle_stays() {
    let (fake, addr, server) = fake::start("127.0.0.1:0".parse().unwrap()).await;
    fake.push(line(&bundle(1, &[ORCHESTRATOR_DELEGATES])));
    let sidecar = Sidecar::start(&fake, addr).await;
    sidecar.wait_enforced(1).await;
    wait_ack(&fake, 1).await;

    // A bundle whose content was changed after hashing.
    let mut tampered = bundle(2, &[ORCHESTRATOR_DELEGATES]);
    tampered.content.limits.max_delegation_depth = 1000;
    fake.push(line(&tampered));
    let ack = wait_ack(&fake, 2).await;
    let reason = ack.rejected.expect("a bad hash must be rejected");
    assert!(reason.contains("hash"), "{reason}");
    assert_eq!(sidecar.enforced(), Some(1));

    // A policy Cedar's validator refuses.
    let invalid = (
        "default/broken/unknown-action",
        r#"permit (principal, action == Action::"delete", resource);"#,
    );
    fake.push(line(&bundle(3, &[ORCHESTRATOR_DELEGATES, invalid])));
    let ack = wait_ack(&fake, 3).await;
    let reason = ack.rejected.expect("an invalid policy must be rejected");
    assert!(reason.contains("default/broken/unknown-action"), "{reason}");
    assert_eq!(sidecar.enforced(), Some(1));

    // A line that is not JSON at all: rejected, and the stream goes on.
    fake.push("{this is not a bundle".to_owned());
    let ack = wait_ack(&fake, 0).await;
    assert!(ack.rejected.is_some());
    assert_eq!(sidecar.enforced(), Some(1));

    fake.push(line(&bundle(4, &[ORCHESTRATOR_DELEGATES, NO_CALLS_BACK])));
    sidecar.wait_enforced(4).await;
    assert_eq!(wait_ack(&fake, 4).await.rejected, None);

    let (_, metrics) = sidecar.admin("/metrics").await;
    assert!(
        metrics.contains("ringfence_bundle_updates_total{outcome=\"rejected\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ringfence_bundle_updates_total{outcome=\"applied\"} 2"),
        "{metrics}"
    );

    sidecar.stop().await;
    server.abort();
}

#[tokio::test]
async fn renewal_at_half_life_replaces_the_certificate_over_mtls() {
    let (fake, addr, server) = fake::start("127.0.0.1:0".parse().unwrap()).await;
    *fake.ttl.lock().unwrap() = Duration::from_secs(4);
    fake.push(line(&bundle(1, &[ORCHESTRATOR_DELEGATES])));
    let sidecar = Sidecar::start(&fake, addr).await;
    sidecar.wait_enforced(1).await;

    let mut creds = sidecar.running().credentials.clone();
    let first = creds.borrow_and_update().clone().unwrap();
    let first_leaf = first.certified_key.cert[0].clone();
    let renewed = tokio::time::timeout(
        WAIT,
        creds.wait_for(|c| {
            c.as_ref()
                .is_some_and(|c| c.certified_key.cert[0] != first_leaf)
        }),
    )
    .await
    .expect("no renewal within the wait")
    .unwrap()
    .clone()
    .unwrap();
    assert!(renewed.not_after >= first.not_after);

    // The renewal was made over mTLS with the SVID it replaced.
    let csrs = fake.csrs();
    assert!(csrs.len() >= 2);
    assert_eq!(csrs[1].client_cert.as_ref(), Some(&first_leaf));

    // Connections made after the renewal present the new certificate and still work.
    fake.push(line(&bundle(2, &[ORCHESTRATOR_DELEGATES, NO_CALLS_BACK])));
    sidecar.wait_enforced(2).await;
    wait_ack(&fake, 2).await;

    sidecar.stop().await;
    server.abort();
}

#[tokio::test]
async fn when_the_control_plane_is_down_at_start_it_retries_and_readyz_says_why() {
    let fake = FakeControlPlane::new();
    fake.push(line(&bundle(1, &[ORCHESTRATOR_DELEGATES])));
    // A port nobody listens on yet.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let sidecar = Sidecar::start(&fake, addr).await;

    let deadline = tokio::time::Instant::now() + WAIT;
    let body = loop {
        let (status, body) = sidecar.admin("/readyz").await;
        assert_eq!(status, 503, "{body}");
        if body.contains("cannot connect") {
            break body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readyz never said why: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["missing"], serde_json::json!(["svid", "bundle"]));
    assert!(
        body["svid"].as_str().unwrap().contains(&addr.to_string()),
        "{body}"
    );

    let (_, server) = fake::serve_on(fake.clone(), addr).await;
    sidecar.wait_ready().await;
    sidecar.wait_enforced(1).await;
    let _: Arc<FakeControlPlane> = fake;

    sidecar.stop().await;
    server.abort();
}
