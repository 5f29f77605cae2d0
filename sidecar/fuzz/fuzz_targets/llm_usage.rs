//! Arbitrary bytes as LLM traffic, for each API: as a request (read, then rewritten for stream
//! usage), as a complete JSON response, and as an SSE stream fed whole and in pieces whose size
//! the first byte chooses. Never a panic; a rewritten request reads back the same with
//! `include_usage` on (a second rewrite changes nothing); a stream's usage does not depend on
//! where its chunks were split; whatever usage comes out can be priced.
#![no_main]

use std::borrow::Cow;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use ringfence_sidecar::pricing::Pricing;
use ringfence_sidecar::protocol::llm::{self, Api, Estimate, Usage, UsageStream};

const APIS: [Api; 3] = [Api::ChatCompletions, Api::Responses, Api::AnthropicMessages];

fn pricing() -> &'static Pricing {
    static TABLE: OnceLock<Pricing> = OnceLock::new();
    TABLE.get_or_init(Pricing::default_table)
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, body)) = data.split_first() else {
        return;
    };
    for api in APIS {
        let estimate = Estimate {
            input_tokens: u64::from(seed),
            max_output_tokens: (seed % 2 == 0).then_some(u64::from(seed) * 7),
        };

        if let Ok(request) = llm::inspect_request(api, body) {
            if let Ok(out) = request.with_stream_usage(body) {
                let again = llm::inspect_request(api, &out).expect("a rewritten body reads");
                assert_eq!(again.model, request.model);
                assert_eq!(again.stream, request.stream);
                assert_eq!(again.max_output_tokens, request.max_output_tokens);
                let twice = again.with_stream_usage(&out).expect("rewrites again");
                assert!(
                    matches!(twice, Cow::Borrowed(_)),
                    "the rewrite is idempotent"
                );
            }
        }

        let _ = llm::response_usage(api, body);
        let usage = llm::response_usage_or_estimate(api, body, &estimate);
        price(&usage);

        let step = usize::from(seed % 61) + 1;
        let mut whole = UsageStream::new(api, estimate);
        whole.feed(body);
        let whole = whole.finish();
        let mut split = UsageStream::new(api, estimate);
        body.chunks(step).for_each(|piece| split.feed(piece));
        assert_eq!(whole, split.finish(), "split every {step} bytes");
        price(&whole);
    }
});

fn price(usage: &Usage) {
    if let Some(model) = usage.model.as_deref() {
        let _ = pricing().cost(model, usage);
    }
    assert!(usage.cache_read_tokens <= usage.input_tokens);
    assert!(usage.cache_read_tokens + usage.cache_creation_tokens <= usage.input_tokens);
    assert_eq!(usage.estimated, usage.estimate_reason.is_some());
}
