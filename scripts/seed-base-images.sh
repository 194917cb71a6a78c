#!/usr/bin/env bash
# The example Dockerfiles start FROM busybox. On a machine that reaches a
# container registry it is simply pulled; where none is reachable, seed it
# from Debian's busybox-static so builds work offline.
set -euo pipefail
IMAGE="busybox:1.36"
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  exit 0
fi
if docker pull -q "$IMAGE" >/dev/null 2>&1; then
  exit 0
fi
echo "seed: building $IMAGE from /bin/busybox (no registry reachable)" >&2
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/bin" "$root/tmp" "$root/etc"
cp /bin/busybox "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
done
echo 'root:x:0:0:root:/root:/bin/sh' > "$root/etc/passwd"
echo 'nobody:x:65534:65534:nobody:/:/bin/false' >> "$root/etc/passwd"
tar -C "$root" -c . | docker import --change 'CMD ["sh"]' --change 'ENV PATH=/bin' - "$IMAGE" >/dev/null
