//! Arbitrary bytes as A2A traffic: a JSON-RPC body, an HTTP+JSON route (verb from the first
//! byte, the rest as a lossy path), an agent card. Never a panic; a rewritten card is still a
//! JSON object, and a mesh URL always lands under the agent's prefix.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringfence_sidecar::protocol::a2a::{self, A2aMethod};

const BASE: &str = "http://127.0.0.1:15001";

fuzz_target!(|data: &[u8]| {
    let call = a2a::inspect(data);
    if let Some(method) = call.method {
        assert_eq!(A2aMethod::from_jsonrpc(method.name()), Some(method));
    }

    if let Some((&selector, rest)) = data.split_first() {
        let verb = ["GET", "POST", "DELETE", "PUT", "PATCH"][usize::from(selector % 5)];
        let path = String::from_utf8_lossy(rest);
        let route = A2aMethod::from_http_parts(verb, &path);
        let inspected = a2a::inspect_http_parts(verb, &path, rest);
        assert_eq!(
            route.map(|(method, _)| method),
            inspected.and_then(|c| c.method)
        );
        let _ = a2a::is_card_path(&path);
        if let Some(url) = a2a::mesh_url(&path, BASE, "research") {
            assert!(url.starts_with("http://127.0.0.1:15001/agents/research"));
        }
    }

    let mesh = |url: &str| a2a::mesh_url(url, BASE, "research");
    if let Ok(card) = a2a::rewrite_card(data, mesh) {
        assert!(a2a::rewrite_card(&card, |_| None).is_ok());
    }
});
