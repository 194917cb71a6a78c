#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks and prepares the virtualenv.
# Idempotent: safe to run again. Sourced by test.sh and quickstart.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

need_apt=()
command -v dockerd >/dev/null 2>&1 || need_apt+=(docker.io)
[ -x /bin/busybox ] || need_apt+=(busybox-static)
[ -x /usr/lib/postgresql/15/bin/initdb ] || need_apt+=(postgresql-15)
command -v docker-compose >/dev/null 2>&1 || need_apt+=(docker-compose)
command -v debootstrap >/dev/null 2>&1 || need_apt+=(debootstrap)   # seeds the python base image offline
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)         # Studio's browser tests
[ -x /usr/sbin/nginx ] || need_apt+=(nginx-light)                     # the router's differential HTTP tests
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)                 # the swarm test harness
command -v nsenter >/dev/null 2>&1 || need_apt+=(util-linux)          # (nsenter, unshare)
{ command -v protoc-gen-go-grpc && [ -d /usr/share/gocode/src/google.golang.org/genproto ]; } >/dev/null 2>&1 || need_apt+=(golang-go golang-google-grpc-dev golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev golang-google-genproto-dev protoc-gen-go protoc-gen-go-grpc protobuf-compiler libprotobuf-dev)  # the Go client example, built offline
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# The swarm test harness (tests/support/swarm.py) runs Debian's docker-registry,
# extracted here without installing (and starting) its system service.
REGISTRY_DIR=/opt/berth-docker-registry
if [ ! -x "$REGISTRY_DIR/usr/bin/docker-registry" ]; then
  echo "setup: extracting docker-registry to $REGISTRY_DIR" >&2
  deb_dir="$(mktemp -d)"
  chmod 755 "$deb_dir"
  ( cd "$deb_dir" && { apt-get download -qq docker-registry 2>/dev/null || { apt-get update -qq && apt-get download -qq docker-registry; }; } )
  mkdir -p "$REGISTRY_DIR"
  dpkg-deb -x "$deb_dir"/docker-registry_*.deb "$REGISTRY_DIR"
  rm -rf "$deb_dir"
fi

if ! docker info >/dev/null 2>&1; then
  echo "setup: starting dockerd" >&2
  nohup dockerd >/tmp/berth-dockerd.log 2>&1 &
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  docker info >/dev/null 2>&1 || { echo "setup: dockerd did not start; see /tmp/berth-dockerd.log" >&2; exit 1; }
fi

if [ ! -x "$ROOT/.venv/bin/python" ]; then
  python3 -m venv "$ROOT/.venv"
fi
if ! "$ROOT/.venv/bin/pip" install -q --disable-pip-version-check -e "$ROOT[dev]" > /tmp/berth-pip.log 2>&1; then
  grep -v '^WARNING: Location' /tmp/berth-pip.log >&2
  echo "setup: pip install failed" >&2
  exit 1
fi
"$ROOT/.venv/bin/python" -c "import berth.cli, services.registry.app" 

bash "$ROOT/scripts/seed-base-images.sh"
