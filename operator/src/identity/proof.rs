//! Attestation: how a sidecar proves which agent it speaks for before the CA signs its CSR.
//!
//! Each kind of proof is a variant here and one arm in [`attest`]. The Kubernetes proof (a
//! projected ServiceAccount token checked with TokenReview, plus the pod's Agent match) joins as
//! another variant; it needs the API server, so it will come with its own seam and test double.

use ringfence_crds::SpiffeId;

use super::tokens::{TokenError, Tokens};

/// What a caller of the CSR endpoint shows to prove its agent.
#[derive(Clone, Copy, Debug)]
pub enum Proof<'a> {
    /// Local mode: the agent's bootstrap token, as found in its token file.
    BootstrapToken(&'a str),
    /// Renewal: the identity in the caller's client certificate, already verified by the TLS
    /// handshake (`ringfence_crds::svid::peer_spiffe_id`).
    Svid(&'a SpiffeId),
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
}

/// Checks that `proof` proves `asked`.
pub(super) fn attest(
    proof: Proof<'_>,
    asked: &SpiffeId,
    tokens: &Tokens,
) -> Result<(), ProofError> {
    match proof {
        Proof::BootstrapToken(token) => Ok(tokens.verify(asked.agent(), token)?),
        Proof::Svid(presented) if presented == asked => Ok(()),
        Proof::Svid(presented) => Err(ProofError::OtherSvid {
            presented: Box::new(presented.clone()),
            asked: Box::new(asked.clone()),
        }),
    }
}
