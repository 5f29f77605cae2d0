#!/usr/bin/env bash
# One command for the benchmark suite: installs what it needs (nginx from Debian, LiteLLM from
# PyPI at a pinned version), builds the binaries as shipped (profile `dist`: fat LTO, one
# codegen unit), runs every target side by side in interleaved rounds and writes a markdown
# report. Bounded: every measurement stops at its request count or its duration. See
# docs/benchmarks.md.
#
#   bash hack/bench/run.sh                      # report in $BENCH_DIR/report.md
#   ROUNDS=5 SECONDS_PER_RUN=6 bash hack/bench/run.sh
#   SKIP_LITELLM=1 bash hack/bench/run.sh       # without the LiteLLM comparison
#   TARGETS=tracing WORKLOADS=W1 RATES= bash hack/bench/run.sh   # some targets (direct and the
#                                               # nginx pair always run), W1 only, c=1 only
#   bash hack/bench/run.sh --micro              # also the criterion micro-benchmarks
set -euo pipefail
cd "$(dirname "$0")/../.."

LITELLM_VERSION=1.100.5  # newer releases need a certifi newer than the PyPI mirror here has
BENCH_DIR=${BENCH_DIR:-/tmp/rfbench}
ROUNDS=${ROUNDS:-3}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-4}
RATES=${RATES-1000,3000}
TARGETS=${TARGETS:-}
WORKLOADS=${WORKLOADS:-}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
mkdir -p "$BENCH_DIR"

if [[ $(nproc) -lt 2 ]]; then
  echo "the suite pins proxies to CPU 0 and the load to CPU 1: it needs 2 CPUs" >&2
  exit 1
fi

if ! command -v nginx >/dev/null; then
  echo "installing nginx (Debian package nginx-light)" >&2
  sudo_=""; [[ $(id -u) -ne 0 ]] && sudo_=sudo
  $sudo_ apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq nginx-light
  # The package starts a system nginx on :80; the suite runs its own instances.
  $sudo_ systemctl disable --now nginx 2>/dev/null || $sudo_ service nginx stop 2>/dev/null || true
fi

LITELLM=""
if [[ -z ${SKIP_LITELLM:-} ]]; then
  venv="$BENCH_DIR/litellm-venv"
  if ! "$venv/bin/litellm" --version 2>/dev/null | grep -q "$LITELLM_VERSION"; then
    echo "installing litellm[proxy]==$LITELLM_VERSION into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "litellm[proxy]==$LITELLM_VERSION"
  fi
  LITELLM="$venv/bin/litellm"
fi

cargo build --profile dist --locked -p ringfence -p ringfence-sidecar -p ringfence-bench

if [[ ${1:-} == --micro ]]; then
  cargo bench --locked -p ringfence-sidecar --bench hot_path | tee "$BENCH_DIR/micro.txt"
fi

python3 hack/bench/suite.py --bin "$TARGET_DIR/dist" --dir "$BENCH_DIR" \
  --rounds "$ROUNDS" --seconds "$SECONDS_PER_RUN" --rates "$RATES" \
  --targets "$TARGETS" --workloads "$WORKLOADS" \
  --litellm "$LITELLM" --out "$BENCH_DIR/report.md"
echo "report: $BENCH_DIR/report.md" >&2
