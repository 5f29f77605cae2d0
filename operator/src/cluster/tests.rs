//! Reconcile scenarios against a fake API server (kube's tower-test mock).

use std::sync::Arc;

use http::Method;
use ringfence_crds::AgentKey;
use serde_json::{Value, json};

use super::fixtures::*;
use super::index::Kind;
use super::reconcile::reconcile;

const CM: &str = "/api/v1/namespaces/default/configmaps/ringfence-trust-bundle";
const SVC: &str = "/api/v1/namespaces/default/services/research";
const AGENT_STATUS: &str = "/apis/ringfence.dev/v1alpha1/namespaces/default/agents/research/status";
const POLICY_STATUS: &str =
    "/apis/ringfence.dev/v1alpha1/namespaces/default/agentpolicies/edges/status";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .unwrap_or_else(|| panic!("no {type_} condition in {status}"))
}

const ALLOW: &str = r#"permit (principal == Agent::"orchestrator", action == Action::"invoke", resource == Agent::"research");"#;

#[tokio::test]
async fn a_new_agent_gets_its_service_its_trust_bundle_and_a_ready_condition() {
    let mut cluster = Cluster::new();
    let research = agent("research", 1);
    let outcome = cluster.project(&[(Kind::Agent, research.clone())]);
    let (client, api) = FakeApi::new().start();

    reconcile(Kind::Agent, Arc::new(research), ctx(client, outcome))
        .await
        .unwrap();
    let seen = requests(api).await;

    let cm = seen.to(Method::PATCH, CM).expect("trust bundle applied");
    assert_eq!(cm.body["data"]["ca.crt"], TRUST_BUNDLE_PEM);
    let svc = &seen.to(Method::PATCH, SVC).expect("Service applied").body;
    assert_eq!(svc["metadata"]["ownerReferences"][0]["uid"], "uid-research");
    assert_eq!(svc["metadata"]["ownerReferences"][0]["controller"], true);
    assert_eq!(svc["spec"]["selector"], json!({"app": "research"}));
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], 15006);

    let status = &seen
        .to(Method::PATCH, AGENT_STATUS)
        .expect("status written")
        .body["status"];
    assert_eq!(condition(status, "Ready")["status"], "True");
    assert_eq!(condition(status, "Ready")["reason"], "BundleServed");
    assert_eq!(condition(status, "Accepted")["status"], "True");
    assert_eq!(condition(status, "Ready")["observedGeneration"], 1);
    assert_eq!(
        status["spiffeId"],
        "spiffe://cluster.local/ns/default/agent/research"
    );
    assert_eq!(status["bundleVersion"], 1);
    let events = seen.iter().filter(|s| s.path == EVENTS).count();
    assert_eq!(events, 3, "one Event per condition that appeared");
}

#[tokio::test]
async fn a_status_is_written_only_when_it_changes() {
    let mut cluster = Cluster::new();
    let research = agent("research", 1);
    let outcome = cluster.project(&[(Kind::Agent, research.clone())]);

    // First pass: learn what the operator writes.
    let (client, api) = FakeApi::new().start();
    reconcile(
        Kind::Agent,
        Arc::new(research.clone()),
        ctx(client, outcome.clone()),
    )
    .await
    .unwrap();
    let first = requests(api).await;
    let status = first.to(Method::PATCH, AGENT_STATUS).unwrap().body["status"].clone();
    let mut service = first.to(Method::PATCH, SVC).unwrap().body.clone();
    service["spec"]["ports"][0]["protocol"] = json!("TCP");
    let cm = first.to(Method::PATCH, CM).unwrap().body.clone();

    // Second pass over the same cluster state: reads only.
    let (client, api) = FakeApi::new().with(CM, cm).with(SVC, service).start();
    let again = with_status(research, status);
    reconcile(Kind::Agent, Arc::new(again), ctx(client, outcome))
        .await
        .unwrap();
    let second = requests(api).await;
    assert!(
        second.writes().is_empty(),
        "nothing changed, nothing written: {:?}",
        second.writes()
    );
}

#[tokio::test]
async fn an_invalid_policy_is_not_accepted_and_the_previous_bundle_stays_served() {
    let mut cluster = Cluster::new();
    let agents = [
        (Kind::Agent, agent("research", 1)),
        (Kind::Agent, agent("orchestrator", 1)),
    ];
    let mut objects = agents.to_vec();
    objects.push((Kind::AgentPolicy, policy("edges", 1, ALLOW)));
    let good = cluster.project(&objects);
    let research = AgentKey::new("default", "research").unwrap();
    assert_eq!(
        good.projected.snapshot.bundles[&research]
            .bundle
            .content
            .policy
            .policies
            .len(),
        1
    );

    let broken = policy("edges", 2, "permit (principal, actoin, resource);");
    let mut objects = agents.to_vec();
    objects.push((Kind::AgentPolicy, broken.clone()));
    let after = cluster.project(&objects);
    for (key, served) in &good.projected.snapshot.bundles {
        let now = &after.projected.snapshot.bundles[key].bundle;
        assert_eq!(
            now.hash, served.bundle.hash,
            "{key}: the previous bundle stays"
        );
        assert_eq!(now.version, served.bundle.version);
    }

    let (client, api) = FakeApi::new().start();
    reconcile(Kind::AgentPolicy, Arc::new(broken), ctx(client, after))
        .await
        .unwrap();
    let seen = requests(api).await;
    let status = &seen
        .to(Method::PATCH, POLICY_STATUS)
        .expect("status written")
        .body["status"];
    let accepted = condition(status, "Accepted");
    assert_eq!(accepted["status"], "False");
    assert_eq!(accepted["reason"], "Invalid");
    let message = accepted["message"].as_str().unwrap();
    assert!(
        message.starts_with("spec.cedar (line 1, column"),
        "{message}"
    );
    assert!(
        message.contains("actoin"),
        "the Cedar diagnostic: {message}"
    );
    assert_eq!(condition(status, "Ready")["reason"], "LastGoodInForce");
    assert_eq!(status["observedGeneration"], 2);
    let warning = seen
        .iter()
        .find(|s| s.path == EVENTS && s.body["reason"] == "Invalid")
        .expect("a Warning Event");
    assert_eq!(warning.body["type"], "Warning");
}

#[tokio::test]
async fn deleting_a_run_budget_takes_its_limits_out_of_the_bundles() {
    let mut cluster = Cluster::new();
    let research = agent("research", 1);
    let limits = budget("limits", 1, json!({"maxDelegationDepth": 2}));
    let before = cluster.project(&[
        (Kind::Agent, research.clone()),
        (Kind::RunBudget, limits.clone()),
    ]);
    let key = AgentKey::new("default", "research").unwrap();
    let served = &before.projected.snapshot.bundles[&key].bundle;
    assert_eq!(served.content.limits.max_delegation_depth, 2);

    // The RunBudget is deleted: no finalizer holds it, so the watch reports it gone.
    let after = cluster.project(&[(Kind::Agent, research.clone())]);
    let now = &after.projected.snapshot.bundles[&key].bundle;
    assert_ne!(now.content.limits.max_delegation_depth, 2);
    assert_eq!(now.version, served.version + 1);

    // The Agent's status follows the new bundle.
    let (first_client, first_api) = FakeApi::new().start();
    reconcile(
        Kind::Agent,
        Arc::new(research.clone()),
        ctx(first_client, before),
    )
    .await
    .unwrap();
    let first = requests(first_api).await;
    let status = first.to(Method::PATCH, AGENT_STATUS).unwrap().body["status"].clone();
    let mut service = first.to(Method::PATCH, SVC).unwrap().body.clone();
    service["spec"]["ports"][0]["protocol"] = json!("TCP");
    let cm = first.to(Method::PATCH, CM).unwrap().body.clone();
    let (client, api) = FakeApi::new().with(CM, cm).with(SVC, service).start();
    reconcile(
        Kind::Agent,
        Arc::new(with_status(research, status)),
        ctx(client, after.clone()),
    )
    .await
    .unwrap();
    let seen = requests(api).await;
    let status = &seen
        .to(Method::PATCH, AGENT_STATUS)
        .expect("status follows")
        .body["status"];
    assert_eq!(status["bundleVersion"], 2);

    // A RunBudget being deleted needs nothing from the operator: no call, no finalizer.
    let mut deleting = limits;
    deleting.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::from_second(1).unwrap(),
        ));
    let (client, api) = FakeApi::new().start();
    reconcile(Kind::RunBudget, Arc::new(deleting), ctx(client, after))
        .await
        .unwrap();
    assert!(requests(api).await.is_empty());
}

#[tokio::test]
async fn a_malformed_object_is_reported_and_the_others_still_served() {
    let mut cluster = Cluster::new();
    let bad = budget(
        "limits",
        1,
        json!({"perAgent": {"invokeRateLimit": "sixty per minute"}}),
    );
    let outcome = cluster.project(&[
        (Kind::Agent, agent("research", 1)),
        (Kind::RunBudget, bad.clone()),
    ]);
    let key = AgentKey::new("default", "research").unwrap();
    assert!(outcome.projected.snapshot.bundles.contains_key(&key));
    assert_eq!(outcome.malformed.len(), 1);

    let (client, api) = FakeApi::new().start();
    reconcile(Kind::RunBudget, Arc::new(bad), ctx(client, outcome))
        .await
        .unwrap();
    let seen = requests(api).await;
    let path = "/apis/ringfence.dev/v1alpha1/namespaces/default/runbudgets/limits/status";
    let status = &seen.to(Method::PATCH, path).expect("status written").body["status"];
    let accepted = condition(status, "Accepted");
    assert_eq!(accepted["reason"], "Malformed");
    assert!(
        accepted["message"]
            .as_str()
            .unwrap()
            .contains("spec.perAgent.invokeRateLimit"),
        "{accepted}"
    );
}

mod csr {
    //! The CSR path in the cluster: the token is reviewed by the (fake) API server over HTTP,
    //! its pod looked up, and only that pod's Agent is signed.

    use std::time::Duration;

    use bytes::Bytes;
    use http::{Request, StatusCode};
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;
    use rcgen::{CertificateParams, KeyPair};
    use ringfence_crds::api::{self, CsrRequest, CsrResponse};
    use ringfence_crds::{Agent, svid};

    use super::*;
    use crate::distribute::{self, Acks, ControlPlane};
    use crate::identity::{Identity, PodAttestor};

    const REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
    const POD: &str = "/api/v1/namespaces/default/pods/research-7d9f";

    /// The API server's view: the token belongs to pod research-7d9f, which runs `research`.
    fn api_server() -> FakeApi {
        let review = json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "spec": {},
            "status": {
                "authenticated": true,
                "audiences": ["ringfence"],
                "user": {
                    "username": "system:serviceaccount:default:research",
                    "extra": {
                        "authentication.kubernetes.io/pod-name": ["research-7d9f"],
                        "authentication.kubernetes.io/pod-uid": ["pod-uid-1"]
                    }
                }
            }
        });
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "research-7d9f", "namespace": "default", "uid": "pod-uid-1",
                         "labels": {"app": "research"}},
            "spec": {"serviceAccountName": "research", "containers": []}
        });
        FakeApi::new()
            .answer(Method::POST, REVIEWS, 201, review)
            .with(POD, pod)
    }

    async fn ask(agent: &str) -> (StatusCode, String, Vec<Seen>) {
        let mut cluster = Cluster::new();
        let objects = [
            (Kind::Agent, super::agent("research", 1)),
            (Kind::Agent, super::agent("orchestrator", 1)),
        ];
        cluster.project(&objects);
        let agents: Vec<Agent> = objects
            .iter()
            .map(|(k, o)| crate::cluster::index::parse(*k, o).unwrap())
            .collect();
        let (identity, _key) =
            Identity::generate(Default::default(), "test", Duration::from_secs(3600)).unwrap();
        let roots = svid::trust_bundle_roots(identity.trust_bundle_pem()).unwrap();
        let tls = identity
            .server_tls_config(&["localhost".to_owned()])
            .unwrap();
        let (client, api) = api_server().start();
        let cp = Arc::new(ControlPlane {
            identity: Arc::new(identity),
            snapshots: cluster.projection.subscribe(),
            acks: Arc::new(Acks::default()),
            budget: None,
            attestor: Some(Arc::new(PodAttestor::new(client, Box::new(agents)))),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(distribute::serve(listener, Arc::new(tls), cp, async {
            let _ = stopped.await;
        }));

        let key = KeyPair::generate().unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let body = serde_json::to_vec(&CsrRequest {
            agent: AgentKey::new("default", agent).unwrap(),
            csr,
        })
        .unwrap();
        let config = rustls::ClientConfig::builder_with_provider(svid::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::post(api::CSR_PATH)
            .header("host", "localhost")
            .header("authorization", "Bearer projected-sa-token")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status();
        let text = String::from_utf8(
            resp.into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec(),
        )
        .unwrap();
        let _ = stop.send(());
        server.await.unwrap();
        (status, text, requests(api).await)
    }

    #[tokio::test]
    async fn a_pod_of_research_cannot_get_the_orchestrators_svid() {
        let (status, text, seen) = ask("orchestrator").await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{text}");
        assert!(
            text.contains("runs Agent default/research, not default/orchestrator"),
            "{text}"
        );
        let review = seen
            .to(Method::POST, REVIEWS)
            .expect("the token was reviewed");
        assert_eq!(review.body["spec"]["token"], "projected-sa-token");
        assert_eq!(review.body["spec"]["audiences"], json!(["ringfence"]));
    }

    #[tokio::test]
    async fn a_pod_of_research_gets_the_research_svid() {
        let (status, text, seen) = ask("research").await;
        assert_eq!(status, StatusCode::OK, "{text}");
        let resp: CsrResponse = serde_json::from_str(&text).unwrap();
        assert_eq!(
            resp.spiffe_id,
            "spiffe://cluster.local/ns/default/agent/research"
        );
        assert!(seen.to(Method::GET, POD).is_some(), "the pod was looked up");
    }
}
