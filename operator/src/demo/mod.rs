//! `ringfence demo`: the whole system on loopback, replaying the overnight-loop incident.
//!
//! - [`scenario`]: the acts — what each puts in force (manifests) and which control must stop
//!   its run;
//! - [`agents`]: orchestrator, research, writer and critic as small in-process A2A servers that
//!   call out through their sidecars, forwarding the run's context;
//! - [`upstream`]: the mock LLM, the MCP tools and the alert webhook they reach;
//! - [`system`]: the control plane, budget service and sidecar processes around them;
//! - [`output`]: what the demo prints.
//!
//! The command itself is `cli::demo`.

pub mod agents;
pub mod output;
pub mod scenario;
pub mod system;
pub mod upstream;
