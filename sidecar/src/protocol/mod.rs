//! What the sidecar reads of the protocols it carries: JSON-RPC envelopes, A2A methods and agent
//! cards, MCP tool calls. Pure functions over bytes and headers; the proxy decides what to do.

pub mod a2a;
pub mod jsonrpc;
pub mod llm;
pub mod mcp;
