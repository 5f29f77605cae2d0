#!/usr/bin/env bash
# The Python peers of the end-to-end tests (the official OpenAI client, the A2A and MCP SDKs),
# installed at the versions pinned in e2e/python/requirements.txt into e2e/.venv.
#
# Idempotent: a stamp in the venv records the requirements it was built from, and an up-to-date
# venv costs one line and no network. Fails (non-zero) when anything cannot be installed: the
# suite must fail, not skip, when its peers are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=e2e/.venv
requirements=e2e/python/requirements.txt
# Every transitive package pinned too, so a release elsewhere cannot change the suite unseen
# (regenerate with: e2e/.venv/bin/pip freeze > e2e/python/constraints.txt, minus the three above).
constraints=e2e/python/constraints.txt
stamp="$venv/.ringfence-stamp"
python=${PYTHON:-python3}

command -v "$python" >/dev/null || {
  echo "python-peers: $python not found; the end-to-end tests need CPython 3.10+ with venv" >&2
  exit 1
}

# What the venv must have been built from: these requirements, on this interpreter.
want="$(cat "$requirements" "$constraints" | sha256sum | cut -d' ' -f1) $("$python" -c 'import sys; print(sys.version.split()[0])')"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && "$venv/bin/python" -c '' 2>/dev/null; then
  echo "python-peers: $venv is up to date ($requirements unchanged)"
  exit 0
fi

# Built before from other requirements or another interpreter: start clean, so a package
# dropped from the requirements does not linger.
if [[ -e "$venv" ]]; then
  echo "python-peers: rebuilding $venv ($requirements or $python changed)"
fi
rm -rf "$venv"

if ! "$python" -m venv "$venv" 2>/dev/null; then
  # A fresh Debian ships python3 without its venv module (ensurepip).
  echo "python-peers: '$python -m venv' failed; installing python3-venv with apt-get"
  rm -rf "$venv"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq python3-venv
  "$python" -m venv "$venv"
fi

if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  --no-input --require-virtualenv -r "$requirements" -c "$constraints"; then
  echo "python-peers: cannot install $requirements into $venv (see pip's error above)" >&2
  exit 1
fi

echo "$want" >"$stamp"
echo "python-peers: installed into $venv: $("$venv/bin/python" -m pip freeze --disable-pip-version-check \
  | grep -iE '^(openai|a2a-sdk|mcp|uvicorn|httpx)==' | tr '\n' ' ')"
