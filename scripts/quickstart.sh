#!/usr/bin/env bash
# Brings the platform up on the embedded default (SQLite + the local Docker
# engine) and deploys the example worker in examples/hello. Safe to re-run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
export PATH="$ROOT/.venv/bin:$PATH"
DATA_DIR="${BERTH_DATA_DIR:-$HOME/.local/share/berth}"
export BERTH_DATA_DIR="$DATA_DIR"
mkdir -p "$DATA_DIR"
# berth up reads BERTH_ROUTER_PORT (and BERTH_REGISTRY_PORT, ...) too
ROUTER="http://127.0.0.1:${BERTH_ROUTER_PORT:-8080}"

if ! curl -fsS "$ROUTER/healthz" >/dev/null 2>&1; then
  echo "==> starting the platform in the background (logs in $DATA_DIR/berth-up.log; 'berth down' stops it)"
  berth up --detach
fi

CREDENTIALS="$DATA_DIR/hello-project.env"
if [ ! -f "$CREDENTIALS" ]; then
  echo "==> creating project 'hello'"
  key="$(berth projects create hello --output json | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"]["api_key"])')"
  umask 077
  printf 'export BERTH_API_KEY=%s\nexport BERTH_PROJECT=hello\n' "$key" > "$CREDENTIALS"
fi
# shellcheck disable=SC1090
. "$CREDENTIALS"

echo "==> setting a project secret and deploying examples/hello to preview"
printf 'hello from a Berth secret' | berth secrets set --name GREETING --type generic --stdin
berth deploy "$ROOT/examples/hello"

echo "==> asking the router for the preview environment"
curl -sS -H 'X-Berth-Project: hello' -H 'X-Berth-Environment: preview' -D - "$ROUTER/"
echo
echo "Next: source $CREDENTIALS, then try 'berth history --environment preview' or 'berth promote <id> --to staging'."
