//! Arbitrary bytes as a JSON-RPC request body: never a panic, and every error response the
//! sidecar would send back is a JSON object that carries the request's id when there was one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringfence_sidecar::protocol::{a2a, jsonrpc};

/// A full JSON parse that insists on an object (`rewrite_card` with nothing to rewrite), since
/// serde_json is not a dependency of this crate.
fn is_json_object(bytes: &[u8]) -> bool {
    a2a::rewrite_card(bytes, |_| None).is_ok()
}

fuzz_target!(|data: &[u8]| {
    let _ = jsonrpc::looks_like_jsonrpc(data);
    match jsonrpc::parse_request(data) {
        Ok(envelope) => {
            let out = jsonrpc::error_response(
                envelope.id.as_ref(),
                jsonrpc::METHOD_NOT_FOUND,
                &envelope.method,
                Default::default(),
            );
            assert!(is_json_object(&out));
            if let Some(id) = &envelope.id {
                assert!(String::from_utf8_lossy(&out).contains(id.as_json()));
            }
            if let Some(params) = envelope.params {
                assert!(params.get().starts_with(['{', '[']));
            }
        }
        Err(err) => {
            assert!(is_json_object(&jsonrpc::error_response_for(&err)));
            assert!(err.code() == jsonrpc::PARSE_ERROR || err.code() == jsonrpc::INVALID_REQUEST);
        }
    }
});
