"""An agent's model calls through its Ringfence sidecar, made with the official OpenAI client.

The agent holds no provider key: it points the client at the sidecar's outbound listener
(RINGFENCE_MODELS_URL, e.g. http://127.0.0.1:PORT/models/openai/v1) with a placeholder key, and
the sidecar injects the real one. Optionally it forwards the run context it was handed
(RINGFENCE_CONTEXT).

Makes one plain chat completion, one streamed chat completion and one plain Responses call, and
prints one JSON line per call with what the client saw (text and usage, read from the client's
typed objects). Exits non-zero with a message on any error.
"""

import json
import os
import sys

import openai
from openai import OpenAI

MODEL = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "Say hello."}]


def client() -> OpenAI:
    url = os.environ.get("RINGFENCE_MODELS_URL")
    if not url:
        sys.exit("openai_chat.py: set RINGFENCE_MODELS_URL to http://<outbound>/models/openai/v1")
    headers = {}
    context = os.environ.get("RINGFENCE_CONTEXT")
    if context:
        headers["ringfence-context"] = context
    return OpenAI(
        base_url=url,
        api_key="agent-has-no-key",
        default_headers=headers or None,
        # A retried call would be a second call through the sidecar (and a second run):
        # a test must see the first failure, not a count that is off by one.
        max_retries=0,
        timeout=30.0,
    )


def report(call: str, text: str, usage_in: int, usage_out: int) -> None:
    line = {"call": call, "text": text, "usage": {"input": usage_in, "output": usage_out}}
    print(json.dumps(line), flush=True)


def main() -> None:
    c = client()

    completion = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=200)
    if completion.usage is None:
        raise RuntimeError("the chat completion carried no usage")
    report(
        "chat",
        completion.choices[0].message.content or "",
        completion.usage.prompt_tokens,
        completion.usage.completion_tokens,
    )

    # The agent does not ask for usage; the sidecar sets stream_options.include_usage, so the
    # stream ends with a chunk that has no choices and the usage.
    text, usage = [], None
    for chunk in c.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=200, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    if usage is None:
        raise RuntimeError("the stream ended without a usage chunk (include_usage not forced?)")
    report("chat-stream", "".join(text), usage.prompt_tokens, usage.completion_tokens)

    response = c.responses.create(model=MODEL, input="hi")
    if response.usage is None:
        raise RuntimeError("the response carried no usage")
    report(
        "responses",
        response.output_text,
        response.usage.input_tokens,
        response.usage.output_tokens,
    )


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001 - any failure is the test's failure
        sys.exit(f"openai_chat.py (openai {openai.__version__}): {type(e).__name__}: {e}")
