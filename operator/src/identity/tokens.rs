//! Bootstrap tokens: how a sidecar proves which agent it speaks for in local mode, where there is
//! no Kubernetes to vouch for it.
//!
//! Each agent gets one random 256-bit token, created once and kept in
//! `<state>/tokens/<namespace>/<name>.token` (mode 0600). Whoever can read that file can become
//! the agent, so it is handed only to that agent's sidecar. To revoke a token, delete the file;
//! the next [`Tokens::ensure`] writes a new one.

use std::io;
use std::path::{Path, PathBuf};

use ring::rand::{SecureRandom, SystemRandom};
use ringfence_crds::AgentKey;
use subtle::ConstantTimeEq;

use super::files;

/// 256 bits, hex-encoded.
const TOKEN_HEX_LEN: usize = 64;

/// Why a token cannot be created or does not prove the agent.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(
        "cannot {action} {path}: {source}; check that the state directory exists and the control plane may write to it"
    )]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the bootstrap token file {path} is corrupt (expected {TOKEN_HEX_LEN} hex characters); delete it to issue {agent} a new token"
    )]
    Corrupt { agent: AgentKey, path: PathBuf },
    #[error(
        "{agent} has no bootstrap token ({path} does not exist); is the agent in the manifests?"
    )]
    Missing { agent: AgentKey, path: PathBuf },
    #[error("the bootstrap token does not prove {agent}; give its sidecar the token in {path}")]
    Wrong { agent: AgentKey, path: PathBuf },
    #[error("the system random number generator failed; the host cannot create tokens")]
    Random,
}

/// The bootstrap tokens of every agent, on disk.
pub(super) struct Tokens {
    dir: PathBuf,
}

impl Tokens {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("tokens"),
        }
    }

    /// Where `agent`'s token lives. Only meaningful for a validated [`AgentKey`] (as built by
    /// `AgentKey::new`); callers holding a deserialized one re-validate it first.
    pub fn path(&self, agent: &AgentKey) -> PathBuf {
        self.dir
            .join(&agent.namespace)
            .join(format!("{}.token", agent.name))
    }

    /// Creates the tokens that do not exist yet; existing ones are kept, and checked.
    pub fn ensure(&self, agents: &[AgentKey]) -> Result<(), TokenError> {
        for agent in agents {
            let path = self.path(agent);
            match self.read(agent, &path)? {
                Some(_) => continue,
                None => {
                    let dir = path.parent().unwrap_or(&self.dir);
                    files::private_dir(dir).map_err(|source| TokenError::Io {
                        action: "create",
                        path: dir.to_owned(),
                        source,
                    })?;
                    files::write_private(&path, new_token()?.as_bytes()).map_err(|source| {
                        TokenError::Io {
                            action: "write",
                            path: path.clone(),
                            source,
                        }
                    })?;
                    tracing::info!(%agent, path = %path.display(), "created bootstrap token");
                }
            }
        }
        Ok(())
    }

    /// Checks `presented` against `agent`'s token, in constant time.
    pub fn verify(&self, agent: &AgentKey, presented: &str) -> Result<(), TokenError> {
        let path = self.path(agent);
        let Some(expected) = self.read(agent, &path)? else {
            return Err(TokenError::Missing {
                agent: agent.clone(),
                path,
            });
        };
        // Length is not secret (every token has the same one); the content is compared in
        // constant time so response timing leaks nothing about it.
        let presented = presented.trim().to_ascii_lowercase();
        if bool::from(presented.as_bytes().ct_eq(expected.as_bytes())) {
            Ok(())
        } else {
            Err(TokenError::Wrong {
                agent: agent.clone(),
                path,
            })
        }
    }

    fn read(&self, agent: &AgentKey, path: &Path) -> Result<Option<String>, TokenError> {
        let Some(text) = files::read_if_exists(path).map_err(|source| TokenError::Io {
            action: "read",
            path: path.to_owned(),
            source,
        })?
        else {
            return Ok(None);
        };
        // Trailing whitespace is tolerated: people write token files with editors and `echo`.
        let token = text.trim();
        if token.len() != TOKEN_HEX_LEN || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TokenError::Corrupt {
                agent: agent.clone(),
                path: path.to_owned(),
            });
        }
        Ok(Some(token.to_ascii_lowercase()))
    }
}

fn new_token() -> Result<String, TokenError> {
    let mut bytes = [0u8; TOKEN_HEX_LEN / 2];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| TokenError::Random)?;
    Ok(hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn agent(name: &str) -> AgentKey {
        AgentKey::new("default", name).unwrap()
    }

    #[test]
    fn each_agent_gets_its_own_token_once() {
        let state = tempfile::tempdir().unwrap();
        let tokens = Tokens::new(state.path());
        let (research, writer) = (agent("research"), agent("writer"));
        tokens.ensure(&[research.clone(), writer.clone()]).unwrap();
        let path = tokens.path(&research);
        assert_eq!(path, state.path().join("tokens/default/research.token"));
        let first = std::fs::read_to_string(&path).unwrap();
        assert_eq!(first.len(), TOKEN_HEX_LEN);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        tokens.ensure(std::slice::from_ref(&research)).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), first);
        assert_ne!(
            std::fs::read_to_string(tokens.path(&writer)).unwrap(),
            first
        );
        tokens.verify(&research, &first).unwrap();
        tokens.verify(&research, &format!("{first}\n")).unwrap();
    }

    #[test]
    fn a_wrong_token_is_refused() {
        let state = tempfile::tempdir().unwrap();
        let tokens = Tokens::new(state.path());
        let (research, writer) = (agent("research"), agent("writer"));
        tokens.ensure(&[research.clone(), writer.clone()]).unwrap();
        let writers = std::fs::read_to_string(tokens.path(&writer)).unwrap();
        for wrong in [writers.as_str(), "", "x", &"0".repeat(TOKEN_HEX_LEN)] {
            let err = tokens.verify(&research, wrong).unwrap_err();
            assert!(matches!(err, TokenError::Wrong { .. }), "{err}");
        }
    }

    #[test]
    fn an_agent_without_a_token_is_refused() {
        let state = tempfile::tempdir().unwrap();
        let tokens = Tokens::new(state.path());
        let err = tokens.verify(&agent("stranger"), "anything").unwrap_err();
        assert!(matches!(err, TokenError::Missing { .. }), "{err}");
    }

    #[test]
    fn a_corrupt_token_file_is_reported_not_replaced() {
        let state = tempfile::tempdir().unwrap();
        let tokens = Tokens::new(state.path());
        let research = agent("research");
        tokens.ensure(std::slice::from_ref(&research)).unwrap();
        std::fs::write(tokens.path(&research), "short").unwrap();
        let err = tokens.ensure(std::slice::from_ref(&research)).unwrap_err();
        assert!(matches!(err, TokenError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("research.token"));
        assert_eq!(
            std::fs::read_to_string(tokens.path(&research)).unwrap(),
            "short"
        );
    }
}
