//! The webhook over real HTTPS, fed the AdmissionReview v1 JSON an API server sends; and the
//! caBundle patching against a mocked API server.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use ringfence_crds::{Agent, TrustDomain};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::inject::SIDECAR;
use super::view::StaticView;
use super::*;
use crate::identity::DEFAULT_SVID_TTL;

const SERVICE_NAME: &str = "ringfence-webhook.ringfence-system.svc";

struct Harness {
    addr: SocketAddr,
    identity: Arc<Identity>,
    certs: watch::Sender<Arc<rustls::sign::CertifiedKey>>,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

fn agent(namespace: &str, name: &str, spec: Value) -> Agent {
    serde_json::from_value(json!({
        "apiVersion": "ringfence.dev/v1alpha1", "kind": "Agent",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec
    }))
    .unwrap()
}

fn cluster() -> StaticView {
    StaticView {
        namespaces: BTreeMap::from([
            ("team-a".to_owned(), BTreeMap::new()),
            (
                "team-b".to_owned(),
                BTreeMap::from([("ringfence.dev/inject".to_owned(), "enabled".to_owned())]),
            ),
        ]),
        agents: vec![
            agent(
                "team-a",
                "research",
                json!({"appPort": 8080, "models": [{"name": "openai", "url": "https://api.openai.com"}]}),
            ),
            agent("team-a", "orchestrator", json!({"appPort": 8080})),
            agent(
                "team-b",
                "writer",
                json!({"appPort": 9000, "selector": {"matchLabels": {"app": "writer"}}}),
            ),
        ],
    }
}

fn options(native: NativeSidecars) -> WebhookOptions {
    use clap::Parser;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        webhook: WebhookOptions,
    }
    let mut o = Cli::try_parse_from(["webhook", "--sidecar-image", "ringfence-sidecar:test"])
        .unwrap()
        .webhook;
    o.native_sidecars = native;
    o
}

async fn start(native: bool) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let identity = Arc::new(
        Identity::load_or_create(
            dir.path(),
            TrustDomain::new("cluster.local").unwrap(),
            DEFAULT_SVID_TTL,
        )
        .unwrap(),
    );
    let first = certs::issue(
        &identity,
        &serving_names("ringfence-webhook", "ringfence-system"),
    )
    .unwrap();
    let (certs, rx) = watch::channel(first.key);
    let tls = Arc::new(certs::server_config(rx).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let webhook = Arc::new(Webhook {
        settings: options(NativeSidecars::Auto).settings("ringfence-system", native),
        view: cluster(),
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handler = move |_peer, req| {
        let webhook = webhook.clone();
        async move { webhook.handle(req).await }
    };
    tokio::spawn(crate::distribute::serve_tls(
        listener,
        tls,
        handler,
        async {
            let _ = stopped.await;
        },
    ));
    Harness {
        addr,
        identity,
        certs,
        _dir: dir,
        _stop: stop,
    }
}

impl Harness {
    /// One HTTPS request, trusting only the trust domain's CA and checking the Service's name.
    async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value, CertificateDer<'static>) {
        let mut roots = rustls::RootCertStore::empty();
        for c in ringfence_crds::svid::certs_from_pem(self.identity.trust_bundle_pem()).unwrap() {
            roots.add(c).unwrap();
        }
        let config =
            rustls::ClientConfig::builder_with_provider(ringfence_crds::svid::crypto_provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from(SERVICE_NAME).unwrap(), tcp)
            .await
            .expect("the webhook's certificate verifies against the CA for its Service name");
        let served = tls.get_ref().1.peer_certificates().unwrap()[0]
            .clone()
            .into_owned();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("https://{SERVICE_NAME}{path}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, json, served)
    }

    /// Sends `pod` for admission; returns the response and the pod with its patch applied.
    async fn admit_pod(&self, namespace: &str, pod: &Value) -> (Value, Value) {
        let (status, review, _) = self.post("/inject", &review(namespace, "pods", pod)).await;
        assert_eq!(status, StatusCode::OK, "{review}");
        let response = review["response"].clone();
        assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(review["kind"], "AdmissionReview");
        assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        let mut patched = pod.clone();
        if !response["patch"].is_null() {
            assert_eq!(response["patchType"], "JSONPatch");
            let patch: json_patch::Patch =
                serde_json::from_slice(&patch_bytes(&response["patch"])).unwrap();
            json_patch::patch(&mut patched, &patch).expect("the patch applies to the pod as sent");
        }
        (response, patched)
    }
}

/// The API server reads `patch` as Go's []byte: a base64 string, or an array of bytes.
fn patch_bytes(v: &Value) -> Vec<u8> {
    match v {
        Value::String(s) => STANDARD.decode(s).unwrap(),
        Value::Array(a) => a.iter().map(|b| b.as_u64().unwrap() as u8).collect(),
        other => panic!("patch is neither base64 nor bytes: {other}"),
    }
}

/// An AdmissionReview v1 as the API server sends it for a CREATE.
fn review(namespace: &str, resource: &str, object: &Value) -> Value {
    let (group, version, kind) = match resource {
        "pods" => ("", "v1", "Pod"),
        _ => ("ringfence.dev", "v1alpha1", "AgentPolicy"),
    };
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": resource},
            "requestKind": {"group": group, "version": version, "kind": kind},
            "requestResource": {"group": group, "version": version, "resource": resource},
            "name": object["metadata"]["name"].as_str().unwrap_or(""),
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "uid": "3a1b7c2e-0d1f-4a5b-9c8d-7e6f5a4b3c2d",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"]
            },
            "object": object,
            "oldObject": null,
            "dryRun": false,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}
        }
    })
}

/// A pod as a ReplicaSet creates it: generated name, no namespace in its metadata yet.
fn deployment_pod(labels: Value, annotations: Value) -> Value {
    json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "generateName": "research-7d9c5b8f6-",
            "creationTimestamp": null,
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "research-7d9c5b8f6",
                "uid": "b2f1e0c4-1d2e-4f3a-8b9c-0d1e2f3a4b5c", "controller": true, "blockOwnerDeletion": true
            }]
        },
        "spec": {
            "volumes": [{"name": "kube-api-access-x7k2p", "projected": {"sources": [{"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}}], "defaultMode": 420}}],
            "containers": [{
                "name": "app",
                "image": "ghcr.io/example/research:1.4.2",
                "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                "env": [{"name": "LOG_LEVEL", "value": "info"}],
                "resources": {},
                "volumeMounts": [{"name": "kube-api-access-x7k2p", "readOnly": true, "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "imagePullPolicy": "IfNotPresent"
            }],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "research",
            "serviceAccount": "research",
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "enableServiceLinks": true,
            "preemptionPolicy": "PreemptLowerPriority"
        },
        "status": {}
    })
}

fn containers_named<'a>(pod: &'a Value, list: &str, name: &str) -> Vec<&'a Value> {
    pod["spec"][list]
        .as_array()
        .map(|cs| cs.iter().filter(|c| c["name"] == name).collect())
        .unwrap_or_default()
}

fn env_of(container: &Value) -> BTreeMap<String, String> {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_owned(),
                e["value"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

fn arg_after<'a>(container: &'a Value, flag: &str) -> &'a str {
    let args = container["args"].as_array().unwrap();
    let i = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
    args[i + 1].as_str().unwrap()
}

#[tokio::test]
async fn an_opted_in_pod_gets_one_native_sidecar_its_token_and_env_and_a_second_pass_adds_nothing()
{
    let h = start(true).await;
    let pod = deployment_pod(
        json!({"app": "research", "ringfence.dev/inject": "true"}),
        json!({"ringfence.dev/agent": "research"}),
    );
    let (response, patched) = h.admit_pod("team-a", &pod).await;
    assert_eq!(response["allowed"], true, "{response}");

    let sidecars = containers_named(&patched, "initContainers", SIDECAR);
    assert_eq!(sidecars.len(), 1, "exactly one sidecar: {patched:#}");
    assert!(containers_named(&patched, "containers", SIDECAR).is_empty());
    assert_eq!(
        patched["metadata"]["labels"]["ringfence.dev/agent"], "research",
        "the label the Agent's Service selects by"
    );
    let sidecar = sidecars[0];
    assert_eq!(sidecar["restartPolicy"], "Always", "a native sidecar");
    assert_eq!(sidecar["startupProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(sidecar["startupProbe"]["httpGet"]["port"], 15020);
    assert_eq!(sidecar["image"], "ringfence-sidecar:test");
    assert_eq!(arg_after(sidecar, "--agent"), "team-a/research");
    assert_eq!(
        arg_after(sidecar, "--control-plane"),
        "https://ringfence.ringfence-system.svc:15012"
    );
    assert_eq!(
        arg_after(sidecar, "--budget"),
        "https://ringfence-budget.ringfence-system.svc:15013"
    );
    assert_eq!(
        arg_after(sidecar, "--token-file"),
        "/var/run/ringfence/token/token"
    );
    assert_eq!(
        arg_after(sidecar, "--ca-file"),
        "/var/run/ringfence/trust/ca.crt"
    );
    assert_eq!(arg_after(sidecar, "--app"), "127.0.0.1:8080");
    assert_eq!(sidecar["securityContext"]["runAsNonRoot"], true);

    let volumes = patched["spec"]["volumes"].as_array().unwrap();
    let token = volumes
        .iter()
        .find(|v| v["name"] == "ringfence-token")
        .expect("token volume");
    let projection = &token["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(projection["audience"], "ringfence");
    assert_eq!(projection["path"], "token");
    let trust = volumes
        .iter()
        .find(|v| v["name"] == "ringfence-trust")
        .expect("trust volume");
    assert_eq!(trust["configMap"]["name"], "ringfence-trust-bundle");
    assert!(
        volumes.iter().any(|v| v["name"] == "kube-api-access-x7k2p"),
        "existing volumes stay"
    );

    let app = containers_named(&patched, "containers", "app")[0];
    let env = env_of(app);
    assert_eq!(env["RINGFENCE_OUTBOUND"], "http://127.0.0.1:15001");
    assert_eq!(
        env["OPENAI_BASE_URL"],
        "http://127.0.0.1:15001/models/openai/v1"
    );
    assert_eq!(
        env["ANTHROPIC_BASE_URL"],
        "http://127.0.0.1:15001/models/anthropic"
    );
    assert_eq!(env["LOG_LEVEL"], "info", "the app's own env stays");

    // The API server reinvokes the webhook (reinvocationPolicy: IfNeeded) with the patched pod.
    let (again, twice) = h.admit_pod("team-a", &patched).await;
    assert_eq!(again["allowed"], true);
    assert!(
        again["patch"].is_null(),
        "a second pass adds nothing: {again}"
    );
    assert_eq!(twice, patched);
}

#[tokio::test]
async fn before_1_29_the_sidecar_is_a_regular_first_container() {
    let h = start(false).await;
    let pod = deployment_pod(
        json!({"ringfence.dev/inject": "true"}),
        json!({"ringfence.dev/agent": "orchestrator"}),
    );
    let (_, patched) = h.admit_pod("team-a", &pod).await;
    let names: Vec<_> = patched["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].clone())
        .collect();
    assert_eq!(names, [json!(SIDECAR), json!("app")]);
    assert!(patched["spec"]["initContainers"].is_null());
    assert!(env_of(&patched["spec"]["containers"][1]).contains_key("RINGFENCE_OUTBOUND"));
    let (again, _) = h.admit_pod("team-a", &patched).await;
    assert!(again["patch"].is_null(), "{again}");
}

#[tokio::test]
async fn pods_without_opt_in_and_pods_in_excluded_namespaces_are_untouched() {
    let h = start(true).await;
    let plain = deployment_pod(
        json!({"app": "research"}),
        json!({"ringfence.dev/agent": "research"}),
    );
    let opted = deployment_pod(
        json!({"ringfence.dev/inject": "true"}),
        json!({"ringfence.dev/agent": "research"}),
    );
    let opted_out = deployment_pod(
        json!({"app": "writer", "ringfence.dev/inject": "false"}),
        json!({}),
    );
    for (namespace, pod) in [
        ("team-a", &plain),
        ("kube-system", &opted),
        ("ringfence-system", &opted),
        ("team-b", &opted_out),
    ] {
        let (response, patched) = h.admit_pod(namespace, pod).await;
        assert_eq!(response["allowed"], true, "{namespace}: {response}");
        assert!(response["patch"].is_null(), "{namespace}: {response}");
        assert_eq!(&patched, pod);
    }
}

#[tokio::test]
async fn a_namespace_label_opts_in_a_pod_whose_agent_is_found_by_selector() {
    let h = start(true).await;
    let pod = deployment_pod(json!({"app": "writer"}), json!({}));
    let (response, patched) = h.admit_pod("team-b", &pod).await;
    assert_eq!(response["allowed"], true, "{response}");
    let sidecar = containers_named(&patched, "initContainers", SIDECAR)[0];
    assert_eq!(arg_after(sidecar, "--agent"), "team-b/writer");
    assert_eq!(arg_after(sidecar, "--app"), "127.0.0.1:9000");
}

#[tokio::test]
async fn in_an_opted_in_namespace_a_pod_that_runs_no_agent_is_admitted_with_a_warning() {
    let h = start(true).await;
    let redis = deployment_pod(json!({"app": "redis"}), json!({}));
    let (response, patched) = h.admit_pod("team-b", &redis).await;
    assert_eq!(response["allowed"], true, "{response}");
    assert!(response["patch"].is_null());
    assert_eq!(patched, redis);
    let warning = response["warnings"][0].as_str().unwrap();
    assert!(warning.contains("names no Agent"), "{warning}");
}

#[tokio::test]
async fn a_pod_that_opts_in_itself_but_runs_no_agent_is_refused() {
    let h = start(true).await;
    let pod = deployment_pod(
        json!({"app": "redis", "ringfence.dev/inject": "true"}),
        json!({}),
    );
    let (response, _) = h.admit_pod("team-a", &pod).await;
    assert_eq!(response["allowed"], false, "{response}");
    let message = response["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("annotate it with ringfence.dev/agent"),
        "{message}"
    );
}

#[tokio::test]
async fn an_opted_in_pod_whose_agent_does_not_exist_is_refused_with_what_to_do() {
    let h = start(true).await;
    let pod = deployment_pod(
        json!({"ringfence.dev/inject": "true"}),
        json!({"ringfence.dev/agent": "ghost"}),
    );
    let (response, _) = h.admit_pod("team-a", &pod).await;
    assert_eq!(response["allowed"], false);
    let message = response["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("Agent team-a/ghost, which does not exist"),
        "{message}"
    );
    assert!(message.contains("apply the Agent first"), "{message}");
}

fn agent_policy(cedar: &str) -> Value {
    json!({
        "apiVersion": "ringfence.dev/v1alpha1",
        "kind": "AgentPolicy",
        "metadata": {"name": "no-loops", "namespace": "team-a", "uid": "c0ffee00-0000-4000-8000-000000000001", "generation": 1},
        "spec": {"cedar": cedar}
    })
}

#[tokio::test]
async fn a_bad_cedar_policy_is_refused_with_its_message_and_a_good_one_is_admitted() {
    let h = start(true).await;
    let bad = agent_policy(
        "forbid(principal == Agent::\"research\", action == Action::\"invoke\", resource == Agent::\"orchestrator\")\nwhen { principal.team == };",
    );
    let (status, answer, _) = h
        .post("/validate", &review("team-a", "agentpolicies", &bad))
        .await;
    assert_eq!(status, StatusCode::OK);
    let response = &answer["response"];
    assert_eq!(response["allowed"], false, "{answer}");
    let message = response["status"]["message"].as_str().unwrap();
    assert!(message.contains("AgentPolicy team-a/no-loops"), "{message}");
    assert!(message.contains("spec.cedar line 2"), "{message}");

    let good = agent_policy(
        "@id(\"no-loops\")\nforbid(principal == Agent::\"research\", action == Action::\"invoke\", resource == Agent::\"orchestrator\");",
    );
    let (_, answer, _) = h
        .post("/validate", &review("team-a", "agentpolicies", &good))
        .await;
    assert_eq!(answer["response"]["allowed"], true, "{answer}");
}

#[tokio::test]
async fn the_serving_certificate_rotates_without_a_restart() {
    let h = start(true).await;
    let pod = deployment_pod(json!({}), json!({}));
    let (_, _, before) = h.post("/inject", &review("team-a", "pods", &pod)).await;
    let next = certs::issue(
        &h.identity,
        &serving_names("ringfence-webhook", "ringfence-system"),
    )
    .unwrap();
    h.certs.send_replace(next.key);
    let (status, _, after) = h.post("/inject", &review("team-a", "pods", &pod)).await;
    assert_eq!(status, StatusCode::OK);
    assert_ne!(
        before, after,
        "the next handshake serves the renewed certificate"
    );
}

#[tokio::test]
async fn a_certificate_due_for_renewal_is_replaced_and_published() {
    let h = start(true).await;
    let names = serving_names("ringfence-webhook", "ringfence-system");
    let mut served = h.certs.subscribe();
    let before = served.borrow().cert[0].clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let due = time::OffsetDateTime::now_utc() - time::Duration::seconds(1);
    let renewer = tokio::spawn(certs::renew(
        h.identity.clone(),
        names,
        due,
        h.certs.clone(),
        async {
            let _ = stopped.await;
        },
    ));
    served.changed().await.unwrap();
    assert_ne!(
        served.borrow().cert[0],
        before,
        "a new certificate was published"
    );
    let (status, _, now_served) = h
        .post(
            "/inject",
            &review("team-a", "pods", &deployment_pod(json!({}), json!({}))),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        now_served,
        served.borrow().cert[0],
        "and the next handshake serves it"
    );
    stop.send(()).unwrap();
    renewer.await.unwrap();
}

#[tokio::test]
async fn garbage_is_a_400_not_a_decision() {
    let h = start(true).await;
    let (status, _, _) = h.post("/inject", &json!({"hello": "world"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[test]
fn native_sidecars_start_at_1_29() {
    assert_eq!(supports_native_sidecars("1", "29"), Some(true));
    assert_eq!(supports_native_sidecars("1", "31+"), Some(true));
    assert_eq!(supports_native_sidecars("1", "28"), Some(false));
    assert_eq!(supports_native_sidecars("1", ""), None);
}

mod ca_bundle_patching {
    use super::*;
    use http::Response;
    use kube::client::Body;

    const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    fn config(kind: &str, webhooks: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": kind,
            "metadata": {"name": "ringfence", "resourceVersion": "7"},
            "webhooks": webhooks
        }))
        .unwrap()
    }

    fn webhook(name: &str, ca_bundle: Option<&str>) -> Value {
        let mut client_config = json!({"service": {"name": "ringfence-webhook", "namespace": "ringfence-system", "path": "/inject", "port": 443}});
        if let Some(b) = ca_bundle {
            client_config["caBundle"] = json!(STANDARD.encode(b));
        }
        json!({
            "name": name, "clientConfig": client_config, "sideEffects": "None",
            "admissionReviewVersions": ["v1"]
        })
    }

    /// A mocked API server: answers each expected request in order and records what it got.
    fn mock(
        answers: Vec<(Method, &'static str, Vec<u8>)>,
    ) -> (kube::Client, tokio::task::JoinHandle<Vec<(String, Value)>>) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for (method, path, answer) in answers {
                let (req, send) = handle
                    .next_request()
                    .await
                    .expect("the client sends the expected request");
                assert_eq!(req.method(), method);
                assert_eq!(req.uri().path(), path);
                let content_type = req
                    .headers()
                    .get("content-type")
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default();
                let body = req.into_body().collect().await.unwrap().to_bytes();
                seen.push((
                    content_type,
                    serde_json::from_slice(&body).unwrap_or(Value::Null),
                ));
                send.send_response(Response::builder().body(Body::from(answer)).unwrap());
            }
            seen
        });
        (kube::Client::new(service, "default"), server)
    }

    const MUTATING: &str =
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/ringfence";
    const VALIDATING: &str =
        "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/ringfence";

    #[tokio::test]
    async fn only_webhooks_with_a_stale_bundle_are_patched() {
        let mutating = config(
            "MutatingWebhookConfiguration",
            json!([
                webhook("namespace.inject.ringfence.dev", None),
                webhook("pod.inject.ringfence.dev", Some(CA))
            ]),
        );
        let validating = config(
            "ValidatingWebhookConfiguration",
            json!([webhook("agentpolicies.ringfence.dev", Some("an old CA"))]),
        );
        let (client, server) = mock(vec![
            (Method::GET, MUTATING, mutating.clone()),
            (Method::PATCH, MUTATING, mutating),
            (Method::GET, VALIDATING, validating.clone()),
            (Method::PATCH, VALIDATING, validating),
        ]);
        let patched = ca_bundle::ensure(&client, "ringfence", CA).await.unwrap();
        assert_eq!(
            patched,
            ca_bundle::Patched {
                mutating: 1,
                validating: 1
            }
        );
        let seen = server.await.unwrap();
        assert_eq!(seen[1].0, "application/strategic-merge-patch+json");
        assert_eq!(
            seen[1].1,
            json!({"webhooks": [{"name": "namespace.inject.ringfence.dev", "clientConfig": {"caBundle": STANDARD.encode(CA)}}]})
        );
        assert_eq!(
            seen[3].1,
            json!({"webhooks": [{"name": "agentpolicies.ringfence.dev", "clientConfig": {"caBundle": STANDARD.encode(CA)}}]})
        );
    }

    #[tokio::test]
    async fn current_bundles_are_left_alone() {
        let (client, server) = mock(vec![
            (
                Method::GET,
                MUTATING,
                config(
                    "MutatingWebhookConfiguration",
                    json!([webhook("pod.inject.ringfence.dev", Some(CA))]),
                ),
            ),
            (
                Method::GET,
                VALIDATING,
                config(
                    "ValidatingWebhookConfiguration",
                    json!([webhook("agentpolicies.ringfence.dev", Some(CA))]),
                ),
            ),
        ]);
        let patched = ca_bundle::ensure(&client, "ringfence", CA).await.unwrap();
        assert_eq!(patched, ca_bundle::Patched::default());
        // The mock answered exactly two GETs; a PATCH would have found no answer.
        assert_eq!(server.await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_refused_patch_names_the_configuration_and_the_permission() {
        let mutating = config(
            "MutatingWebhookConfiguration",
            json!([webhook("pod.inject.ringfence.dev", None)]),
        );
        let forbidden = serde_json::to_vec(&json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403,
            "message": "mutatingwebhookconfigurations.admissionregistration.k8s.io \"ringfence\" is forbidden"
        }))
        .unwrap();
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        tokio::spawn(async move {
            let (_, send) = handle.next_request().await.unwrap();
            send.send_response(Response::builder().body(Body::from(mutating)).unwrap());
            let (_, send) = handle.next_request().await.unwrap();
            send.send_response(
                Response::builder()
                    .status(403)
                    .body(Body::from(forbidden))
                    .unwrap(),
            );
        });
        let client = kube::Client::new(service, "default");
        let err = ca_bundle::ensure(&client, "ringfence", CA)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot patch MutatingWebhookConfiguration ringfence"),
            "{err}"
        );
        assert!(err.contains("ClusterRole"), "{err}");
    }
}

#[test]
fn options_default_to_the_chart_names() {
    let s = options(NativeSidecars::Auto).settings("ringfence-system", true);
    assert!(s.excluded_namespaces.contains("ringfence-system"));
    assert_eq!(s.resources.requests.unwrap()["memory"].0, "64Mi");
    assert_eq!(
        serving_names("ringfence-webhook", "rf")[0],
        "ringfence-webhook.rf.svc"
    );
}
