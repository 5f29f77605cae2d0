"""An A2A agent built with the official A2A Python SDK (a2a-sdk), run behind a Ringfence sidecar.

It is served the way the SDK's own samples serve an agent (an AgentExecutor, the
DefaultRequestHandler, the SDK's Starlette routes, uvicorn), with its card saying where it
listens. What it does with a message is given on the command line, one --step each, so one
program plays every agent of the tests:

  ask:<agent>                   send the message on to <agent> through the sidecar with the SDK's
                                client (card resolved through the mesh), forwarding the context
  ask-dropping-context:<agent>  the same, without the context (the bug Ringfence refuses)
  tool:<server>/<tool>          call an MCP tool through the sidecar with the MCP SDK's client,
                                forwarding the context
  model:<provider>              ask a model through the sidecar's /models/<provider>/ route with
                                the OpenAI client, holding no key, forwarding the context

It answers with a task: a "working" status, then one artifact holding a JSON report of what it
got and what each step did (an answer, or the error the SDK raised with the sidecar's refusal).

Usage: a2a_agent.py --name NAME --port PORT --outbound HOST:PORT [--binding JSONRPC|HTTP+JSON]
                    [--protocol-version 1.0|0.3] [--step STEP]...

With --protocol-version 0.3 its card offers A2A 0.3 and the SDK serves 0.3 beside 1.0 (the SDK's
client then speaks 0.3 to it: `message/send` instead of `SendMessage`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import httpx2
import openai
import uvicorn
from a2a.client import ClientConfig, create_client
from a2a.helpers import (
    get_artifact_text,
    get_message_text,
    new_task_from_user_message,
    new_text_message,
    new_text_part,
)
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import (
    create_agent_card_routes,
    create_jsonrpc_routes,
    create_rest_routes,
)
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types import AgentCapabilities, AgentCard, AgentInterface, AgentSkill
from a2a.types.a2a_pb2 import SendMessageRequest, TaskState
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from starlette.applications import Starlette

from mesh_calls import (
    CONTEXT,
    RunContext,
    a2a_http_client,
    mcp_refusal,
    new_user_message,
    refusal,
)


async def ask(outbound: str, agent: str, text: str, run: RunContext) -> dict[str, Any]:
    """Sends `text` to `agent` through the mesh with the A2A SDK's client; its answer or error."""
    http = a2a_http_client(run)
    try:
        # create_client resolves the card (through the sidecar, which rewrites its URLs) and
        # posts to the URL the card gives.
        client = await create_client(
            f"http://{outbound}/agents/{agent}",
            client_config=ClientConfig(streaming=False, httpx_client=http),
        )
        texts = []
        async for event in client.send_message(SendMessageRequest(message=new_user_message(text))):
            if event.HasField("task"):
                texts += [get_artifact_text(a, "") for a in event.task.artifacts]
        return {"ok": True, "answer": [json.loads(t) for t in texts]}
    except Exception as e:  # noqa: BLE001 - the agent reports what the SDK raised
        return {"ok": False, "error": refusal(e)}
    finally:
        await http.aclose()


async def call_tool(outbound: str, server: str, tool: str, run: RunContext) -> dict[str, Any]:
    """Calls `tool` of MCP server `server` through the mesh with the MCP SDK's client."""
    http = httpx2.AsyncClient(
        timeout=30.0, event_hooks={"request": [run.on_request], "response": [run.on_response]}
    )
    url = f"http://{outbound}/tools/{server}"
    async with http, Client(streamable_http_client(url, http_client=http)) as client:
        try:
            result = await client.call_tool(tool, {"query": "ringfence"})
        except MCPError as e:
            return {"ok": False, "error": mcp_refusal(e)}
        text = "".join(getattr(c, "text", "") for c in result.content)
        return {"ok": not result.is_error, "answer": text}


async def ask_model(outbound: str, provider: str, text: str, run: RunContext) -> dict[str, Any]:
    """One chat completion through the mesh with the OpenAI client; the sidecar holds the key."""
    hooks = {"request": [run.on_request], "response": [run.on_response]}
    http = httpx2.AsyncClient(event_hooks=hooks)
    client = openai.AsyncOpenAI(
        base_url=f"http://{outbound}/models/{provider}/v1",
        api_key="agent-has-no-key",
        http_client=http,
        # A retry would be a second call through the sidecar, counted twice.
        max_retries=0,
        timeout=30.0,
    )
    async with client:
        try:
            completion = await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": text}]
            )
        except openai.APIStatusError as e:
            return {"ok": False, "error": refusal(e)}
    usage = completion.usage
    counted = {"input": usage.prompt_tokens, "output": usage.completion_tokens} if usage else None
    return {"ok": True, "answer": completion.choices[0].message.content, "usage": counted}


class StepsExecutor(AgentExecutor):
    """Runs the configured steps for every message and reports what happened."""

    def __init__(self, name: str, outbound: str, steps: list[str]) -> None:
        self.name, self.outbound, self.steps = name, outbound, steps

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        task = context.current_task or new_task_from_user_message(context.message)
        if not context.current_task:
            await event_queue.enqueue_event(task)
        updater = TaskUpdater(event_queue=event_queue, task_id=task.id, context_id=task.context_id)
        await updater.update_status(
            TaskState.TASK_STATE_WORKING,
            message=new_text_message(f"{self.name} is working on {len(self.steps)} step(s)"),
        )

        # The HTTP headers of the request, as the SDK's server hands them to the executor.
        headers = context.call_context.state.get("headers", {}) if context.call_context else {}
        received = headers.get(CONTEXT)
        text = get_message_text(context.message)
        report: dict[str, Any] = {
            "agent": self.name,
            "got": text,
            "context": received is not None,
            "steps": [],
        }
        # One run for all the steps: the context this agent was handed or, when it was called
        # from outside the mesh, the one its sidecar hands back on the first call.
        run = RunContext(received)
        for step in self.steps:
            kind, _, target = step.partition(":")
            if kind == "ask":
                done = await ask(self.outbound, target, text, run)
            elif kind == "ask-dropping-context":
                done = await ask(self.outbound, target, text, RunContext(None))
            elif kind == "tool":
                server, _, tool = target.partition("/")
                done = await call_tool(self.outbound, server, tool, run)
            elif kind == "model":
                done = await ask_model(self.outbound, target, text, run)
            else:
                done = {"ok": False, "error": {"message": f"unknown step {step!r}"}}
            report["steps"].append({"step": step, **done})

        await updater.add_artifact(
            parts=[new_text_part(text=json.dumps(report), media_type="application/json")],
            name="report",
        )
        await updater.complete()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        raise NotImplementedError("these agents finish at once; there is nothing to cancel")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--outbound", required=True, help="the sidecar's outbound listener")
    parser.add_argument("--binding", default="JSONRPC", choices=["JSONRPC", "HTTP+JSON"])
    parser.add_argument("--protocol-version", default="1.0", choices=["1.0", "0.3"])
    parser.add_argument("--step", action="append", default=[])
    args = parser.parse_args()

    # The card says where the agent itself listens; its sidecar rewrites it for callers. The
    # extended card (for callers that ask for it through the protocol) says the same.
    url = f"http://127.0.0.1:{args.port}/a2a"

    def agent_card(extended: bool) -> AgentCard:
        return AgentCard(
            name=f"{args.name} (extended)" if extended else args.name,
            description=f"The {args.name} agent of the Ringfence end-to-end tests",
            version="1.0.0",
            default_input_modes=["text/plain"],
            default_output_modes=["application/json"],
            capabilities=AgentCapabilities(streaming=True, extended_agent_card=True),
            supported_interfaces=[
                AgentInterface(
                    protocol_binding=args.binding,
                    url=url,
                    protocol_version=args.protocol_version,
                )
            ],
            skills=[
                AgentSkill(
                    id="steps",
                    name="steps",
                    description="runs its configured steps",
                    tags=["e2e"],
                )
            ],
        )

    card = agent_card(extended=False)
    handler = DefaultRequestHandler(
        agent_executor=StepsExecutor(args.name, args.outbound, args.step),
        task_store=InMemoryTaskStore(),
        agent_card=card,
        extended_agent_card=agent_card(extended=True),
    )
    routes = list(create_agent_card_routes(card))
    compat = args.protocol_version == "0.3"
    if args.binding == "JSONRPC":
        routes += create_jsonrpc_routes(handler, "/a2a", enable_v0_3_compat=compat)
    else:
        routes += create_rest_routes(handler, path_prefix="/a2a", enable_v0_3_compat=compat)
    uvicorn.run(Starlette(routes=routes), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
