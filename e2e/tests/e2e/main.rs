//! The end-to-end suite, one test binary (one link, not one per file): real processes on loopback.

mod a2a_sdk;
mod budget;
mod data_plane;
mod demo;
mod discovery;
mod incident_sdk;
mod local_mode;
mod mcp_sdk;
mod model_fallback;
mod openai_client;
mod python_peers;
mod retries;
mod rotation;
mod traces;
