//! Bundle distribution: the projection from manifests to published bundles ([`projection`]),
//! versioned snapshots ([`publish`]), the sidecars' acknowledgements ([`acks`]) and the HTTPS
//! endpoint that serves SVIDs and bundle streams ([`server`]).

pub mod acks;
pub mod projection;
pub mod publish;
pub mod server;

pub use acks::Acks;
pub use projection::{Projected, Projection};
pub use publish::{Published, Publisher, Snapshot};
pub use server::{ControlPlane, serve, serve_tls};
