//! Arbitrary bytes as a `ringfence-context` header, in both forms: never a panic, and whatever
//! decodes re-encodes to the same context.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringfence_sidecar::context::{self, Sealer};

const KEY: [u8; 32] = [7; 32];

fuzz_target!(|data: &[u8]| {
    let Ok(value) = std::str::from_utf8(data) else {
        return;
    };
    let sealer = Sealer::with_key("fuzz", KEY);
    let _ = sealer.open(value);
    if let Ok(hop) = context::decode(value) {
        // A decoded context is valid, so it encodes, and what it encodes to reads back the same.
        let again = hop.encode().expect("a decoded context encodes");
        assert_eq!(context::decode(&again).as_ref(), Ok(&hop));
        let _ = hop.check_hop("fuzz");
        // Reach the sealed path's payload decoding too: seal what decoded and open it.
        if let Ok(entered) = hop.enter("fuzz") {
            if let Ok(sealed) = sealer.seal(&entered) {
                assert_eq!(sealer.open(&sealed), Ok(entered));
            }
        }
    }
});
