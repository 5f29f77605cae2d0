//! The Ringfence control plane.
//!
//! Manifests (from the Kubernetes API or a local folder) are compiled into one policy bundle per
//! agent ([`compile`]); the trust domain's CA issues each sidecar its SVID ([`identity`]); the
//! bundle server pushes every agent's bundle to its sidecars and records what they enforce
//! ([`distribute`]).
#![forbid(unsafe_code)]

pub mod budget;
pub mod cli;
pub mod cluster;
pub mod compile;
pub mod demo;
pub mod distribute;
pub mod identity;
pub mod runs;
pub mod source;
pub mod webhook;
