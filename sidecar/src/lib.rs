//! Ringfence sidecar: the data plane beside every agent.
//!
//! This crate holds the sidecar's control-plane half and its policy decision:
//!
//! - [`identity`]: a locally generated key, a CSR to the control plane, an X.509-SVID renewed at
//!   half-life and published through a [`identity::CredentialStore`] that rustls reads at every
//!   handshake.
//! - [`bundle`]: the control plane's bundle stream turned into an `Arc<`[`bundle::Snapshot`]`>`
//!   published through a `watch`; an invalid bundle is rejected and the last good one stays.
//! - [`authz`]: one Cedar decision over a compiled policy slice; an evaluation error is a deny.
//! - [`admin`]: `/healthz`, `/readyz`, `/debug/bundle`, `/metrics`.
//! - [`control_plane`]: the HTTPS client both of them use.
//!
//! [`run::start`] wires them together; `main` only parses flags and waits for a signal.
#![forbid(unsafe_code)]

pub mod admin;
pub mod authz;
pub mod backoff;
pub mod batch;
pub mod bundle;
pub mod config;
pub mod context;
pub mod control_plane;
pub mod deny;
pub mod discovery;
pub mod fallback;
pub mod forward;
pub mod identity;
pub mod limits;
pub mod listen;
pub mod metrics;
pub mod pricing;
pub mod protocol;
pub mod proxy;
pub mod recheck;
pub mod retry;
pub mod run;
pub mod runtime;
pub mod spend;
pub mod taint;
pub mod telemetry;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tls;
pub mod tracecontext;
