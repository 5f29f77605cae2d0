//! Arbitrary bytes as MCP traffic: the first three lines are the Mcp-Method, Mcp-Name and
//! MCP-Protocol-Version headers, the rest the body (also tried whole as a body and as a
//! tools/list response). Never a panic; a traceparent set into `_meta` reads back, and filtering
//! a tools list twice changes nothing the second time.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringfence_sidecar::protocol::{jsonrpc, mcp};

const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(4, |&b| b == b'\n');
    let (Some(method), Some(name), Some(version), Some(body)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        exercise_body(data);
        return;
    };
    let headers = mcp::McpHeaders {
        method: (!method.is_empty()).then_some(method),
        name: (!name.is_empty()).then_some(name),
        protocol_version: (!version.is_empty()).then_some(version),
        repeated: None,
    };
    if let Ok(envelope) = jsonrpc::parse_request(body) {
        if let Ok(call) = mcp::inspect_envelope(headers, &envelope) {
            assert_eq!(call.method, envelope.method);
            if call.tool().is_some() {
                assert_eq!(call.method, "tools/call");
            }
        }
    }
    exercise_body(body);
    exercise_body(data);
});

fn exercise_body(body: &[u8]) {
    let _ = mcp::inspect(&Default::default(), body);
    let _ = mcp::meta_trace(body);
    if let Ok(out) = mcp::set_meta_traceparent(body, TP) {
        assert_eq!(mcp::meta_trace(&out).traceparent.as_deref(), Some(TP));
        let before = jsonrpc::parse_request(body).map(|e| (e.id, e.method.into_owned()));
        let after = jsonrpc::parse_request(&out).map(|e| (e.id, e.method.into_owned()));
        assert_eq!(before.ok(), after.ok());
    }
    let allowed = |tool: &str| tool.len() % 2 == 0;
    if let Ok(once) = mcp::filter_tools_list(body, allowed) {
        let twice = mcp::filter_tools_list(&once, allowed).expect("filtered output filters again");
        assert_eq!(once, twice);
    }
}
