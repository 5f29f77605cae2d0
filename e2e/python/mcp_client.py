"""An agent's MCP tool calls through its Ringfence sidecar, made with the official MCP Python SDK.

It connects the SDK's Client over streamable HTTP to the sidecar's /tools/<server>/ route, lists
the tools and calls each one named, in one session. Like any agent in the mesh it forwards the
run context its sidecar handed back on the first answer (see mesh_calls.py).

Prints one JSON line per action: the tool names listed, a tool's text answer, or the MCP error
the SDK raised (with the sidecar's refusal: reason and rule). Exits non-zero only when it cannot
run at all.

Usage: mcp_client.py --url http://<outbound>/tools/<server> [--mode auto|legacy] ACTION...
  --mode   auto (the SDK's default: the 2026-07-28 protocol when the server speaks it) or legacy
           (the initialize handshake and a session, as clients before 2026-07-28 do)
  ACTION   list | call:<tool>
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from mesh_calls import RunContext, mcp_refusal


def emit(line: dict[str, Any]) -> None:
    print(json.dumps(line), flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--mode", default="auto", choices=["auto", "legacy"])
    parser.add_argument("actions", nargs="+")
    args = parser.parse_args()

    run = RunContext()
    http = httpx2.AsyncClient(
        timeout=30.0, event_hooks={"request": [run.on_request], "response": [run.on_response]}
    )
    async with http, Client(
        streamable_http_client(args.url, http_client=http), mode=args.mode
    ) as client:
        for action in args.actions:
            try:
                if action == "list":
                    listed = await client.list_tools()
                    emit({"action": action, "ok": True, "tools": [t.name for t in listed.tools]})
                elif action.startswith("call:"):
                    result = await client.call_tool(action[5:], {"query": "ringfence"})
                    text = "".join(getattr(c, "text", "") for c in result.content)
                    emit({"action": action, "ok": not result.is_error, "text": text})
                else:
                    sys.exit(f"mcp_client.py: unknown action {action!r}")
            except MCPError as e:
                emit({"action": action, "ok": False, "error": mcp_refusal(e)})


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except Exception as e:  # noqa: BLE001
        sys.exit(f"mcp_client.py: {type(e).__name__}: {e}")
