//! The control plane's integration tests, one test binary (one link, not one per file).

mod budget_service;
mod budget_store;
mod cli;
mod incident_policy;
mod local_control_plane;
mod quota_store;
