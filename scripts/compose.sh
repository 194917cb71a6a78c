#!/usr/bin/env bash
# Runs the platform with docker-compose: four service containers + PostgreSQL.
#   bash scripts/compose.sh up     # prepare (wheels, base images, .env) and start; waits until healthy
#   bash scripts/compose.sh down   # stop and remove the platform, its volumes and its replicas
# Settings come from the env file (default .env, created on first `up` with
# fresh random credentials, 0600): BERTH_SERVICE_TOKEN, BERTH_ADMIN_KEY,
# BERTH_*_PORT, BERTH_INSTANCE.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
ENV_FILE="${BERTH_COMPOSE_ENV_FILE:-$ROOT/.env}"
PROJECT="${COMPOSE_PROJECT_NAME:-berth}"

compose() { docker-compose --project-name "$PROJECT" --env-file "$ENV_FILE" -f "$ROOT/docker-compose.yml" "$@"; }

case "${1:-up}" in
  up)
    bash "$ROOT/scripts/setup.sh"
    command -v docker-compose >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null; }
    bash "$ROOT/scripts/seed-base-images.sh" busybox python postgres
    rm -rf "$ROOT/build/wheels"
    "$ROOT/.venv/bin/pip" wheel -q --disable-pip-version-check --wheel-dir "$ROOT/build/wheels" "$ROOT" 2>&1 | grep -v '^WARNING: Location' || true
    if [ ! -f "$ENV_FILE" ]; then
      umask 077
      {
        echo "BERTH_SERVICE_TOKEN=berth_svc_$(openssl rand -hex 32)"
        echo "BERTH_ADMIN_KEY=berth_admin_$(openssl rand -hex 32)"
        echo "BERTH_PG_PASSWORD=$(openssl rand -hex 16)"
      } > "$ENV_FILE"
    fi
    compose up -d --build
    port="$(grep -E '^BERTH_ROUTER_PORT=' "$ENV_FILE" | cut -d= -f2 || true)"
    for _ in $(seq 1 120); do
      curl -fsS "http://127.0.0.1:${port:-8080}/healthz" >/dev/null 2>&1 && { echo "Berth (compose) is up: http://127.0.0.1:${port:-8080}"; exit 0; }
      sleep 1
    done
    compose ps
    compose logs --tail 50
    echo "compose: the router did not become healthy" >&2
    exit 1
    ;;
  down)
    compose down -v --remove-orphans
    instance="$(grep -E '^BERTH_INSTANCE=' "$ENV_FILE" 2>/dev/null | cut -d= -f2 || true)"
    ids="$(docker ps -aq --filter "label=berth.instance=${instance:-compose}")"
    [ -z "$ids" ] || docker rm -f $ids >/dev/null
    ;;
  *)
    compose "$@"
    ;;
esac
