//! Attestation: how a sidecar proves which agent it speaks for before the CA signs its CSR.
//!
//! Each kind of proof is a variant here and one arm in [`attest`]. The Kubernetes proof needs the
//! API server, so it is established before (`super::tokenreview`) and arrives here as the agent
//! the cluster vouched for.

use ringfence_crds::{AgentKey, SpiffeId};

use super::tokens::{TokenError, Tokens};

/// What a caller of the CSR endpoint shows to prove its agent.
#[derive(Clone, Copy, Debug)]
pub enum Proof<'a> {
    /// Local mode: the agent's bootstrap token, as found in its token file.
    BootstrapToken(&'a str),
    /// Renewal: the identity in the caller's client certificate, already verified by the TLS
    /// handshake (`ringfence_crds::svid::peer_spiffe_id`).
    Svid(&'a SpiffeId),
    /// Kubernetes: the caller's ServiceAccount token passed TokenReview, and the pod it is bound
    /// to runs this agent (`super::tokenreview::PodAttestor`).
    Pod(&'a AgentKey),
}

/// Why a proof does not prove the agent a request is for.
#[derive(Debug, thiserror::Error)]
pub enum ProofError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(
        "the client certificate is {presented}, but the request is for {asked}: a sidecar renews only its own SVID"
    )]
    OtherSvid {
        // Boxed: two identities inline would make every Result carrying this error large.
        presented: Box<SpiffeId>,
        asked: Box<SpiffeId>,
    },
    #[error(
        "the caller's pod runs Agent {pod_agent}, not {asked}: a pod gets the SVID of its own agent only (check the pod's ringfence.dev/agent annotation and the sidecar's --agent)"
    )]
    OtherAgent {
        pod_agent: Box<AgentKey>,
        asked: Box<AgentKey>,
    },
    #[error(
        "this control plane takes no bootstrap tokens: in Kubernetes, send the pod's projected ServiceAccount token (audience ringfence)"
    )]
    NoBootstrapTokens,
}

/// Checks that `proof` proves `asked`.
pub(super) fn attest(
    proof: Proof<'_>,
    asked: &SpiffeId,
    tokens: Option<&Tokens>,
) -> Result<(), ProofError> {
    match proof {
        Proof::BootstrapToken(token) => match tokens {
            Some(tokens) => Ok(tokens.verify(asked.agent(), token)?),
            None => Err(ProofError::NoBootstrapTokens),
        },
        Proof::Pod(agent) if agent == asked.agent() => Ok(()),
        Proof::Pod(agent) => Err(ProofError::OtherAgent {
            pod_agent: Box::new(agent.clone()),
            asked: Box::new(asked.agent().clone()),
        }),
        Proof::Svid(presented) if presented == asked => Ok(()),
        Proof::Svid(presented) => Err(ProofError::OtherSvid {
            presented: Box::new(presented.clone()),
            asked: Box::new(asked.clone()),
        }),
    }
}
