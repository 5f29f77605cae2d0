"""What an agent written with the official SDKs does to work inside a Ringfence mesh, and no more.

- It sends its calls to its sidecar's outbound listener (/agents/<name>/..., /tools/<server>/...).
- It forwards the `ringfence-context` header it was handed, exactly as received, the way it
  forwards `traceparent`. An agent that may start runs, calling with no context, is handed one
  back by its sidecar on the first answer, and forwards that on its later calls, so they all
  join the run it started.

The helpers here also turn what the SDKs raise on a refusal into a plain dict (the refusal's
status, reason and rule), so the test can check what the agent saw.
"""

from __future__ import annotations

import json
from typing import Any
from uuid import uuid4

import httpx

CONTEXT = "ringfence-context"


class RunContext:
    """The context this agent forwards: the one it was handed, or the one its sidecar started."""

    def __init__(self, value: str | None = None) -> None:
        self.value = value

    def headers(self) -> dict[str, str]:
        return {CONTEXT: self.value} if self.value else {}

    # httpx event hooks (the same for httpx and httpx2, which the MCP SDK uses).
    async def on_request(self, request: Any) -> None:
        if self.value and CONTEXT not in request.headers:
            request.headers[CONTEXT] = self.value

    async def on_response(self, response: Any) -> None:
        handed = response.headers.get(CONTEXT)
        if handed and not self.value:
            self.value = handed


def a2a_http_client(run: RunContext, timeout: float = 30.0) -> httpx.AsyncClient:
    """The httpx client an A2A SDK client is given: it forwards the run's context on every call."""
    return httpx.AsyncClient(
        timeout=timeout,
        event_hooks={"request": [run.on_request], "response": [run.on_response]},
    )


def refusal(err: BaseException) -> dict[str, Any]:
    """What an SDK reported for a failed call, with the sidecar's refusal when there was one.

    The SDKs raise their own error types; the HTTP response they came from (kept as the error's
    cause) carries the sidecar's refusal: a JSON-RPC error whose data names the rule, or
    {"error": {...}} for plain HTTP.
    """
    out: dict[str, Any] = {"type": type(err).__name__, "message": str(err)}
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        response = getattr(cause, "response", None)
        if response is not None and hasattr(response, "status_code"):
            out["status"] = response.status_code
            out["denied"] = response.headers.get("ringfence-denied")
            try:
                body = json.loads(response.content)
            except (ValueError, httpx.ResponseNotRead):
                body = None
            if isinstance(body, dict) and isinstance(body.get("error"), dict):
                detail = body["error"].get("data", body["error"])
                if isinstance(detail, dict):
                    out["reason"] = detail.get("reason")
                    out["refusal"] = detail.get("message")
                    out["rule"] = detail.get("rule")
                    out["edge"] = detail.get("edge")
            break
        cause = cause.__cause__ or cause.__context__
    return out


def new_user_message(text: str) -> Any:
    """An A2A 1.0 user message with one text part."""
    from a2a.types.a2a_pb2 import Message, Part, Role

    return Message(role=Role.ROLE_USER, parts=[Part(text=text)], message_id=uuid4().hex)


def mcp_refusal(e: Any) -> dict[str, Any]:
    """The MCP SDK's error for a refused tool call: the sidecar's JSON-RPC error, code and data."""
    data = e.error.data if isinstance(e.error.data, dict) else {}
    return {
        "type": type(e).__name__,
        "code": e.error.code,
        "message": e.error.message,
        "reason": data.get("reason"),
        "rule": data.get("rule"),
        "edge": data.get("edge"),
    }
