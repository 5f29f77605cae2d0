use super::*;

/// OpenAI chat completion streamed with `stream_options.include_usage`: every chunk says
/// `"usage":null` until the last, whose `choices` is empty.
const CHAT_STREAM: &str = concat!(
    r#"data: {"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_06737a9306","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}"#,
    "\n\n",
    r#"data: {"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_06737a9306","choices":[{"index":0,"delta":{"content":"The usage, in \"usage\": 1 token"},"logprobs":null,"finish_reason":null}],"usage":null}"#,
    "\n\n",
    r#"data: {"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_06737a9306","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}"#,
    "\n\n",
    r#"data: {"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_06737a9306","choices":[],"usage":{"prompt_tokens":1250,"completion_tokens":10,"total_tokens":1260,"prompt_tokens_details":{"cached_tokens":1024,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}"#,
    "\n\n",
    "data: [DONE]\n\n",
);

/// The Responses API's semantic events, `event:` lines included; usage only in
/// `response.completed`.
const RESPONSES_STREAM: &str = concat!(
    "event: response.created\n",
    r#"data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654","object":"response","created_at":1741290958,"status":"in_progress","error":null,"incomplete_details":null,"instructions":"You are a helpful assistant.","max_output_tokens":null,"model":"gpt-4.1-2025-04-14","output":[],"parallel_tool_calls":true,"previous_response_id":null,"reasoning":{"effort":null,"summary":null},"store":true,"temperature":1.0,"text":{"format":{"type":"text"}},"tool_choice":"auto","tools":[],"top_p":1.0,"truncation":"disabled","usage":null,"user":null,"metadata":{}}}"#,
    "\n\n",
    "event: response.in_progress\n",
    r#"data: {"type":"response.in_progress","sequence_number":1,"response":{"id":"resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654","object":"response","created_at":1741290958,"status":"in_progress","model":"gpt-4.1-2025-04-14","output":[],"usage":null,"metadata":{}}}"#,
    "\n\n",
    "event: response.output_item.added\n",
    r#"data: {"type":"response.output_item.added","sequence_number":2,"output_index":0,"item":{"id":"msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654","type":"message","status":"in_progress","role":"assistant","content":[]}}"#,
    "\n\n",
    "event: response.content_part.added\n",
    r#"data: {"type":"response.content_part.added","sequence_number":3,"item_id":"msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654","output_index":0,"content_index":0,"part":{"type":"output_text","text":"","annotations":[]}}"#,
    "\n\n",
    "event: response.output_text.delta\n",
    r#"data: {"type":"response.output_text.delta","sequence_number":4,"item_id":"msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654","output_index":0,"content_index":0,"delta":"Hi there! ¿Cómo estás? 👋"}"#,
    "\n\n",
    "event: response.output_text.done\n",
    r#"data: {"type":"response.output_text.done","sequence_number":5,"item_id":"msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654","output_index":0,"content_index":0,"text":"Hi there! ¿Cómo estás? 👋"}"#,
    "\n\n",
    "event: response.completed\n",
    r#"data: {"type":"response.completed","sequence_number":6,"response":{"id":"resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654","object":"response","created_at":1741290958,"status":"completed","error":null,"incomplete_details":null,"instructions":"You are a helpful assistant.","max_output_tokens":null,"model":"gpt-4.1-2025-04-14","output":[{"id":"msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654","type":"message","status":"completed","role":"assistant","content":[{"type":"output_text","text":"Hi there! ¿Cómo estás? 👋","annotations":[]}]}],"parallel_tool_calls":true,"previous_response_id":null,"reasoning":{"effort":null,"summary":null},"store":true,"temperature":1.0,"text":{"format":{"type":"text"}},"tool_choice":"auto","tools":[],"top_p":1.0,"truncation":"disabled","usage":{"input_tokens":37,"input_tokens_details":{"cached_tokens":0},"output_tokens":11,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":48},"user":null,"metadata":{}}}"#,
    "\n\n",
);

/// Anthropic Messages streamed with a prompt-cache write: `message_start` has the input side,
/// `message_delta` the cumulative totals (output and, on current API versions, input again).
const ANTHROPIC_STREAM: &str = concat!(
    "event: message_start\n",
    r#"data: {"type":"message_start","message":{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","model":"claude-sonnet-4-20250514","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":12,"cache_creation_input_tokens":1843,"cache_read_input_tokens":0,"cache_creation":{"ephemeral_5m_input_tokens":1843,"ephemeral_1h_input_tokens":0},"output_tokens":1,"service_tier":"standard"}}}"#,
    "\n\n",
    "event: content_block_start\n",
    r#"data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
    "\n\n",
    "event: ping\n",
    r#"data: {"type": "ping"}"#,
    "\n\n",
    "event: content_block_delta\n",
    r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}"#,
    "\n\n",
    "event: content_block_delta\n",
    r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"! Grüße 🌍"}}"#,
    "\n\n",
    "event: content_block_stop\n",
    r#"data: {"type":"content_block_stop","index":0}"#,
    "\n\n",
    "event: message_delta\n",
    r#"data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"input_tokens":12,"cache_creation_input_tokens":1843,"cache_read_input_tokens":0,"output_tokens":15}}"#,
    "\n\n",
    "event: message_stop\n",
    r#"data: {"type":"message_stop"}"#,
    "\n\n",
);

fn no_estimate() -> Estimate {
    Estimate {
        input_tokens: 999,
        max_output_tokens: Some(4_096),
    }
}

fn stream(api: Api, pieces: &[&[u8]]) -> Usage {
    let mut watcher = UsageStream::new(api, no_estimate());
    for piece in pieces {
        watcher.feed(piece);
    }
    watcher.finish()
}

fn exact(input: u64, output: u64, cache_read: u64, cache_creation: u64, model: &str) -> Usage {
    Usage {
        input_tokens: input,
        output_tokens: output,
        cache_read_tokens: cache_read,
        cache_creation_tokens: cache_creation,
        model: Some(model.to_owned()),
        estimated: false,
        estimate_reason: None,
    }
}

fn chat_usage() -> Usage {
    exact(1_250, 10, 1_024, 0, "gpt-4o-mini-2024-07-18")
}

fn responses_usage() -> Usage {
    exact(37, 11, 0, 0, "gpt-4.1-2025-04-14")
}

fn anthropic_usage() -> Usage {
    exact(1_855, 15, 0, 1_843, "claude-sonnet-4-20250514")
}

#[test]
fn paths_name_the_api_with_or_without_v1() {
    assert_eq!(
        Api::from_path("/v1/chat/completions"),
        Some(Api::ChatCompletions)
    );
    assert_eq!(
        Api::from_path("/chat/completions"),
        Some(Api::ChatCompletions)
    );
    assert_eq!(Api::from_path("/v1/responses"), Some(Api::Responses));
    assert_eq!(Api::from_path("/responses/"), Some(Api::Responses));
    assert_eq!(
        Api::from_path("/v1/messages?beta=true"),
        Some(Api::AnthropicMessages)
    );
    for other in [
        "/v1/models",
        "/v1/messages/count_tokens",
        "/v1/responses/resp_123",
        "/v1",
        "/v1x/messages",
        "",
        "/",
    ] {
        assert_eq!(Api::from_path(other), None, "{other}");
    }
}

#[test]
fn a_request_names_its_model_stream_and_output_cap_per_api() {
    let body = br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":100,"max_completion_tokens":256}"#;
    let req = inspect_request(Api::ChatCompletions, body).expect("valid");
    assert_eq!(req.model.as_deref(), Some("gpt-4o-mini"));
    assert!(matches!(req.model, Some(Cow::Borrowed(_))));
    assert!(req.stream);
    assert_eq!(
        req.max_output_tokens,
        Some(256),
        "max_completion_tokens wins"
    );
    assert_eq!(
        req.estimate(),
        Estimate {
            input_tokens: body.len().div_ceil(4) as u64,
            max_output_tokens: Some(256)
        }
    );

    let body =
        br#"{"model":"gpt-4.1","input":"Tell me a joke","max_output_tokens":512,"max_tokens":7}"#;
    let req = inspect_request(Api::Responses, body).expect("valid");
    assert!(!req.stream);
    assert_eq!(req.max_output_tokens, Some(512));

    let body = br#"{"model":"claude-sonnet-4-20250514","max_tokens":1024,"messages":[{"role":"user","content":"Hello"}],"stream":true}"#;
    let req = inspect_request(Api::AnthropicMessages, body).expect("valid");
    assert_eq!(req.model.as_deref(), Some("claude-sonnet-4-20250514"));
    assert_eq!(req.max_output_tokens, Some(1_024));

    // A cap that is not a non-negative integer is no cap; the provider will say why.
    let body = br#"{"model":7,"max_tokens":-1,"stream":null}"#;
    let req = inspect_request(Api::AnthropicMessages, body).expect("lenient");
    assert_eq!(
        (req.model, req.max_output_tokens, req.stream),
        (None, None, false)
    );
}

#[test]
fn a_request_with_a_member_twice_or_not_an_object_is_refused() {
    let err = inspect_request(
        Api::ChatCompletions,
        br#"{"model":"gpt-4o","stream":false,"stream":true}"#,
    )
    .expect_err("duplicate");
    assert!(matches!(err, LlmError::Request(_)), "{err:?}");
    assert!(err.to_string().contains("each member once"));
    assert!(matches!(
        inspect_request(Api::ChatCompletions, b"[]"),
        Err(LlmError::NotAnObject)
    ));
    assert!(matches!(
        inspect_request(Api::ChatCompletions, br#"{"stream":"yes"}"#),
        Err(LlmError::Request(_))
    ));
}

fn rewritten(body: &[u8]) -> Vec<u8> {
    let req = inspect_request(Api::ChatCompletions, body).expect("valid");
    req.with_stream_usage(body).expect("rewrite").into_owned()
}

#[test]
fn a_streaming_chat_request_gets_include_usage_and_keeps_every_other_byte() {
    // Numbers serde_json::Value would reprint differently: they must reach the provider as sent.
    let body = b"{\"model\":\"gpt-4o-mini\", \"temperature\": 0.70, \"seed\": 12345678901234567890123,\n \"messages\":[{\"role\":\"user\",\"content\":\"hi\"}], \"stream\": true }\n";
    let out = rewritten(body);
    let expected = b"{\"model\":\"gpt-4o-mini\", \"temperature\": 0.70, \"seed\": 12345678901234567890123,\n \"messages\":[{\"role\":\"user\",\"content\":\"hi\"}], \"stream\": true ,\"stream_options\":{\"include_usage\":true}}\n";
    assert_eq!(
        String::from_utf8_lossy(&out),
        String::from_utf8_lossy(expected)
    );
    let req = inspect_request(Api::ChatCompletions, &out).expect("still valid");
    assert!(req.stream);
}

#[test]
fn a_client_stream_options_object_is_merged_not_replaced() {
    let out =
        rewritten(br#"{"model":"m","stream":true,"stream_options":{"include_obfuscation":false}}"#);
    assert_eq!(
        out,
        br#"{"model":"m","stream":true,"stream_options":{"include_usage":true,"include_obfuscation":false}}"#
    );
    let out = rewritten(br#"{"model":"m","stream":true,"stream_options":{ }}"#);
    assert_eq!(
        out,
        br#"{"model":"m","stream":true,"stream_options":{"include_usage":true }}"#
    );
    let out = rewritten(br#"{"stream_options":null,"model":"m","stream":true}"#);
    assert_eq!(
        out,
        br#"{"stream_options":{"include_usage":true},"model":"m","stream":true}"#
    );
}

#[test]
fn include_usage_false_is_turned_on_and_true_is_left_alone() {
    let out = rewritten(br#"{"stream":true,"stream_options":{"include_usage":false}}"#);
    assert_eq!(
        out,
        br#"{"stream":true,"stream_options":{"include_usage":true}}"#
    );

    let body: &[u8] = br#"{"stream":true,"stream_options":{"include_usage":true}}"#;
    let req = inspect_request(Api::ChatCompletions, body).expect("valid");
    assert!(matches!(req.with_stream_usage(body), Ok(Cow::Borrowed(_))));
}

#[test]
fn a_non_streaming_or_non_chat_request_is_forwarded_unchanged() {
    let cases: [(Api, &[u8]); 3] = [
        (Api::ChatCompletions, br#"{"model":"m","stream":false}"#),
        (
            Api::Responses,
            br#"{"model":"m","input":"x","stream":true}"#,
        ),
        (
            Api::AnthropicMessages,
            br#"{"model":"m","max_tokens":5,"stream":true}"#,
        ),
    ];
    for (api, body) in cases {
        let req = inspect_request(api, body).expect("valid");
        assert!(matches!(req.with_stream_usage(body), Ok(Cow::Borrowed(b)) if b == body));
    }
}

#[test]
fn stream_options_of_the_wrong_type_is_refused_with_what_to_send() {
    let body: &[u8] = br#"{"stream":true,"stream_options":"usage"}"#;
    let req = inspect_request(Api::ChatCompletions, body).expect("valid");
    let err = req.with_stream_usage(body).expect_err("not an object");
    assert!(matches!(
        err,
        LlmError::StreamOptionsNotObject { found: "a string" }
    ));
    assert!(err.to_string().contains("include_usage"), "{err}");
}

#[test]
fn a_chat_completion_response_reports_prompt_and_cached_tokens() {
    let body = br#"{"id":"chatcmpl-abc123","object":"chat.completion","created":1741569952,"model":"gpt-4.1-2025-04-14","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I assist you today?","refusal":null,"annotations":[]},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":2019,"completion_tokens":10,"total_tokens":2029,"prompt_tokens_details":{"cached_tokens":1920,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"service_tier":"default"}"#;
    let usage = response_usage(Api::ChatCompletions, body).expect("usage");
    assert_eq!(usage, exact(2_019, 10, 1_920, 0, "gpt-4.1-2025-04-14"));
    assert_eq!(usage.total_tokens(), 2_029);
}

#[test]
fn a_responses_api_response_reports_input_and_cached_tokens() {
    let body = br#"{"id":"resp_67ccd3a9da748190baa7f1570fe91ac604becb25c45c1d41","object":"response","created_at":1741476777,"status":"completed","error":null,"incomplete_details":null,"instructions":null,"max_output_tokens":null,"model":"gpt-4o-2024-08-06","output":[{"type":"message","id":"msg_67ccd3acc8d48190a77525dc6de64b4104becb25c45c1d41","status":"completed","role":"assistant","content":[{"type":"output_text","text":"The image depicts a scenic landscape.","annotations":[]}]}],"parallel_tool_calls":true,"previous_response_id":null,"reasoning":{"effort":null,"summary":null},"store":true,"temperature":1.0,"text":{"format":{"type":"text"}},"tool_choice":"auto","tools":[],"top_p":1.0,"truncation":"disabled","usage":{"input_tokens":328,"input_tokens_details":{"cached_tokens":256},"output_tokens":52,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":380},"user":null,"metadata":{}}"#;
    let usage = response_usage(Api::Responses, body).expect("usage");
    assert_eq!(usage, exact(328, 52, 256, 0, "gpt-4o-2024-08-06"));
}

#[test]
fn an_anthropic_response_counts_cache_writes_and_reads_as_input() {
    let body = br#"{"id":"msg_013Zva2CMHLNnXjNJJKqJ2EF","type":"message","role":"assistant","model":"claude-3-5-haiku-20241022","content":[{"type":"text","text":"Hi! My name is Claude."}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":21,"cache_creation_input_tokens":188,"cache_read_input_tokens":2048,"cache_creation":{"ephemeral_5m_input_tokens":188,"ephemeral_1h_input_tokens":0},"output_tokens":393,"service_tier":"standard"}}"#;
    let usage = response_usage(Api::AnthropicMessages, body).expect("usage");
    assert_eq!(
        usage,
        exact(
            21 + 188 + 2_048,
            393,
            2_048,
            188,
            "claude-3-5-haiku-20241022"
        )
    );
}

#[test]
fn a_response_without_readable_usage_is_estimated_with_a_reason() {
    let estimate = Estimate {
        input_tokens: 300,
        max_output_tokens: Some(10),
    };
    let no_usage = br#"{"id":"chatcmpl-1","model":"gpt-4o","choices":[]}"#;
    let usage = response_usage_or_estimate(Api::ChatCompletions, no_usage, &estimate);
    assert!(usage.estimated);
    assert_eq!(usage.estimate_reason, Some("the response carried no usage"));
    assert_eq!((usage.input_tokens, usage.output_tokens), (300, 10));

    let negative = br#"{"usage":{"prompt_tokens":-3,"completion_tokens":1}}"#;
    let err = response_usage(Api::ChatCompletions, negative).expect_err("negative");
    assert!(matches!(
        err,
        LlmError::BadCount {
            field: "prompt_tokens"
        }
    ));
    let half = br#"{"usage":{"input_tokens":3}}"#;
    let err = response_usage(Api::AnthropicMessages, half).expect_err("no output");
    assert!(matches!(
        err,
        LlmError::MissingCount {
            field: "output_tokens"
        }
    ));

    let cut = &ANTHROPIC_STREAM.as_bytes()[..40];
    let usage = response_usage_or_estimate(Api::AnthropicMessages, cut, &estimate);
    assert_eq!(
        usage.estimate_reason,
        Some("the response body is not valid JSON")
    );
    assert_eq!(
        usage.output_tokens, 10,
        "40 bytes / 4, capped at max tokens 10"
    );
}

#[test]
fn an_openai_chat_stream_with_include_usage_is_read_from_its_last_chunk() {
    assert_eq!(
        stream(Api::ChatCompletions, &[CHAT_STREAM.as_bytes()]),
        chat_usage()
    );
}

#[test]
fn a_responses_stream_is_read_from_response_completed() {
    assert_eq!(
        stream(Api::Responses, &[RESPONSES_STREAM.as_bytes()]),
        responses_usage()
    );
}

#[test]
fn an_anthropic_stream_with_a_cache_write_counts_it_as_input() {
    assert_eq!(
        stream(Api::AnthropicMessages, &[ANTHROPIC_STREAM.as_bytes()]),
        anthropic_usage()
    );
}

#[test]
fn an_anthropic_stream_takes_the_latest_cumulative_usage_not_a_sum() {
    // An older message_delta carries only output_tokens: the input from message_start stands.
    let older = ANTHROPIC_STREAM.replace(
        r#""usage":{"input_tokens":12,"cache_creation_input_tokens":1843,"cache_read_input_tokens":0,"output_tokens":15}"#,
        r#""usage":{"output_tokens":15}"#,
    );
    assert_eq!(
        stream(Api::AnthropicMessages, &[older.as_bytes()]),
        anthropic_usage()
    );
    // Two cumulative deltas (server tools can send more): the last one wins, nulls keep.
    let twice = ANTHROPIC_STREAM.replace(
        "event: message_stop\n",
        concat!(
            "event: message_delta\n",
            r#"data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"input_tokens":40,"cache_creation_input_tokens":null,"cache_read_input_tokens":null,"output_tokens":77}}"#,
            "\n\n",
            "event: message_stop\n",
        ),
    );
    let usage = stream(Api::AnthropicMessages, &[twice.as_bytes()]);
    assert_eq!(
        usage,
        exact(40 + 1_843, 77, 0, 1_843, "claude-sonnet-4-20250514")
    );
}

#[test]
fn a_transcript_split_at_any_byte_reads_the_same() {
    let cases = [
        (Api::ChatCompletions, CHAT_STREAM, chat_usage()),
        (Api::Responses, RESPONSES_STREAM, responses_usage()),
        (Api::AnthropicMessages, ANTHROPIC_STREAM, anthropic_usage()),
    ];
    for (api, transcript, expected) in cases {
        let bytes = transcript.as_bytes();
        for cut in 0..=bytes.len() {
            let (a, b) = bytes.split_at(cut);
            assert_eq!(stream(api, &[a, b]), expected, "{api:?} cut at {cut}");
        }
        let one_by_one: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(stream(api, &one_by_one), expected, "{api:?} byte by byte");
        let sevens: Vec<&[u8]> = bytes.chunks(7).collect();
        assert_eq!(stream(api, &sevens), expected, "{api:?} in 7-byte chunks");
    }
}

#[test]
fn crlf_and_cr_line_endings_comments_and_multi_line_data_are_understood() {
    let crlf = ANTHROPIC_STREAM.replace('\n', "\r\n");
    let bytes = crlf.as_bytes();
    for cut in 0..=bytes.len() {
        let (a, b) = bytes.split_at(cut);
        assert_eq!(
            stream(Api::AnthropicMessages, &[a, b]),
            anthropic_usage(),
            "CRLF cut at {cut}"
        );
    }
    let cr = RESPONSES_STREAM.replace('\n', "\r");
    assert_eq!(stream(Api::Responses, &[cr.as_bytes()]), responses_usage());

    // A keep-alive comment, an id, and the usage chunk split over two data lines (joined by
    // "\n", which JSON reads as whitespace), without a space after the colon.
    let multi = concat!(
        ": keep-alive\n\n",
        "id: 7\n",
        "data:{\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[],\n",
        "data:\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2}}\n\n",
        "data: [DONE]\n\n",
    );
    assert_eq!(
        stream(Api::ChatCompletions, &[multi.as_bytes()]),
        exact(5, 2, 0, 0, "gpt-4o-mini-2024-07-18")
    );
}

#[test]
fn a_last_event_without_its_blank_line_still_counts() {
    let unterminated = CHAT_STREAM
        .trim_end_matches('\n')
        .replace("data: [DONE]", "");
    let unterminated = unterminated.trim_end_matches('\n');
    assert_eq!(
        stream(Api::ChatCompletions, &[unterminated.as_bytes()]),
        chat_usage()
    );
}

#[test]
fn a_chat_stream_that_ignored_include_usage_is_estimated_from_its_size_capped_by_max_tokens() {
    let without: String = CHAT_STREAM
        .split("\n\n")
        .filter(|event| !event.contains("\"choices\":[]"))
        .map(|event| format!("{event}\n\n"))
        .collect();
    let estimate = Estimate {
        input_tokens: 120,
        max_output_tokens: Some(50),
    };
    let mut watcher = UsageStream::new(Api::ChatCompletions, estimate);
    watcher.feed(without.as_bytes());
    let usage = watcher.finish();
    assert!(usage.estimated);
    assert_eq!(
        usage.estimate_reason,
        Some("the stream carried no usage (stream_options.include_usage was not honoured)")
    );
    assert_eq!((usage.input_tokens, usage.output_tokens), (120, 50));

    let uncapped = Estimate {
        input_tokens: 120,
        max_output_tokens: None,
    };
    let mut watcher = UsageStream::new(Api::ChatCompletions, uncapped);
    watcher.feed(without.as_bytes());
    assert_eq!(
        watcher.finish().output_tokens,
        (without.len() as u64).div_ceil(4)
    );
}

#[test]
fn a_stream_cut_short_is_estimated_and_says_where_it_stopped() {
    let bytes = ANTHROPIC_STREAM.as_bytes();
    let delta_at = ANTHROPIC_STREAM
        .find("event: message_delta")
        .expect("fixture has a delta");
    let mut watcher = UsageStream::new(Api::AnthropicMessages, no_estimate());
    watcher.feed(&bytes[..delta_at]);
    let usage = watcher.finish();
    assert!(usage.estimated);
    assert_eq!(
        usage.estimate_reason,
        Some("the stream ended before message_delta's usage")
    );
    // The input side came in message_start and stands; output is the estimate.
    assert_eq!(usage.input_tokens, 1_855);
    assert_eq!(usage.cache_creation_tokens, 1_843);
    assert_eq!(usage.output_tokens, (delta_at as u64).div_ceil(4));
    assert_eq!(usage.model.as_deref(), Some("claude-sonnet-4-20250514"));

    let usage = stream(Api::AnthropicMessages, &[]);
    assert_eq!(
        usage.estimate_reason,
        Some("the stream ended before message_start")
    );
    assert_eq!((usage.input_tokens, usage.output_tokens), (999, 0));

    let completed_at = RESPONSES_STREAM
        .find("event: response.completed")
        .expect("fixture completes");
    let usage = stream(
        Api::Responses,
        &[&RESPONSES_STREAM.as_bytes()[..completed_at]],
    );
    assert_eq!(
        usage.estimate_reason,
        Some("the stream ended before response.completed")
    );
    let usage = stream(Api::ChatCompletions, &[&CHAT_STREAM.as_bytes()[..300]]);
    assert_eq!(
        usage.estimate_reason,
        Some("the stream ended before its usage chunk")
    );
}

#[test]
fn a_truncated_or_malformed_usage_block_is_an_estimate_not_a_panic() {
    let broken = CHAT_STREAM.replace(
        r#""usage":{"prompt_tokens":1250,"#,
        r#""usage":{"prompt_tokens":12.5e2,"#,
    );
    let usage = stream(Api::ChatCompletions, &[broken.as_bytes()]);
    assert!(usage.estimated);
    assert_eq!(
        usage.estimate_reason,
        Some("the usage block could not be read")
    );

    let truncated = CHAT_STREAM.replace(r#""total_tokens":1260,"#, r#""total_tok"#);
    let usage = stream(Api::ChatCompletions, &[truncated.as_bytes()]);
    assert_eq!(
        usage.estimate_reason,
        Some("the usage block could not be read")
    );

    for transcript in [CHAT_STREAM, RESPONSES_STREAM, ANTHROPIC_STREAM] {
        let bytes = transcript.as_bytes();
        for cut in 0..bytes.len() {
            for api in [Api::ChatCompletions, Api::Responses, Api::AnthropicMessages] {
                let _ = stream(api, &[&bytes[..cut]]);
                let _ = response_usage(api, &bytes[..cut]);
            }
        }
    }
}

#[test]
fn a_responses_completed_event_over_the_cap_still_yields_its_usage() {
    // An image-generation result makes response.completed megabytes long.
    let image = "A".repeat(3 * MAX_EVENT_BYTES);
    let big = RESPONSES_STREAM.replace(
        r#""text":"Hi there! ¿Cómo estás? 👋","annotations":[]}]}],"parallel_tool_calls""#,
        &format!(
            r#""text":"Hi","annotations":[]}}]}},{{"type":"image_generation_call","result":"{image}"}}],"parallel_tool_calls""#
        ),
    );
    assert!(big.len() > 3 * MAX_EVENT_BYTES);
    let mut watcher = UsageStream::new(Api::Responses, no_estimate());
    for chunk in big.as_bytes().chunks(16 * 1024) {
        watcher.feed(chunk);
        assert!(
            watcher.data.len() <= MAX_EVENT_BYTES,
            "held {} bytes",
            watcher.data.len()
        );
    }
    let usage = watcher.finish();
    assert!(!usage.estimated, "{usage:?}");
    assert_eq!((usage.input_tokens, usage.output_tokens), (37, 11));
}

#[test]
fn an_oversized_event_that_carries_no_usage_is_dropped_without_being_held() {
    let delta = format!(
        "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"{}\"}}}}\n\n",
        "x".repeat(2 * MAX_EVENT_BYTES)
    );
    let transcript = ANTHROPIC_STREAM.replace(
        "event: content_block_stop\n",
        &format!("{delta}event: content_block_stop\n"),
    );
    let mut watcher = UsageStream::new(Api::AnthropicMessages, no_estimate());
    watcher.feed(transcript.as_bytes());
    assert!(watcher.data.capacity() <= MAX_EVENT_BYTES + TAIL_BYTES);
    assert_eq!(watcher.finish(), anthropic_usage());
}

#[test]
fn an_estimated_input_is_never_smaller_than_the_cached_part_already_read() {
    // Found by fuzzing: a message_start whose usage has cache counts but no input_tokens.
    let start = concat!(
        "event: message_start\n",
        r#"data: {"type":"message_start","message":{"model":"claude-sonnet-4-20250514","usage":{"cache_creation_input_tokens":1843,"cache_read_input_tokens":5000}}}"#,
        "\n\n",
    );
    let usage = stream(Api::AnthropicMessages, &[start.as_bytes()]);
    assert!(usage.estimated);
    assert_eq!(
        usage.input_tokens, 6_843,
        "not the 999 of the request-size estimate"
    );
    assert_eq!(
        (usage.cache_read_tokens, usage.cache_creation_tokens),
        (5_000, 1_843)
    );
}
