#!/usr/bin/env bash
# The Dockerfiles here start FROM public base images (busybox, python,
# postgres). On a machine that reaches a container registry they are simply
# pulled. Where none is reachable, this seeds them locally:
#   busybox:1.36       from Debian's busybox-static
#   python:3.11-slim   from a debootstrap'd Debian bookworm (python 3.11)
#   postgres:15        from the same rootfs plus PostgreSQL 15
# Usage: seed-base-images.sh [busybox] [python] [postgres]   (default: busybox)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
wanted=("$@")
[ ${#wanted[@]} -gt 0 ] || wanted=(busybox)

have() { docker image inspect "$1" >/dev/null 2>&1; }
try_pull() { timeout 60 docker pull -q "$1" >/dev/null 2>&1; }

seed_busybox() {
  local image="busybox:1.36"
  have "$image" || try_pull "$image" && return 0
  echo "seed: building $image from /bin/busybox (no registry reachable)" >&2
  local root
  root="$(mktemp -d)"
  mkdir -p "$root/bin" "$root/tmp" "$root/etc"
  cp /bin/busybox "$root/bin/busybox"
  for applet in $("$root/bin/busybox" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
  done
  echo 'root:x:0:0:root:/root:/bin/sh' > "$root/etc/passwd"
  echo 'nobody:x:65534:65534:nobody:/:/bin/false' >> "$root/etc/passwd"
  tar -C "$root" -c . | docker import --change 'CMD ["sh"]' --change 'ENV PATH=/bin' - "$image" >/dev/null
  rm -rf "$root"
}

bookworm_rootfs() {
  # One rootfs serves both seeded images; built once per run.
  if [ -z "${BOOKWORM_ROOTFS:-}" ]; then
    command -v debootstrap >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
    BOOKWORM_ROOTFS="$(mktemp -d)"
    echo "seed: debootstrap bookworm with python3 and postgresql-15 (about a minute)" >&2
    debootstrap --variant=minbase --include=python3,python3-venv,postgresql-15,ca-certificates bookworm "$BOOKWORM_ROOTFS" >/dev/null
    rm -rf "$BOOKWORM_ROOTFS"/var/cache/apt/archives/*.deb "$BOOKWORM_ROOTFS"/var/lib/apt/lists/*
    ln -sf python3 "$BOOKWORM_ROOTFS/usr/bin/python"
    install -m 0755 "$ROOT/deploy/postgres/docker-entrypoint.sh" "$BOOKWORM_ROOTFS/usr/local/bin/docker-entrypoint.sh"
  fi
}

seed_python() {
  local image="python:3.11-slim"
  have "$image" || try_pull "$image" && return 0
  bookworm_rootfs
  tar -C "$BOOKWORM_ROOTFS" -c . | docker import --change 'CMD ["python3"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - "$image" >/dev/null
}

seed_postgres() {
  local image="postgres:15"
  have "$image" || try_pull "$image" && return 0
  bookworm_rootfs
  tar -C "$BOOKWORM_ROOTFS" -c . | docker import \
    --change 'ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV PGDATA=/var/lib/postgresql/data' \
    --change 'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]' --change 'CMD ["postgres"]' \
    --change 'EXPOSE 5432' - "$image" >/dev/null
}

for name in "${wanted[@]}"; do
  "seed_$name"
done
if [ -n "${BOOKWORM_ROOTFS:-}" ]; then rm -rf "$BOOKWORM_ROOTFS"; fi
