//! Certificate rotation under continuous traffic fails no request.

use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use ringfence_e2e::mesh::{Mesh, call, send_message};

const POLICY: &str = "\
apiVersion: ringfence.dev/v1alpha1
kind: AgentPolicy
metadata: {name: delegates}
spec:
  allow:
    - from: [orchestrator]
      agents: [research]
";

#[tokio::test]
async fn certificate_rotation_under_continuous_traffic_fails_no_request() {
    // The shortest SVID the control plane issues (60 s): sidecars renew at half-life, ~30 s in.
    let mesh = Mesh::start_with(
        &[("orchestrator", "  mayStartRuns: true"), ("research", "")],
        POLICY,
        Duration::from_secs(60),
    )
    .await;
    let expiry = |name: &str| {
        mesh.agent(name)
            .sidecar
            .as_ref()
            .unwrap()
            .credentials
            .borrow()
            .as_ref()
            .map(|c| c.not_after)
    };
    let (o0, r0) = (expiry("orchestrator"), expiry("research"));
    let started = Instant::now();
    let (mut ok, mut failed) = (0u32, Vec::new());
    while started.elapsed() < Duration::from_secs(45)
        && (expiry("orchestrator") == o0
            || expiry("research") == r0
            || started.elapsed() < Duration::from_secs(33))
    {
        let r = call(
            mesh.outbound("orchestrator"),
            Method::POST,
            "/agents/research/",
            &[],
            &send_message(ok, "tick"),
        )
        .await;
        if r.status == StatusCode::OK {
            ok += 1;
        } else {
            failed.push((r.status, r.body));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_ne!(
        expiry("orchestrator"),
        o0,
        "the orchestrator's SVID was not renewed"
    );
    assert_ne!(expiry("research"), r0, "research's SVID was not renewed");
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        failed.first()
    );
    assert!(ok > 200, "only {ok} requests");
}
