//! Sidecar injection, pure: does a pod opt in, which Agent does it run, and the RFC 6902 patch
//! that gives it the sidecar, the projected token, the trust bundle and the app's environment.
//!
//! Every piece is added only when missing, so the patch is idempotent: a pod that already has
//! the sidecar (a second pass, or `reinvocationPolicy: IfNeeded` after another webhook) gets an
//! empty patch, and a container another webhook added since gets just its environment.

use std::collections::{BTreeMap, BTreeSet};

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EnvFromSource, EnvVar,
    HTTPGetAction, KeyToPath, Pod, Probe, ProjectedVolumeSource, ResourceRequirements,
    SeccompProfile, SecretEnvSource, SecurityContext, ServiceAccountTokenProjection, Volume,
    VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use ringfence_crds::agent::ModelApi;
use ringfence_crds::selector::{self, SelectorError};
use ringfence_crds::{Agent, AgentKey};
use serde_json::Value;

/// Label or annotation `"true"` on a pod opts it in (`"false"` opts it out of its namespace's
/// injection); label `enabled` on a namespace opts in all its pods.
pub const INJECT: &str = "ringfence.dev/inject";
/// The namespace label value that opts in every pod of the namespace.
pub const NAMESPACE_ENABLED: &str = "enabled";
/// Annotation naming the pod's Agent (in the pod's namespace).
pub const AGENT: &str = "ringfence.dev/agent";
/// Annotation naming a Secret whose keys become the sidecar's environment: the API keys the
/// Agent's `spec.models[].apiKeyEnv` refer to. The app container never sees them.
pub const SIDECAR_SECRET: &str = "ringfence.dev/sidecar-secret";

/// The injected container's name; its presence is what "already injected" means.
pub const SIDECAR: &str = "ringfence-sidecar";
pub const TOKEN_VOLUME: &str = "ringfence-token";
pub const TRUST_VOLUME: &str = "ringfence-trust";
pub const TOKEN_DIR: &str = "/var/run/ringfence/token";
pub const TOKEN_FILE: &str = "/var/run/ringfence/token/token";
pub const TRUST_DIR: &str = "/var/run/ringfence/trust";
pub const CA_FILE: &str = "/var/run/ringfence/trust/ca.crt";
/// The audience the operator's TokenReview insists on.
pub const TOKEN_AUDIENCE: &str = "ringfence";
/// Projected tokens live an hour; the kubelet refreshes them at 80 %.
const TOKEN_SECONDS: i64 = 3600;
/// The operator writes the trust domain's CA here in every namespace with Agents.
pub const TRUST_BUNDLE_CONFIGMAP: &str = "ringfence-trust-bundle";
pub const TRUST_BUNDLE_KEY: &str = "ca.crt";

pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PORT: u16 = 15006;
pub const ADMIN_PORT: u16 = 15020;
/// The environment variable apps read to find their sidecar's outbound listener.
pub const OUTBOUND_ENV: &str = "RINGFENCE_OUTBOUND";

/// Namespaces never injected, whatever their labels say.
pub const ALWAYS_EXCLUDED: &[&str] = &["kube-system", "kube-public", "kube-node-lease"];

/// How injected sidecars are built.
#[derive(Debug, Clone)]
pub struct Settings {
    pub image: String,
    pub pull_policy: String,
    /// `https://ringfence.<ns>.svc:15012`.
    pub control_plane: String,
    /// `https://ringfence-budget.<ns>.svc:15013`.
    pub budget: String,
    /// Kubernetes 1.29+: an init container with `restartPolicy: Always`, started (and ready)
    /// before the app and stopped after it.
    pub native_sidecar: bool,
    pub resources: ResourceRequirements,
    /// Passed to the sidecar as `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub otlp_endpoint: Option<String>,
    /// The operator's own namespace and the system namespaces.
    pub excluded_namespaces: BTreeSet<String>,
}

/// Why an opted-in pod cannot be injected. The message is what `kubectl` shows the person who
/// created the pod (or in the ReplicaSet's events), so each says what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    #[error(
        "the pod opted into Ringfence injection but names no Agent: annotate it with {AGENT}: <agent>, or give an Agent in namespace {namespace} a spec.selector matching the pod's labels"
    )]
    NoAgent { namespace: String },
    #[error(
        "the pod's {AGENT} annotation names Agent {namespace}/{name}, which does not exist: apply the Agent first (kubectl get agents -n {namespace})"
    )]
    AgentNotFound { namespace: String, name: String },
    #[error(
        "the pod's labels match the selectors of several Agents ({}): annotate it with {AGENT} to pick one", agents.join(", ")
    )]
    Ambiguous { agents: Vec<String> },
    #[error("Agent {agent}'s spec.selector cannot be evaluated: {source}")]
    Selector {
        agent: String,
        #[source]
        source: SelectorError,
    },
    #[error("the pod's {AGENT} annotation {value:?} is not a valid agent name: {detail}")]
    BadAgentName { value: String, detail: String },
    #[error(
        "Agent {agent} has appPort {port}, which the sidecar itself uses ({OUTBOUND_PORT}, {INBOUND_PORT}, {ADMIN_PORT}): move the app to another port"
    )]
    PortClash { agent: String, port: u16 },
    #[error(
        "the pod uses hostNetwork, so its sidecar's ports would clash on the node: remove the {INJECT} opt-in or hostNetwork"
    )]
    HostNetwork,
}

/// Whether a pod is to get the sidecar, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Inject(OptIn),
    /// Not injected, for this reason (logged).
    Skip(&'static str),
}

/// Who asked for the sidecar: it decides what happens to a pod that runs no Agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptIn {
    /// The pod itself: one that names no Agent is refused, since it asked for what cannot be.
    Pod,
    /// Its namespace: a pod that matches no Agent (a database, a job) is admitted without a
    /// sidecar, with a warning; it still cannot reach any agent, whose sidecars demand mTLS.
    Namespace,
}

/// Why a pod that says nothing, in a namespace that says nothing, is skipped.
pub const NOT_OPTED_IN: &str = "not opted in";

/// Decides from the pod's labels and annotations, its namespace and the namespace's labels.
pub fn decide(
    pod: &Pod,
    namespace: &str,
    namespace_labels: Option<&BTreeMap<String, String>>,
    settings: &Settings,
) -> Decision {
    if settings.excluded_namespaces.contains(namespace) || ALWAYS_EXCLUDED.contains(&namespace) {
        return Decision::Skip("namespace excluded from injection");
    }
    let meta = &pod.metadata;
    fn said(map: &Option<BTreeMap<String, String>>) -> Option<&String> {
        map.as_ref().and_then(|m| m.get(INJECT))
    }
    // The pod's own word wins over its namespace's, label over annotation.
    match said(&meta.labels)
        .or_else(|| said(&meta.annotations))
        .map(String::as_str)
    {
        Some("true") => return Decision::Inject(OptIn::Pod),
        Some("false") => return Decision::Skip("pod opted out"),
        _ => {}
    }
    if namespace_labels
        .and_then(|l| l.get(INJECT))
        .map(String::as_str)
        == Some(NAMESPACE_ENABLED)
    {
        return Decision::Inject(OptIn::Namespace);
    }
    Decision::Skip(NOT_OPTED_IN)
}

/// The pod's Agent: the one its annotation names, else the one Agent whose selector matches its
/// labels. `agents` are the Agents of the pod's namespace.
pub fn resolve_agent<'a>(
    pod: &Pod,
    namespace: &str,
    agents: &'a [Agent],
) -> Result<&'a Agent, InjectError> {
    let named = pod.metadata.annotations.as_ref().and_then(|a| a.get(AGENT));
    if let Some(name) = named {
        AgentKey::new(namespace, name).map_err(|e| InjectError::BadAgentName {
            value: name.clone(),
            detail: e.to_string(),
        })?;
        return agents
            .iter()
            .find(|a| a.metadata.name.as_deref() == Some(name))
            .ok_or_else(|| InjectError::AgentNotFound {
                namespace: namespace.to_owned(),
                name: name.clone(),
            });
    }
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let mut matched = Vec::new();
    for a in agents {
        // An Agent without a selector is reached by annotation only; an empty selector would
        // otherwise claim every pod.
        let Some(sel) = &a.spec.selector else {
            continue;
        };
        let name = a.metadata.name.clone().unwrap_or_default();
        if selector::matches(sel, &labels).map_err(|source| InjectError::Selector {
            agent: name.clone(),
            source,
        })? {
            matched.push(a);
        }
    }
    match matched.as_slice() {
        [one] => Ok(one),
        [] => Err(InjectError::NoAgent {
            namespace: namespace.to_owned(),
        }),
        many => Err(InjectError::Ambiguous {
            agents: many
                .iter()
                .map(|a| a.metadata.name.clone().unwrap_or_default())
                .collect(),
        }),
    }
}

/// The patch that injects `agent`'s sidecar into `pod`; empty when everything is there.
pub fn patch(
    pod: &Pod,
    namespace: &str,
    agent: &Agent,
    settings: &Settings,
) -> Result<Patch, InjectError> {
    let agent_name = agent.metadata.name.clone().unwrap_or_default();
    let key = AgentKey::new(namespace, &agent_name).map_err(|e| InjectError::BadAgentName {
        value: agent_name.clone(),
        detail: e.to_string(),
    })?;
    let port = agent.spec.app_port;
    if [OUTBOUND_PORT, INBOUND_PORT, ADMIN_PORT].contains(&port) {
        return Err(InjectError::PortClash {
            agent: key.to_string(),
            port,
        });
    }
    let Some(spec) = &pod.spec else {
        // No spec is not a pod the API server would accept; leave it to its validation.
        return Ok(Patch(Vec::new()));
    };
    if spec.host_network == Some(true) {
        return Err(InjectError::HostNetwork);
    }

    let mut ops = Vec::new();
    // The Agent's Service selects its pods by this label when the Agent has no selector of its
    // own (the operator's reconciler), so a pod named by annotation carries it too.
    let labels = pod.metadata.labels.as_ref();
    if labels.and_then(|l| l.get(AGENT)) != Some(&agent_name) {
        ops.push(PatchOperation::Add(match labels {
            Some(_) => AddOperation {
                path: pointer(&["metadata", "labels", AGENT]),
                value: Value::String(agent_name.clone()),
            },
            None => AddOperation {
                path: pointer(&["metadata", "labels"]),
                value: serde_json::json!({ AGENT: agent_name }),
            },
        }));
    }
    let has_sidecar = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|c| c.name == SIDECAR);
    if !has_sidecar {
        let sidecar = sidecar_container(&key, port, pod, settings);
        if settings.native_sidecar {
            // First, so the app's own init containers already have the mesh.
            push_front(
                &mut ops,
                &["spec", "initContainers"],
                spec.init_containers.as_ref(),
                sidecar,
            );
        } else {
            push_front(
                &mut ops,
                &["spec", "containers"],
                Some(&spec.containers),
                sidecar,
            );
        }
    }

    let existing: BTreeSet<&str> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    let mut volumes_present = spec.volumes.is_some();
    for v in [token_volume(), trust_volume()] {
        if existing.contains(v.name.as_str()) {
            continue;
        }
        append(
            &mut ops,
            &["spec", "volumes"],
            &mut volumes_present,
            to_value(&v),
        );
    }

    // Indexes are those of the pod as received: a new sidecar went in front of `containers`
    // only in the non-native mode, which shifts every app container by one.
    let shift = usize::from(!has_sidecar && !settings.native_sidecar);
    let app_env = app_env(agent);
    for (i, c) in spec.containers.iter().enumerate() {
        if c.name == SIDECAR {
            continue;
        }
        let index = (i + shift).to_string();
        let have: BTreeSet<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
        let mut env_present = c.env.is_some();
        for e in &app_env {
            // A value the app set itself wins: it may point at its own proxy on purpose.
            if have.contains(e.name.as_str()) {
                continue;
            }
            append(
                &mut ops,
                &["spec", "containers", &index, "env"],
                &mut env_present,
                to_value(e),
            );
        }
    }
    Ok(Patch(ops))
}

/// The environment every app container gets: where its sidecar listens, and base URLs that send
/// OpenAI and Anthropic SDKs through the sidecar's metered `/models/<provider>/` routes. The
/// first provider of each API the Agent declares is used; with none declared the conventional
/// name is, so an undeclared provider fails with the sidecar's explanation instead of bypassing
/// it.
pub fn app_env(agent: &Agent) -> Vec<EnvVar> {
    let provider = |api: ModelApi, fallback: &str| {
        agent
            .spec
            .models
            .iter()
            .find(|m| m.api == api)
            .map_or_else(|| fallback.to_owned(), |m| m.name.clone())
    };
    let base = format!("http://127.0.0.1:{OUTBOUND_PORT}");
    vec![
        env(OUTBOUND_ENV, base.clone()),
        // OpenAI SDKs append `/chat/completions` to a base that ends in `/v1`.
        env(
            "OPENAI_BASE_URL",
            format!("{base}/models/{}/v1", provider(ModelApi::OpenAI, "openai")),
        ),
        // Anthropic SDKs append `/v1/messages` themselves.
        env(
            "ANTHROPIC_BASE_URL",
            format!(
                "{base}/models/{}",
                provider(ModelApi::Anthropic, "anthropic")
            ),
        ),
    ]
}

fn sidecar_container(agent: &AgentKey, app_port: u16, pod: &Pod, settings: &Settings) -> Container {
    let args = [
        ("--agent", agent.to_string()),
        ("--control-plane", settings.control_plane.clone()),
        ("--budget", settings.budget.clone()),
        ("--ca-file", CA_FILE.to_owned()),
        ("--token-file", TOKEN_FILE.to_owned()),
        ("--app", format!("127.0.0.1:{app_port}")),
        ("--outbound", format!("127.0.0.1:{OUTBOUND_PORT}")),
        ("--inbound", format!("0.0.0.0:{INBOUND_PORT}")),
        // The kubelet probes the pod's IP, not loopback.
        ("--admin", format!("0.0.0.0:{ADMIN_PORT}")),
    ]
    .into_iter()
    .flat_map(|(flag, value)| [flag.to_owned(), value])
    .collect();
    let mut env = Vec::new();
    if let Some(otlp) = &settings.otlp_endpoint {
        env.push(self::env("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.clone()));
        env.push(self::env("OTEL_SERVICE_NAME", SIDECAR.to_owned()));
    }
    let secret = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SIDECAR_SECRET))
        .map(|name| {
            vec![EnvFromSource {
                secret_ref: Some(SecretEnvSource {
                    name: name.clone(),
                    optional: Some(false),
                }),
                ..Default::default()
            }]
        });
    let probe = |path: &str, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::Int(i32::from(ADMIN_PORT)),
            ..Default::default()
        }),
        period_seconds: Some(2),
        failure_threshold: Some(failures),
        ..Default::default()
    };
    let port = |name: &str, port: u16| ContainerPort {
        name: Some(name.to_owned()),
        container_port: i32::from(port),
        protocol: Some("TCP".to_owned()),
        ..Default::default()
    };
    Container {
        name: SIDECAR.to_owned(),
        image: Some(settings.image.clone()),
        image_pull_policy: Some(settings.pull_policy.clone()),
        args: Some(args),
        env: (!env.is_empty()).then_some(env),
        env_from: secret,
        ports: Some(vec![
            port("rf-inbound", INBOUND_PORT),
            port("rf-admin", ADMIN_PORT),
        ]),
        // Ready means the sidecar holds its SVID and its agent's bundle; a native sidecar's
        // startup probe holds the app back until then (two minutes, then the kubelet restarts it).
        startup_probe: settings.native_sidecar.then(|| probe("/readyz", 60)),
        readiness_probe: Some(probe("/readyz", 3)),
        liveness_probe: Some(Probe {
            period_seconds: Some(10),
            ..probe("/healthz", 3)
        }),
        restart_policy: settings.native_sidecar.then(|| "Always".to_owned()),
        resources: Some(settings.resources.clone()),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(65532),
            run_as_group: Some(65532),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                add: None,
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                localhost_profile: None,
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: TOKEN_VOLUME.to_owned(),
                mount_path: TOKEN_DIR.to_owned(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount {
                name: TRUST_VOLUME.to_owned(),
                mount_path: TRUST_DIR.to_owned(),
                read_only: Some(true),
                ..Default::default()
            },
        ]),
        ..Default::default()
    }
}

fn token_volume() -> Volume {
    Volume {
        name: TOKEN_VOLUME.to_owned(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(TOKEN_AUDIENCE.to_owned()),
                    expiration_seconds: Some(TOKEN_SECONDS),
                    path: "token".to_owned(),
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn trust_volume() -> Volume {
    Volume {
        name: TRUST_VOLUME.to_owned(),
        config_map: Some(ConfigMapVolumeSource {
            name: TRUST_BUNDLE_CONFIGMAP.to_owned(),
            items: Some(vec![KeyToPath {
                key: TRUST_BUNDLE_KEY.to_owned(),
                path: TRUST_BUNDLE_KEY.to_owned(),
                mode: None,
            }]),
            // Written by the operator once the namespace has an Agent; until then the pod waits
            // in ContainerCreating with an event naming the ConfigMap.
            optional: Some(false),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn env(name: &str, value: String) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value),
        value_from: None,
    }
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    // k8s-openapi types serialize infallibly (string keys, no non-finite floats).
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn pointer(tokens: &[&str]) -> PointerBuf {
    PointerBuf::from_tokens(tokens.iter().copied())
}

/// Adds `item` at the front of the array at `path`, creating the array when absent.
fn push_front<T>(
    ops: &mut Vec<PatchOperation>,
    path: &[&str],
    current: Option<&Vec<T>>,
    item: Container,
) {
    let op = match current {
        Some(_) => {
            let mut p = path.to_vec();
            p.push("0");
            AddOperation {
                path: pointer(&p),
                value: to_value(&item),
            }
        }
        None => AddOperation {
            path: pointer(path),
            value: Value::Array(vec![to_value(&item)]),
        },
    };
    ops.push(PatchOperation::Add(op));
}

/// Appends `item` to the array at `path`, creating it (once) when absent.
fn append(ops: &mut Vec<PatchOperation>, path: &[&str], present: &mut bool, item: Value) {
    let op = if *present {
        let mut p = path.to_vec();
        p.push("-");
        AddOperation {
            path: pointer(&p),
            value: item,
        }
    } else {
        *present = true;
        AddOperation {
            path: pointer(path),
            value: Value::Array(vec![item]),
        }
    };
    ops.push(PatchOperation::Add(op));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            image: "ghcr.io/ringfence/sidecar:test".into(),
            pull_policy: "IfNotPresent".into(),
            control_plane: "https://ringfence.ringfence-system.svc:15012".into(),
            budget: "https://ringfence-budget.ringfence-system.svc:15013".into(),
            native_sidecar: true,
            resources: ResourceRequirements::default(),
            otlp_endpoint: None,
            excluded_namespaces: ["ringfence-system".to_owned()].into(),
        }
    }

    fn pod(json: Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    fn agent(name: &str, selector: Option<Value>) -> Agent {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "ringfence.dev/v1alpha1", "kind": "Agent",
            "metadata": {"name": name, "namespace": "team-a"},
            "spec": {"selector": selector, "appPort": 8080}
        }))
        .unwrap()
    }

    fn apply(pod: &Pod, patch: &Patch) -> Pod {
        let mut doc = serde_json::to_value(pod).unwrap();
        json_patch::patch(&mut doc, patch).unwrap();
        serde_json::from_value(doc).unwrap()
    }

    #[test]
    fn the_pods_own_opt_out_beats_its_namespace() {
        let s = settings();
        let enabled: BTreeMap<String, String> = [(INJECT.to_owned(), "enabled".to_owned())].into();
        let out = pod(serde_json::json!({"metadata": {"labels": {INJECT: "false"}}}));
        let plain = pod(serde_json::json!({"metadata": {}}));
        let annotated = pod(serde_json::json!({"metadata": {"annotations": {INJECT: "true"}}}));
        assert!(matches!(
            decide(&out, "team-a", Some(&enabled), &s),
            Decision::Skip(_)
        ));
        assert!(matches!(
            decide(&plain, "team-a", Some(&enabled), &s),
            Decision::Inject(_)
        ));
        assert!(matches!(
            decide(&plain, "team-a", None, &s),
            Decision::Skip(_)
        ));
        assert!(matches!(
            decide(&annotated, "team-a", None, &s),
            Decision::Inject(_)
        ));
        assert!(matches!(
            decide(&annotated, "kube-system", None, &s),
            Decision::Skip(_)
        ));
        assert!(matches!(
            decide(&annotated, "ringfence-system", None, &s),
            Decision::Skip(_)
        ));
    }

    #[test]
    fn the_agent_comes_from_the_annotation_or_exactly_one_selector() {
        let agents = vec![
            agent(
                "research",
                Some(serde_json::json!({"matchLabels": {"app": "research"}})),
            ),
            agent(
                "writer",
                Some(serde_json::json!({"matchLabels": {"app": "writer"}})),
            ),
            agent("critic", None),
        ];
        let by_label = pod(serde_json::json!({"metadata": {"labels": {"app": "writer"}}}));
        let by_name = pod(serde_json::json!({"metadata": {"annotations": {AGENT: "critic"}}}));
        let unknown = pod(serde_json::json!({"metadata": {"annotations": {AGENT: "ghost"}}}));
        let nobody = pod(serde_json::json!({"metadata": {"labels": {"app": "other"}}}));
        let name = |r: Result<&Agent, InjectError>| r.unwrap().metadata.name.clone().unwrap();
        assert_eq!(name(resolve_agent(&by_label, "team-a", &agents)), "writer");
        assert_eq!(name(resolve_agent(&by_name, "team-a", &agents)), "critic");
        let err = resolve_agent(&unknown, "team-a", &agents).unwrap_err();
        assert!(
            err.to_string()
                .contains("team-a/ghost, which does not exist"),
            "{err}"
        );
        let err = resolve_agent(&nobody, "team-a", &agents).unwrap_err();
        assert!(err.to_string().contains("names no Agent"), "{err}");

        let twice = vec![
            agent("a", Some(serde_json::json!({"matchLabels": {"app": "x"}}))),
            agent(
                "b",
                Some(
                    serde_json::json!({"matchExpressions": [{"key": "app", "operator": "Exists"}]}),
                ),
            ),
        ];
        let x = pod(serde_json::json!({"metadata": {"labels": {"app": "x"}}}));
        let err = resolve_agent(&x, "team-a", &twice).unwrap_err();
        assert_eq!(
            err,
            InjectError::Ambiguous {
                agents: vec!["a".into(), "b".into()]
            }
        );
    }

    #[test]
    fn a_regular_sidecar_shifts_the_app_containers_and_they_still_get_their_env() {
        let mut s = settings();
        s.native_sidecar = false;
        let p = pod(serde_json::json!({
            "metadata": {"annotations": {AGENT: "research"}},
            "spec": {"containers": [
                {"name": "app", "image": "app", "env": [{"name": "OPENAI_BASE_URL", "value": "http://mine"}]},
                {"name": "helper", "image": "helper"}
            ]}
        }));
        let patched = apply(
            &p,
            &patch(&p, "team-a", &agent("research", None), &s).unwrap(),
        );
        let spec = patched.spec.unwrap();
        let names: Vec<_> = spec.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, [SIDECAR, "app", "helper"]);
        assert!(spec.init_containers.is_none());
        let env = |c: &Container, n: &str| {
            c.env
                .iter()
                .flatten()
                .find(|e| e.name == n)
                .and_then(|e| e.value.clone())
        };
        assert_eq!(
            env(&spec.containers[1], "OPENAI_BASE_URL").as_deref(),
            Some("http://mine")
        );
        assert_eq!(
            env(&spec.containers[2], "OPENAI_BASE_URL").as_deref(),
            Some("http://127.0.0.1:15001/models/openai/v1")
        );
        assert_eq!(
            env(&spec.containers[1], OUTBOUND_ENV).as_deref(),
            Some("http://127.0.0.1:15001")
        );
        assert!(spec.containers[0].restart_policy.is_none());
        assert!(spec.containers[0].startup_probe.is_none());
    }

    #[test]
    fn base_urls_name_the_agents_declared_providers() {
        let mut a = agent("research", None);
        a.spec.models = serde_json::from_value(serde_json::json!([
            {"name": "claude", "url": "https://api.anthropic.com", "api": "Anthropic"},
            {"name": "azure", "url": "https://example.openai.azure.com"}
        ]))
        .unwrap();
        let env: BTreeMap<_, _> = app_env(&a)
            .into_iter()
            .map(|e| (e.name, e.value.unwrap()))
            .collect();
        assert_eq!(
            env["OPENAI_BASE_URL"],
            "http://127.0.0.1:15001/models/azure/v1"
        );
        assert_eq!(
            env["ANTHROPIC_BASE_URL"],
            "http://127.0.0.1:15001/models/claude"
        );
    }

    #[test]
    fn an_app_port_the_sidecar_uses_and_host_network_are_refused() {
        let s = settings();
        let p = pod(serde_json::json!({"spec": {"containers": [{"name": "app"}]}}));
        let mut a = agent("research", None);
        a.spec.app_port = 15006;
        assert!(matches!(
            patch(&p, "team-a", &a, &s),
            Err(InjectError::PortClash { port: 15006, .. })
        ));
        let host = pod(
            serde_json::json!({"spec": {"hostNetwork": true, "containers": [{"name": "app"}]}}),
        );
        assert_eq!(
            patch(&host, "team-a", &agent("research", None), &s),
            Err(InjectError::HostNetwork)
        );
    }
}
