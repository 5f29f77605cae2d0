//! The Kubernetes proof: a sidecar shows its pod's projected ServiceAccount token (audience
//! `ringfence`); the API server vouches for it (TokenReview) and names the pod it is bound to;
//! the pod's `ringfence.dev/agent` annotation, or else the one Agent whose selector matches its
//! labels, says which agent it runs. Only that agent's SVID is signed ([`super::Proof::Pod`]).
//!
//! Bound tokens die with their pod, so a token copied out of a deleted pod proves nothing. The
//! pod's UID in the token is checked against the pod found, so a new pod reusing the name of an
//! old one does not inherit the old one's tokens.

use std::collections::BTreeMap;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use ringfence_crds::{Agent, AgentKey, selector};

/// The audience a sidecar's projected token must be minted for.
pub const AUDIENCE: &str = "ringfence";
/// The pod annotation naming the pod's Agent (in the pod's namespace).
pub const AGENT_ANNOTATION: &str = "ringfence.dev/agent";
/// TokenReview's user extras that name the pod a bound token belongs to.
const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";
const SA_PREFIX: &str = "system:serviceaccount:";

/// Where the attestor finds the Agents of a namespace (the operator's index; a list in tests).
pub trait AgentDirectory: Send + Sync {
    fn agents_in(&self, namespace: &str) -> Vec<Agent>;
}

impl AgentDirectory for Vec<Agent> {
    fn agents_in(&self, namespace: &str) -> Vec<Agent> {
        self.iter()
            .filter(|a| a.metadata.namespace.as_deref() == Some(namespace))
            .cloned()
            .collect()
    }
}

/// Why a token does not prove an agent, or could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum PodProofError {
    #[error("the Kubernetes API could not be asked ({what}): {source}")]
    Api {
        what: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("the ServiceAccount token was not accepted by the API server: {0}")]
    NotAuthenticated(String),
    #[error(
        "the ServiceAccount token is not for audience {AUDIENCE:?}: mount a projected token with `audience: {AUDIENCE}`"
    )]
    WrongAudience,
    #[error(
        "the token's user {0:?} is not a ServiceAccount: send the pod's projected ServiceAccount token"
    )]
    NotServiceAccount(String),
    #[error(
        "the token is not bound to a pod: send a projected ServiceAccount token mounted into the sidecar's pod, not a long-lived Secret token"
    )]
    NotBoundToPod,
    #[error("the pod {namespace}/{name} the token is bound to no longer exists")]
    PodGone { namespace: String, name: String },
    #[error(
        "the token belongs to an earlier pod named {namespace}/{name} (uid {token_uid}), not the one running now"
    )]
    PodReplaced {
        namespace: String,
        name: String,
        token_uid: String,
    },
    #[error(
        "the token is for ServiceAccount {token_sa:?}, but pod {namespace}/{name} runs as {pod_sa:?}"
    )]
    ServiceAccountMismatch {
        namespace: String,
        name: String,
        token_sa: String,
        pod_sa: String,
    },
    #[error(transparent)]
    Mapping(#[from] MappingError),
}

impl PodProofError {
    /// Whether the caller is at fault (403), rather than the API server being unreachable.
    pub fn is_refusal(&self) -> bool {
        !matches!(self, PodProofError::Api { .. })
    }
}

/// Why a pod maps to no single Agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    #[error(
        "pod {namespace}/{pod} names Agent {agent:?} ({AGENT_ANNOTATION}), but no such Agent exists in {namespace}: apply it first"
    )]
    UnknownAgent {
        namespace: String,
        pod: String,
        agent: String,
    },
    #[error(
        "pod {namespace}/{pod} names Agent {agent:?} in another namespace; a pod runs an agent of its own namespace"
    )]
    OtherNamespace {
        namespace: String,
        pod: String,
        agent: String,
    },
    #[error(
        "pod {namespace}/{pod} runs no Agent: annotate it with {AGENT_ANNOTATION}: <name>, or give it the labels of an Agent's selector"
    )]
    NoAgent { namespace: String, pod: String },
    #[error(
        "pod {namespace}/{pod} matches the selectors of several Agents ({agents}): annotate it with {AGENT_ANNOTATION} to say which"
    )]
    Ambiguous {
        namespace: String,
        pod: String,
        agents: String,
    },
}

/// The Agent a pod runs: its annotation when present, else the one Agent whose selector matches
/// its labels. Agents without a selector select nothing (they are named by annotation).
pub fn agent_of_pod(
    namespace: &str,
    pod: &str,
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
    agents: &[Agent],
) -> Result<AgentKey, MappingError> {
    let key = |name: &str| AgentKey {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    };
    if let Some(named) = annotations.get(AGENT_ANNOTATION) {
        let name = match named.split_once('/') {
            Some((ns, name)) if ns == namespace => name,
            Some(_) => {
                return Err(MappingError::OtherNamespace {
                    namespace: namespace.to_owned(),
                    pod: pod.to_owned(),
                    agent: named.clone(),
                });
            }
            None => named.as_str(),
        };
        return if agents
            .iter()
            .any(|a| a.metadata.name.as_deref() == Some(name))
        {
            Ok(key(name))
        } else {
            Err(MappingError::UnknownAgent {
                namespace: namespace.to_owned(),
                pod: pod.to_owned(),
                agent: named.clone(),
            })
        };
    }
    let mut matching: Vec<&str> = agents
        .iter()
        .filter(|a| {
            a.spec
                .selector
                .as_ref()
                // A selector that cannot be evaluated selects nothing; the Agent's status says why.
                .is_some_and(|sel| selector::matches(sel, labels).unwrap_or(false))
        })
        .filter_map(|a| a.metadata.name.as_deref())
        .collect();
    matching.sort_unstable();
    match matching.as_slice() {
        [one] => Ok(key(one)),
        [] => Err(MappingError::NoAgent {
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
        }),
        many => Err(MappingError::Ambiguous {
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
            agents: many.join(", "),
        }),
    }
}

/// Checks ServiceAccount tokens with the API server and maps their pods to Agents.
pub struct PodAttestor {
    client: kube::Client,
    agents: Box<dyn AgentDirectory>,
}

impl PodAttestor {
    pub fn new(client: kube::Client, agents: Box<dyn AgentDirectory>) -> Self {
        Self { client, agents }
    }

    /// The Agent the token's pod runs, or why the token proves none.
    pub async fn attest(&self, token: &str) -> Result<AgentKey, PodProofError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![AUDIENCE.to_owned()]),
            },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|source| PodProofError::Api {
                what: "TokenReview",
                source,
            })?;
        let bound = bound_pod(reviewed.status.unwrap_or_default())?;
        let pod = match Api::<Pod>::namespaced(self.client.clone(), &bound.namespace)
            .get_opt(&bound.pod)
            .await
        {
            Ok(Some(pod)) => pod,
            Ok(None) => {
                return Err(PodProofError::PodGone {
                    namespace: bound.namespace,
                    name: bound.pod,
                });
            }
            Err(source) => {
                return Err(PodProofError::Api {
                    what: "get pod",
                    source,
                });
            }
        };
        if let Some(uid) = &bound.uid
            && pod.metadata.uid.as_ref() != Some(uid)
        {
            return Err(PodProofError::PodReplaced {
                namespace: bound.namespace,
                name: bound.pod,
                token_uid: uid.clone(),
            });
        }
        let pod_sa = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".to_owned());
        if pod_sa != bound.service_account {
            return Err(PodProofError::ServiceAccountMismatch {
                namespace: bound.namespace,
                name: bound.pod,
                token_sa: bound.service_account,
                pod_sa,
            });
        }
        let agents = self.agents.agents_in(&bound.namespace);
        let empty = BTreeMap::new();
        Ok(agent_of_pod(
            &bound.namespace,
            &bound.pod,
            pod.metadata.labels.as_ref().unwrap_or(&empty),
            pod.metadata.annotations.as_ref().unwrap_or(&empty),
            &agents,
        )?)
    }
}

/// The pod a reviewed token is bound to.
#[derive(Debug, PartialEq, Eq)]
struct BoundPod {
    namespace: String,
    service_account: String,
    pod: String,
    uid: Option<String>,
}

fn bound_pod(status: TokenReviewStatus) -> Result<BoundPod, PodProofError> {
    if status.authenticated != Some(true) {
        return Err(PodProofError::NotAuthenticated(
            status.error.unwrap_or_else(|| "no reason given".to_owned()),
        ));
    }
    // With spec.audiences set, the API server answers the audiences the token matched.
    if !status
        .audiences
        .as_deref()
        .is_some_and(|a| a.iter().any(|a| a == AUDIENCE))
    {
        return Err(PodProofError::WrongAudience);
    }
    let user = status.user.unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let Some((namespace, service_account)) = username
        .strip_prefix(SA_PREFIX)
        .and_then(|rest| rest.split_once(':'))
    else {
        return Err(PodProofError::NotServiceAccount(username));
    };
    let extra = user.extra.unwrap_or_default();
    let first = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
    let pod = first(POD_NAME_EXTRA).ok_or(PodProofError::NotBoundToPod)?;
    Ok(BoundPod {
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
        pod,
        uid: first(POD_UID_EXTRA),
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::authentication::v1::UserInfo;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    use ringfence_crds::AgentSpec;

    use super::*;

    fn agent(name: &str, app: Option<&str>) -> Agent {
        let mut a = Agent::new(
            name,
            AgentSpec {
                selector: app.map(|app| LabelSelector {
                    match_labels: Some([("app".to_owned(), app.to_owned())].into()),
                    match_expressions: None,
                }),
                app_port: 8080,
                team: None,
                environment: None,
                trust: Default::default(),
                may_start_runs: false,
                invoke_rate_limit: None,
                tools: vec![],
                models: vec![],
                fallback: None,
                description: None,
            },
        );
        a.metadata.namespace = Some("default".into());
        a
    }

    fn map(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_annotation_names_the_agent_before_any_selector() {
        let agents = [
            agent("research", Some("research")),
            agent("orchestrator", None),
        ];
        let got = agent_of_pod(
            "default",
            "p",
            &map(&[("app", "research")]),
            &map(&[(AGENT_ANNOTATION, "orchestrator")]),
            &agents,
        );
        assert_eq!(got.unwrap().name, "orchestrator");
        let by_label = agent_of_pod(
            "default",
            "p",
            &map(&[("app", "research")]),
            &map(&[]),
            &agents,
        );
        assert_eq!(by_label.unwrap().name, "research");
    }

    #[test]
    fn a_pod_cannot_claim_an_agent_that_does_not_exist_or_lives_elsewhere() {
        let agents = [agent("research", None)];
        let unknown = agent_of_pod(
            "default",
            "p",
            &map(&[]),
            &map(&[(AGENT_ANNOTATION, "ghost")]),
            &agents,
        );
        assert!(matches!(unknown, Err(MappingError::UnknownAgent { .. })));
        let elsewhere = agent_of_pod(
            "default",
            "p",
            &map(&[]),
            &map(&[(AGENT_ANNOTATION, "prod/research")]),
            &agents,
        );
        assert!(matches!(
            elsewhere,
            Err(MappingError::OtherNamespace { .. })
        ));
        let none = agent_of_pod("default", "p", &map(&[("app", "x")]), &map(&[]), &agents);
        assert!(matches!(none, Err(MappingError::NoAgent { .. })));
    }

    #[test]
    fn a_pod_matching_two_selectors_is_ambiguous() {
        let agents = [agent("a", Some("x")), agent("b", Some("x"))];
        let err =
            agent_of_pod("default", "p", &map(&[("app", "x")]), &map(&[]), &agents).unwrap_err();
        assert!(err.to_string().contains("a, b"), "{err}");
    }

    fn status(username: &str, audiences: &[&str], pod: Option<&str>) -> TokenReviewStatus {
        let mut extra = BTreeMap::new();
        if let Some(pod) = pod {
            extra.insert(POD_NAME_EXTRA.to_owned(), vec![pod.to_owned()]);
            extra.insert(POD_UID_EXTRA.to_owned(), vec!["uid-1".to_owned()]);
        }
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            error: None,
            user: Some(UserInfo {
                username: Some(username.to_owned()),
                extra: Some(extra),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_reviewed_token_names_its_namespace_service_account_and_pod() {
        let bound = bound_pod(status(
            "system:serviceaccount:default:research",
            &[AUDIENCE],
            Some("research-7d9f"),
        ))
        .unwrap();
        assert_eq!(
            bound,
            BoundPod {
                namespace: "default".into(),
                service_account: "research".into(),
                pod: "research-7d9f".into(),
                uid: Some("uid-1".into()),
            }
        );
    }

    #[test]
    fn tokens_for_other_audiences_users_or_without_a_pod_prove_nothing() {
        let wrong_audience = bound_pod(status(
            "system:serviceaccount:default:research",
            &["https://kubernetes.default.svc"],
            Some("p"),
        ));
        assert!(matches!(wrong_audience, Err(PodProofError::WrongAudience)));
        let user = bound_pod(status("alice", &[AUDIENCE], Some("p")));
        assert!(matches!(user, Err(PodProofError::NotServiceAccount(_))));
        let unbound = bound_pod(status(
            "system:serviceaccount:default:research",
            &[AUDIENCE],
            None,
        ));
        assert!(matches!(unbound, Err(PodProofError::NotBoundToPod)));
        let refused = bound_pod(TokenReviewStatus {
            authenticated: Some(false),
            error: Some("token expired".into()),
            ..Default::default()
        });
        assert!(refused.unwrap_err().to_string().contains("token expired"));
    }
}
