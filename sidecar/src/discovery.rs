//! Discovery filtered by policy: an agent sees only what it may call.
//!
//! - [`agents`]: `GET /agents` on the outbound listener answers with the agent cards of exactly
//!   the agents this agent may invoke (Cedar `invoke`), fetched through the mesh.
//! - [`tools`]: an MCP `tools/list` answer, through `/tools/<server>/`, lists only the tools
//!   this agent may call (Cedar `call_tool`).

pub mod agents;
pub mod tools;
