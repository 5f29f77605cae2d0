//! Discovery filtered by policy: an agent sees only what it may call.
//!
//! - [`tools`]: an MCP `tools/list` answer, through `/tools/<server>/`, lists only the tools
//!   this agent may call (Cedar `call_tool`).

pub mod tools;
