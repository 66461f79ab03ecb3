#!/usr/bin/env bash
# Docker smoke test for lenet_xp: build the CPU variant of docker/Dockerfile on a
# locally made Debian base image and run one short training in it.
#
#   bash scripts/docker_smoke.sh
#
# Needs: docker (client + a running daemon) and, the first time only, debootstrap
# to make the base image `lenet_xp-base:bookworm` (no registry is needed).
# If the daemon is not reachable and we are root, it is started in the
# background (vfs storage, no bridge/iptables; log in /tmp/dockerd.log);
# otherwise the script says how to start it and exits 1.
#
# Environment knobs:
#   LENET_XP_DATA     host dir with the MNIST .gz files (default ../shared/datasets/mnist,
#                     relative to the repo root); mounted read-only at /data
#   BASE_IMAGE        base image name            (default lenet_xp-base:bookworm)
#   IMAGE             image tag to build          (default lenet_xp:cpu-smoke)
#   DEBIAN_MIRROR     mirror for debootstrap      (default http://deb.debian.org/debian)
#   HOST_CA_BUNDLE    CA bundle passed to pip in the builder stage
#                     (default /etc/ssl/certs/ca-certificates.crt)
#   PIP_INDEX_URL     optional package index passed as a build arg
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

BASE_IMAGE="${BASE_IMAGE:-lenet_xp-base:bookworm}"
IMAGE="${IMAGE:-lenet_xp:cpu-smoke}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
HOST_CA_BUNDLE="${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
DATA_DIR_IN="${LENET_XP_DATA:-../shared/datasets/mnist}"

log() { printf '[docker_smoke] %s\n' "$*"; }
die() { printf '[docker_smoke] ERROR: %s\n' "$*" >&2; exit 1; }

# --- 0. docker daemon ---------------------------------------------------------
command -v docker >/dev/null 2>&1 || die "docker not found (Debian: apt-get install -y docker.io)"
if ! docker info >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v dockerd >/dev/null 2>&1; then
        log "docker daemon not reachable; starting dockerd in the background (log: /tmp/dockerd.log)"
        nohup dockerd --storage-driver=vfs --bridge=none --iptables=false >/tmp/dockerd.log 2>&1 &
        for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
        docker info >/dev/null 2>&1 || die "dockerd did not come up; see /tmp/dockerd.log"
    else
        echo "docker daemon not reachable; start it (as root) with: dockerd --storage-driver=vfs --bridge=none --iptables=false > /tmp/dockerd.log 2>&1 &" >&2
        exit 1
    fi
fi

# --- 1. base image ---------------------------------------------------------------
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    log "base image $BASE_IMAGE present"
else
    log "base image $BASE_IMAGE missing; creating it with debootstrap ($DEBIAN_MIRROR)"
    if ! command -v debootstrap >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            apt-get install -y debootstrap >/dev/null
        else
            die "debootstrap not found (apt-get install -y debootstrap)"
        fi
    fi
    [ "$(id -u)" = 0 ] || die "debootstrap needs root to create $BASE_IMAGE"
    rootfs="$(mktemp -d /tmp/lenet_xp-rootfs.XXXXXX)"
    chmod 755 "$rootfs"   # becomes the image's "/": mktemp's 0700 would lock out non-root users
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" "$DEBIAN_MIRROR" >/tmp/lenet_xp-debootstrap.log 2>&1 \
        || die "debootstrap failed; see /tmp/lenet_xp-debootstrap.log"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import \
        -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        -c 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
    log "created $BASE_IMAGE"
fi

# --- 2. CA bundle into the build context (builder stage only) ----------------
mkdir -p .docker-build
if [ -s "$HOST_CA_BUNDLE" ]; then
    cp "$HOST_CA_BUNDLE" .docker-build/ca.crt
    log "copied $HOST_CA_BUNDLE -> .docker-build/ca.crt"
else
    : > .docker-build/ca.crt   # empty = pip's own CA store
    log "no CA bundle at $HOST_CA_BUNDLE; builder uses pip's default CAs"
fi

# --- 3. build ---------------------------------------------------------------------
build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg EXTRAS= --build-arg DEVICE=cpu)
[ -z "${PIP_INDEX_URL:-}" ] || build_args+=(--build-arg "PIP_INDEX_URL=$PIP_INDEX_URL")
log "docker build -> $IMAGE"
docker build --network host -f docker/Dockerfile "${build_args[@]}" -t "$IMAGE" .

# --- 4. one short training run ----------------------------------------------------
DATA_DIR="$(cd "$DATA_DIR_IN" 2>/dev/null && pwd)" || die "MNIST dir not found: $DATA_DIR_IN (set LENET_XP_DATA)"
log "MNIST dir: $DATA_DIR (mounted read-only at /data)"
run_log="$(mktemp /tmp/lenet_xp-docker-smoke.XXXXXX.log)"
docker run --rm --network host -v "$DATA_DIR":/data:ro "$IMAGE" \
    --epochs 1 --limit-train 2000 --limit-test 1000 --out /tmp/run 2>&1 | tee "$run_log"

# --- 5. checks ---------------------------------------------------------------------
# (tqdm redraws with \r; keep only the text after the last one)
acc_line="$(tr '\r' '\n' <"$run_log" | grep 'test_acc' | tail -n 1 || true)"
[ -n "$acc_line" ] || die "training output has no 'test_acc' line (log: $run_log)"
log "training printed: $acc_line"

# (each `docker run` copies the whole image with the vfs driver, so few runs)
id_out="$(docker run --rm --entrypoint id "$IMAGE")"
uid="$(printf '%s\n' "$id_out" | sed -n 's/^uid=\([0-9]*\).*/\1/p')"
[ -n "$uid" ] && [ "$uid" != 0 ] || die "image runs as root or uid unknown: $id_out"
log "image runs as non-root: $id_out"

# The CA bundle must not be in the final image: no .docker-build/ca.crt or /src,
# no file anywhere with the same contents, and no PIP_CERT in the image config.
ca_sha=none ca_size=0
if [ -s .docker-build/ca.crt ]; then
    ca_sha="$(sha256sum .docker-build/ca.crt | cut -d' ' -f1)"
    ca_size="$(wc -c <.docker-build/ca.crt | tr -d ' ')"
fi
# shellcheck disable=SC2016  # $1/$2 expand inside the container
hits="$(docker run --rm --entrypoint /bin/sh "$IMAGE" -c '
    find / -xdev \( -name ca.crt -o -path /src -o -path "*/.docker-build*" \) -print 2>/dev/null
    find / -xdev -type f -size "$2"c -exec sha256sum {} + 2>/dev/null | grep "^$1 " || true
' sh "$ca_sha" "$ca_size")"
[ -z "$hits" ] || die "CA bundle / build context found in image: $hits"
if docker image inspect -f '{{range .Config.Env}}{{println .}}{{end}}' "$IMAGE" | grep -q '^PIP_CERT='; then
    die "PIP_CERT is set in the image config"
fi
log "CA bundle not in the image"

rm -f "$run_log"
echo "docker smoke: OK"
