"""An A2A client app built with the official A2A Python SDK (a2a-sdk), calling through its sidecar.

It discovers the agent the way the SDK's samples do (A2ACardResolver on the agent's base URL),
builds its client from the card (ClientFactory), and sends the same message plainly and
streamed. It holds no run context at first: its sidecar starts a run on its first call and hands
the context back, and every later call forwards it (see mesh_calls.py).

Prints one JSON line per action: what the card says, the agent's report, the kinds of streamed
events, or the error the SDK raised (with the sidecar's refusal). Exits non-zero only when it
cannot run at all; a refused call is an expected outcome the test checks.

Usage: a2a_client.py --base URL [--url INTERFACE_URL] [--binding JSONRPC|HTTP+JSON] [--pick NAME] ACTION...
  --base   the agent's base URL: http://<outbound>/agents/<name>, or the agent itself; for
           `discover`, the sidecar's listing: http://<outbound>/agents
  --url    skip discovery and use this interface URL (for calls whose card fetch is refused)
  --pick   with `discover`: the listed agent whose card the later actions use
  ACTION   card | extended-card | send | stream | get-task (the task the last send created)
           | discover (the agents the sidecar lists as callable, and those unavailable)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from a2a.client import A2ACardResolver, ClientConfig, ClientFactory
from a2a.helpers import get_artifact_text
from a2a.types import AgentCapabilities, AgentCard, AgentInterface
from google.protobuf import json_format

from a2a.types.a2a_pb2 import (
    GetExtendedAgentCardRequest,
    GetTaskRequest,
    SendMessageRequest,
    TaskState,
)

from mesh_calls import RunContext, a2a_http_client, new_user_message, refusal


def emit(line: dict[str, Any]) -> None:
    print(json.dumps(line), flush=True)


def describe(card: AgentCard) -> dict[str, Any]:
    """A card's name and interfaces: where a client built from it will call."""
    return {
        "name": card.name,
        "interfaces": [
            {"url": i.url, "binding": i.protocol_binding, "version": i.protocol_version}
            for i in card.supported_interfaces
        ],
    }


def reports(texts: list[str]) -> list[Any]:
    return [json.loads(t) for t in texts if t]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--url")
    parser.add_argument("--binding", default="JSONRPC", choices=["JSONRPC", "HTTP+JSON"])
    parser.add_argument("--text", default="find sources on agent loops")
    parser.add_argument("--pick")
    parser.add_argument(
        "actions",
        nargs="+",
        choices=["card", "extended-card", "send", "stream", "get-task", "discover"],
    )
    args = parser.parse_args()

    run = RunContext()
    http = a2a_http_client(run)
    card: AgentCard | None = None
    last_task = ""
    if args.url:
        card = AgentCard(
            name="known out of band",
            capabilities=AgentCapabilities(streaming=True),
            supported_interfaces=[AgentInterface(protocol_binding=args.binding, url=args.url)],
        )
    async with http:
        for action in args.actions:
            try:
                if action == "discover":
                    # The sidecar's listing: cards already pointing back through it.
                    resp = await http.get(args.base)
                    resp.raise_for_status()
                    listing = resp.json()
                    for listed in listing["agents"]:
                        if listed["name"] == args.pick:
                            card = json_format.ParseDict(
                                listed["card"], AgentCard(), ignore_unknown_fields=True
                            )
                    emit(
                        {
                            "action": action,
                            "ok": True,
                            "agents": [a["name"] for a in listing["agents"]],
                            "unavailable": [u["name"] for u in listing["unavailable"]],
                            **({"picked": describe(card)} if card else {}),
                        }
                    )
                    continue
                if action == "card" or card is None:
                    card = await A2ACardResolver(http, args.base).get_agent_card()
                    if action == "card":
                        emit({"action": "card", "ok": True, **describe(card)})
                        continue
                if action in ("extended-card", "get-task"):
                    client = ClientFactory(
                        ClientConfig(httpx_client=http, supported_protocol_bindings=[args.binding])
                    ).create(card)
                    if action == "extended-card":
                        # Asked through the protocol (GetExtendedAgentCard), at the interface.
                        extended = await client.get_extended_agent_card(
                            GetExtendedAgentCardRequest()
                        )
                        emit({"action": action, "ok": True, **describe(extended)})
                    else:
                        task = await client.get_task(GetTaskRequest(id=last_task))
                        state = TaskState.Name(task.status.state)
                        emit({"action": action, "ok": True, "id": task.id, "state": state})
                    continue
                streaming = action == "stream"
                config = ClientConfig(
                    streaming=streaming,
                    httpx_client=http,
                    supported_protocol_bindings=[args.binding],
                )
                client = ClientFactory(config).create(card)
                request = SendMessageRequest(message=new_user_message(args.text))
                kinds, texts = [], []
                async for event in client.send_message(request):
                    kind = event.WhichOneof("payload")
                    kinds.append(kind)
                    if kind == "task":
                        last_task = event.task.id
                        texts += [get_artifact_text(a, "") for a in event.task.artifacts]
                    elif kind == "artifact_update":
                        texts.append(get_artifact_text(event.artifact_update.artifact, ""))
                emit({"action": action, "ok": True, "events": kinds, "reports": reports(texts)})
            except Exception as e:  # noqa: BLE001 - a refusal is reported, not fatal
                emit({"action": action, "ok": False, "error": refusal(e)})


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except Exception as e:  # noqa: BLE001
        sys.exit(f"a2a_client.py: {type(e).__name__}: {e}")
