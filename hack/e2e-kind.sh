#!/usr/bin/env bash
# The end-to-end scenario on a real cluster (not part of hack/test.sh: it needs Docker and a
# cluster). It builds both images, installs the chart, applies examples/incident, puts two demo
# agent Deployments behind injected sidecars, and asserts that the orchestrator may delegate to
# research while research → orchestrator (the overnight loop's edge) is denied by policy.
#
#   hack/e2e-kind.sh                 # kind: creates cluster "ringfence-e2e" if missing, loads images
#   E2E_CLUSTER=any hack/e2e-kind.sh # the current kubeconfig; E2E_REGISTRY=<registry> to push to
#   E2E_KEEP=1 hack/e2e-kind.sh      # leave everything installed to look around
#
# Tools: docker; kind (kind mode); helm and kubectl come from hack/chart-check.sh's cache.
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${E2E_CLUSTER:-kind}
KIND_NAME=${E2E_KIND_NAME:-ringfence-e2e}
REGISTRY=${E2E_REGISTRY:-ghcr.io/ringfence}
TAG=${E2E_TAG:-e2e-$(git rev-parse --short HEAD)}
NS=ringfence-system
DEMO=ringfence-demo
IMAGE=$REGISTRY/ringfence:$TAG
SIDECAR_IMAGE=$REGISTRY/ringfence-sidecar:$TAG

step() { printf '\n==> %s\n' "$*"; }
fail() { echo "e2e-kind: FAILED: $*" >&2; exit 1; }

step "tools (helm and kubectl from hack/chart-check.sh, which also validates the chart)"
bash hack/chart-check.sh
export PATH="$PWD/hack/.tools/bin:$PATH"
command -v docker >/dev/null || fail "docker is needed to build the images"

if [ "$CLUSTER" = kind ]; then
  command -v kind >/dev/null || fail "kind is not installed; set E2E_CLUSTER=any to use the current kubeconfig"
  if ! kind get clusters | grep -qx "$KIND_NAME"; then
    step "creating kind cluster $KIND_NAME"
    kind create cluster --name "$KIND_NAME" --wait 120s
  fi
  kubectl config use-context "kind-$KIND_NAME"
fi
kubectl version >/dev/null || fail "no cluster reachable with the current kubeconfig"

step "images $IMAGE and $SIDECAR_IMAGE"
docker build -f hack/docker/ringfence.Dockerfile -t "$IMAGE" .
docker build -f hack/docker/sidecar.Dockerfile -t "$SIDECAR_IMAGE" .
if [ "$CLUSTER" = kind ]; then
  kind load docker-image --name "$KIND_NAME" "$IMAGE" "$SIDECAR_IMAGE"
else
  docker push "$IMAGE"
  docker push "$SIDECAR_IMAGE"
fi

cleanup() {
  if [ "${E2E_KEEP:-}" = 1 ]; then
    echo "E2E_KEEP=1: leaving the release and namespace $DEMO in place"
    return
  fi
  kubectl delete namespace "$DEMO" --ignore-not-found --wait=false || true
  helm uninstall ringfence -n "$NS" || true
}
trap cleanup EXIT

step "helm install"
helm upgrade --install ringfence charts/ringfence -n "$NS" --create-namespace \
  --set image.repository="$REGISTRY/ringfence" --set image.tag="$TAG" \
  --set sidecarImage.repository="$REGISTRY/ringfence-sidecar" --set sidecarImage.tag="$TAG" \
  --wait --timeout 5m
kubectl -n "$NS" rollout status deploy/ringfence-operator --timeout 3m
kubectl -n "$NS" rollout status statefulset/ringfence-budget --timeout 3m

step "the operator patches the webhooks' caBundle"
for _ in $(seq 60); do
  bundle=$(kubectl get mutatingwebhookconfiguration ringfence -o jsonpath='{.webhooks[0].clientConfig.caBundle}')
  [ -n "$bundle" ] && break
  sleep 2
done
[ -n "$bundle" ] || fail "the MutatingWebhookConfiguration's caBundle was never set"

step "examples/incident in namespace $DEMO"
kubectl create namespace "$DEMO" --dry-run=client -o yaml | kubectl apply -f -
kubectl -n "$DEMO" apply -f examples/incident/

step "the validating webhook refuses Cedar that does not parse"
if out=$(kubectl -n "$DEMO" apply -f - 2>&1 <<'YAML'
apiVersion: ringfence.dev/v1alpha1
kind: AgentPolicy
metadata: {name: broken}
spec:
  cedar: |
    permit (principal, action, resource) when { principal.team == };
YAML
); then
  fail "a broken AgentPolicy was admitted: $out"
fi
grep -q "spec.cedar" <<<"$out" || fail "the refusal does not name spec.cedar: $out"
echo "refused as expected: $out"

step "demo agents, annotated for injection"
kubectl -n "$DEMO" apply -f hack/e2e-kind/demo-agents.yaml
for agent in orchestrator research; do
  kubectl -n "$DEMO" patch deployment "$agent" --type merge -p "{\"spec\":{\"template\":{\"metadata\":{
    \"labels\":{\"ringfence.dev/inject\":\"true\"},
    \"annotations\":{\"ringfence.dev/agent\":\"$agent\"}}}}}"
done
for agent in orchestrator research; do
  kubectl -n "$DEMO" rollout status deployment "$agent" --timeout 5m
  containers=$(kubectl -n "$DEMO" get pods -l app="$agent" \
    -o jsonpath='{.items[0].spec.initContainers[*].name} {.items[0].spec.containers[*].name}')
  [ "$(grep -o ringfence-sidecar <<<"$containers" | wc -l)" = 1 ] \
    || fail "$agent's pod should have exactly one ringfence-sidecar, has: $containers"
done

step "orchestrator → research is allowed"
reply=$(kubectl -n "$DEMO" exec deploy/orchestrator -c app -- python /app/agent.py call research "find sources")
echo "$reply"
[[ "$reply" == 200* ]] || fail "orchestrator → research should be allowed"

step "research → orchestrator is denied by no-loops"
reply=$(kubectl -n "$DEMO" exec deploy/research -c app -- python /app/agent.py call orchestrator "retry")
echo "$reply"
[[ "$reply" == 403* ]] || fail "research → orchestrator should be denied"
grep -q "$DEMO/no-loops/deny\[0\]" <<<"$reply" || fail "the denial should name the rule $DEMO/no-loops/deny[0]"
grep -q "research → orchestrator" <<<"$reply" || fail "the denial should name the edge"

kubectl -n "$DEMO" get agents,agentpolicies,runbudgets
echo
echo "e2e-kind: ok"
