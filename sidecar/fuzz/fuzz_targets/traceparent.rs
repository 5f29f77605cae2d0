//! Arbitrary bytes as a `traceparent` header: never a panic, and whatever parses prints back as
//! a version-00 header that parses to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringfence_sidecar::tracecontext::TraceParent;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(tp) = TraceParent::parse(value) {
        let printed = tp.to_string();
        assert_eq!(printed.len(), 55);
        assert_eq!(TraceParent::parse(&printed), Ok(tp));
        if value.starts_with("00-") {
            assert_eq!(printed, value);
        }
    }
});
