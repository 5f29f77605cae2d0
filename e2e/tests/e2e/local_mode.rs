//! `ringfence local --spawn-sidecars` as a user runs it: real processes, real mTLS.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use ringfence_e2e::{AgentPorts, Proc, binary, eventually, free_port, get, get_tls};

struct Setup {
    dir: tempfile::TempDir,
    agents: Vec<AgentPorts>,
    control_plane: SocketAddr,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let agents: Vec<AgentPorts> = ["orchestrator", "research", "writer"]
        .iter()
        .map(|n| AgentPorts::new(n))
        .collect();
    let manifests: Vec<String> = agents
        .iter()
        .map(|a| {
            a.manifest(if a.name == "orchestrator" {
                "  mayStartRuns: true"
            } else {
                "  team: research"
            })
        })
        .collect();
    std::fs::write(dir.path().join("agents.yaml"), manifests.join("---\n")).unwrap();
    std::fs::write(
        dir.path().join("policy.yaml"),
        "apiVersion: ringfence.dev/v1alpha1\nkind: AgentPolicy\nmetadata: {name: delegates}\nspec:\n  allow:\n    - from: [orchestrator]\n      agents: [research, writer]\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("budget.yaml"),
        "apiVersion: ringfence.dev/v1alpha1\nkind: RunBudget\nmetadata: {name: limits}\nspec:\n  maxDelegationDepth: 5\n",
    )
    .unwrap();
    Setup {
        dir,
        agents,
        control_plane: SocketAddr::from(([127, 0, 0, 1], free_port())),
    }
}

fn start(s: &Setup) -> Proc {
    Proc::spawn(
        "ringfence local",
        Command::new(binary("ringfence"))
            .arg("local")
            .arg(s.dir.path())
            .arg("--spawn-sidecars")
            .args(["--listen", &s.control_plane.to_string()])
            .arg("--sidecar-bin")
            .arg(binary("ringfence-sidecar")),
    )
    .unwrap()
}

async fn bundle_version(admin: SocketAddr) -> Option<u64> {
    let (_, body) = get(admin, "/debug/bundle").await.ok()?;
    serde_json::from_str::<serde_json::Value>(&body).ok()?["version"].as_u64()
}

#[tokio::test]
async fn every_spawned_sidecar_becomes_ready_and_a_manifest_edit_reaches_all_of_them() {
    let s = setup();
    let mut plane = start(&s);

    for a in &s.agents {
        let body = eventually(
            Duration::from_secs(60),
            &format!("{} to be ready", a.name),
            || async {
                match get(a.admin, "/readyz").await {
                    Ok((status, body)) if status.is_success() => Some(body),
                    _ => None,
                }
            },
        )
        .await
        .unwrap();
        assert!(
            body.contains(&format!(
                "spiffe://cluster.local/ns/default/agent/{}",
                a.name
            )),
            "{body}"
        );
    }
    let mut before = Vec::new();
    for a in &s.agents {
        before.push(bundle_version(a.admin).await.unwrap());
    }

    let saved = Instant::now();
    let budget = s.dir.path().join("budget.yaml");
    let text = std::fs::read_to_string(&budget).unwrap();
    std::fs::write(
        &budget,
        text.replace("maxDelegationDepth: 5", "maxDelegationDepth: 3"),
    )
    .unwrap();
    for (a, v) in s.agents.iter().zip(&before) {
        eventually(
            Duration::from_secs(5),
            &format!("{} to enforce a new version", a.name),
            || async { bundle_version(a.admin).await.filter(|now| now > v) },
        )
        .await
        .unwrap();
    }
    let took = saved.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "every sidecar enforced the edit after {took:?}"
    );

    // The control plane knows what every sidecar enforces.
    let ca = std::fs::read_to_string(s.dir.path().join(".ringfence/ca/cert.pem")).unwrap();
    let status = eventually(Duration::from_secs(5), "every sidecar's ack", || async {
        let (_, body) = get_tls(s.control_plane, &ca, "/v1/status").await.ok()?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let agents = v["agents"].as_array()?.clone();
        let all = agents.iter().all(|a| {
            a["sidecars"].as_array().is_some_and(|sc| {
                sc.len() == 1
                    && sc[0]["connected"] == true
                    && sc[0]["enforcedVersion"] == a["version"]
            })
        });
        (all && agents.len() == 3).then_some(v)
    })
    .await
    .unwrap();
    assert_eq!(
        status["diagnostics"].as_array().map(Vec::len),
        Some(0),
        "{status}"
    );

    // SIGTERM stops the control plane and its sidecars.
    let exit = plane.terminate(Duration::from_secs(10)).unwrap();
    assert!(exit.success(), "{exit}");
    for a in &s.agents {
        assert!(
            get(a.admin, "/healthz").await.is_err(),
            "{}'s sidecar still answers",
            a.name
        );
    }
}

#[tokio::test]
async fn malformed_yaml_is_logged_with_its_file_and_the_control_plane_keeps_running() {
    let s = setup();
    let mut plane = start(&s);
    let admin = s.agents[1].admin;
    let v1 = eventually(Duration::from_secs(60), "research's bundle", || {
        bundle_version(admin)
    })
    .await
    .unwrap();

    std::fs::write(
        s.dir.path().join("budget.yaml"),
        "apiVersion: ringfence.dev/v1alpha1\nkind: RunBudget\nmetadata: {name: limits\n",
    )
    .unwrap();
    eventually(Duration::from_secs(5), "the error in the log", || async {
        let logs = plane.logs();
        (logs.contains("budget.yaml, document 1: not valid YAML")
            && logs.contains("keeping the last good content"))
        .then_some(())
    })
    .await
    .unwrap();
    assert_eq!(
        bundle_version(admin).await,
        Some(v1),
        "a broken file changes nothing enforced"
    );

    std::fs::write(
        s.dir.path().join("budget.yaml"),
        "apiVersion: ringfence.dev/v1alpha1\nkind: RunBudget\nmetadata: {name: limits}\nspec:\n  maxDelegationDepth: 2\n",
    )
    .unwrap();
    eventually(
        Duration::from_secs(5),
        "the fixed file to be enforced",
        || async { bundle_version(admin).await.filter(|v| *v > v1) },
    )
    .await
    .unwrap();
    assert!(plane.terminate(Duration::from_secs(10)).unwrap().success());
}

#[tokio::test]
async fn sidecars_stop_when_ringfence_local_is_killed_with_9() {
    let s = setup();
    let mut plane = start(&s);
    for a in &s.agents {
        eventually(
            Duration::from_secs(60),
            &format!("{} to be ready", a.name),
            || async {
                get(a.admin, "/readyz")
                    .await
                    .ok()
                    .filter(|(st, _)| st.is_success())
            },
        )
        .await
        .unwrap();
    }
    // No chance to stop its children: they notice their parent is gone and stop themselves.
    plane.kill();
    for a in &s.agents {
        eventually(
            Duration::from_secs(5),
            &format!("{}'s sidecar to stop", a.name),
            || async { get(a.admin, "/healthz").await.is_err().then_some(()) },
        )
        .await
        .unwrap();
    }
}
