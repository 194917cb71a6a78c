#!/usr/bin/env bash
# Runs the whole test suite: sets up the machine (Docker engine, busybox,
# PostgreSQL binaries, virtualenv), then pytest. Extra args go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest -q "$@"
