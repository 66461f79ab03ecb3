#!/usr/bin/env bash
# Docker smoke test for lenet_xp: build the CPU and the GPU (CUDA 12) variants of
# docker/Dockerfile on a locally made Debian base image and run them here, on a
# machine without a GPU:
#   cpu: one short training run (default device cpu);
#   gpu: CuPy's CUDA lookup inside the image (NVRTC + CUDA headers from the wheels:
#        a kernel that includes cuda_fp16.h compiles, and so do lenet_xp's own kernels
#        from their installed .cu sources), `--device cuda` exits 1 with a
#        one-line reason, `--device auto` falls back to the CPU and trains;
#   both: the image runs as non-root and holds no copy of the build's CA bundle.
# It ends by printing the image sizes and "docker smoke: OK".
#
#   bash scripts/docker_smoke.sh
#   VARIANTS=gpu bash scripts/docker_smoke.sh     # one variant only
#
# Needs: docker (client + a running daemon) and, the first time only, debootstrap
# to make the base image `lenet_xp-base:bookworm` (no registry is needed; the builds
# download from PyPI). If the daemon is not reachable and we are root, it is started
# in the background (vfs storage, no bridge/iptables; log in /tmp/dockerd.log);
# otherwise the script says how to start it, or, where docker or dockerd is not
# installed, what to install (docker.io or Docker's own packages, and debootstrap), and
# exits 1.
# With the vfs driver every layer is a full copy: the GPU variant takes about 3 GB
# per copy (see docker/README.md for the measured sizes), so keep ~25 GB free.
#
# Environment knobs:
#   VARIANTS          variants to build and test, in order (default "cpu gpu")
#   LENET_XP_DATA     host dir with the MNIST .gz files (default ../shared/datasets/mnist,
#                     relative to the repo root); mounted read-only at /data
#   BASE_IMAGE        base image name            (default lenet_xp-base:bookworm)
#   CPU_IMAGE         CPU image tag               (default lenet_xp:cpu-smoke; IMAGE also works)
#   GPU_IMAGE         GPU image tag               (default lenet_xp:cuda12-smoke)
#   GPU_EXTRAS        extra for the GPU variant   (default cuda12; cuda13 also works)
#   PRUNE             1: `docker image prune -f` after each build, which drops the
#                     untagged builder stage (it holds the CA bundle, and the GPU
#                     one ~3 GB; default 0 keeps it as the build cache)
#   DEBIAN_MIRROR     mirror for debootstrap      (default http://deb.debian.org/debian)
#   HOST_CA_BUNDLE    CA bundle passed to pip in the builder stage
#                     (default /etc/ssl/certs/ca-certificates.crt)
#   PIP_INDEX_URL     optional package index passed as a build arg
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

VARIANTS="${VARIANTS:-cpu gpu}"
BASE_IMAGE="${BASE_IMAGE:-lenet_xp-base:bookworm}"
CPU_IMAGE="${CPU_IMAGE:-${IMAGE:-lenet_xp:cpu-smoke}}"
GPU_IMAGE="${GPU_IMAGE:-lenet_xp:cuda12-smoke}"
GPU_EXTRAS="${GPU_EXTRAS:-cuda12}"
PRUNE="${PRUNE:-0}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
HOST_CA_BUNDLE="${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
DATA_DIR_IN="${LENET_XP_DATA:-../shared/datasets/mnist}"
# the short training run of both variants
TRAIN_ARGS=(--epochs 1 --limit-train 2000 --limit-test 1000 --out /tmp/run)

log() { printf '[docker_smoke] %s\n' "$*"; }
die() { printf '[docker_smoke] ERROR: %s\n' "$*" >&2; exit 1; }

for v in $VARIANTS; do
    case "$v" in cpu|gpu) ;; *) die "VARIANTS: unknown variant '$v' (use cpu and/or gpu)" ;; esac
done
[ -n "${VARIANTS// /}" ] || die "VARIANTS is empty (use \"cpu gpu\", \"cpu\" or \"gpu\")"
DATA_DIR="$(cd "$DATA_DIR_IN" 2>/dev/null && pwd)" || die "MNIST dir not found: $DATA_DIR_IN (set LENET_XP_DATA)"

# --- 0. docker daemon ---------------------------------------------------------
# What to install, said where Docker (the client, or its engine dockerd) is missing.
INSTALL_HINT="install it (Debian/Ubuntu: apt-get install -y docker.io, or Docker's own packages docker-ce and containerd.io, https://docs.docker.com/engine/install/) and, for the base image, debootstrap (apt-get install -y debootstrap); then run this again"
command -v docker >/dev/null 2>&1 || die "docker not found: Docker (the docker client and its engine, dockerd) is not installed: $INSTALL_HINT"
if ! docker info >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v dockerd >/dev/null 2>&1; then
        log "docker daemon not reachable; starting dockerd in the background (log: /tmp/dockerd.log)"
        nohup dockerd --storage-driver=vfs --bridge=none --iptables=false >/tmp/dockerd.log 2>&1 &
        for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
        docker info >/dev/null 2>&1 || die "dockerd did not come up; see /tmp/dockerd.log"
    elif ! command -v dockerd >/dev/null 2>&1; then
        die "docker daemon not reachable, and dockerd (Docker's engine) is not installed: $INSTALL_HINT"
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

# --- 3. build, run and check each variant -----------------------------------------
build() {  # build IMAGE EXTRAS DEVICE
    local image="$1" extras="$2" device="$3" t0=$SECONDS
    local args=(--build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "EXTRAS=$extras" --build-arg "DEVICE=$device")
    [ -z "${PIP_INDEX_URL:-}" ] || args+=(--build-arg "PIP_INDEX_URL=$PIP_INDEX_URL")
    log "docker build -> $image (EXTRAS=$extras DEVICE=$device BASE_IMAGE=$BASE_IMAGE)"
    docker build --network host -f docker/Dockerfile "${args[@]}" -t "$image" .
    log "built $image in $((SECONDS - t0)) s"
    if [ "$PRUNE" = 1 ]; then docker image prune -f >/dev/null; log "pruned dangling images"; fi
}

# One short training run; $1 image, the rest extra trainer arguments. Checks that it
# printed a `test_acc` line and leaves its output in $run_log.
train_ok() {
    local image="$1"; shift
    run_log="$(mktemp /tmp/lenet_xp-docker-smoke.XXXXXX.log)"
    log "docker run $image $* ${TRAIN_ARGS[*]}"
    docker run --rm --network host -v "$DATA_DIR":/data:ro "$image" \
        "$@" "${TRAIN_ARGS[@]}" 2>&1 | tee "$run_log"
    # (tqdm redraws with \r; keep only the text after the last one)
    acc_line="$(tr '\r' '\n' <"$run_log" | grep 'test_acc' | tail -n 1 || true)"
    [ -n "$acc_line" ] || die "$image: training output has no 'test_acc' line (log: $run_log)"
    log "$image: training printed: $acc_line"
}

# Non-root user, and the CA bundle not in the final image: no .docker-build/ca.crt or
# /src, no file anywhere with the same contents, no PIP_CERT in the image config.
# (each `docker run` copies the whole image with the vfs driver, so one run for both)
check_user_and_ca() {
    local image="$1" ca_sha=none ca_size=0 out id_out hits uid
    if [ -s .docker-build/ca.crt ]; then
        ca_sha="$(sha256sum .docker-build/ca.crt | cut -d' ' -f1)"
        ca_size="$(wc -c <.docker-build/ca.crt | tr -d ' ')"
    fi
    # shellcheck disable=SC2016  # $1/$2 expand inside the container
    out="$(docker run --rm --entrypoint /bin/sh "$image" -c '
        id
        find / -xdev \( -name ca.crt -o -path /src -o -path "*/.docker-build*" \) -print 2>/dev/null
        find / -xdev -type f -size "$2"c -exec sha256sum {} + 2>/dev/null | grep "^$1 " || true
    ' sh "$ca_sha" "$ca_size")"
    id_out="$(printf '%s\n' "$out" | head -n 1)"
    hits="$(printf '%s\n' "$out" | tail -n +2)"
    uid="$(printf '%s\n' "$id_out" | sed -n 's/^uid=\([0-9]*\).*/\1/p')"
    [ -n "$uid" ] && [ "$uid" != 0 ] || die "$image runs as root or uid unknown: $id_out"
    log "$image runs as non-root: $id_out"
    [ -z "$hits" ] || die "$image: CA bundle / build context found in image: $hits"
    if docker image inspect -f '{{range .Config.Env}}{{println .}}{{end}}' "$image" | grep -q '^PIP_CERT='; then
        die "$image: PIP_CERT is set in the image config"
    fi
    log "$image: CA bundle not in the image"
}

# What CuPy needs at run time, found the way CuPy finds it (cuda-pathfinder): NVRTC
# and the CUDA libraries from the wheels in site-packages, and the CUDA headers NVRTC
# compiles CuPy's kernels against; then NVRTC compiles a kernel that includes
# cuda_fp16.h and CuPy's own headers, with CuPy's include options. No GPU needed.
check_cuda_lookup() {
    local image="$1" out
    out="$(docker run --rm -i --entrypoint python "$image" - <<'PY' 2>&1
import os
import cupy
from cuda import pathfinder as pf
from cupy._core import core
from cupy_backends.cuda.libs import nvrtc

inc = pf.find_nvidia_header_directory("cudart")
assert inc and os.path.isfile(os.path.join(inc, "cuda_fp16.h")), f"CUDA headers not found: {inc}"
opts = core.assemble_cupy_compiler_options(())
assert "-I" + inc in opts, f"CuPy does not pass the CUDA headers to NVRTC: {opts}"
libs = {n: pf.load_nvidia_dynamic_lib(n) for n in ("nvrtc", "cudart", "cublas", "cublasLt", "curand")}
for name, dl in libs.items():
    assert dl.found_via == "site-packages", f"{name} not from the wheels: {dl}"
src = (
    "#include <cuda_fp16.h>\n#include <cupy/carray.cuh>\n"
    'extern "C" __global__ void k(float* x) { x[0] = __half2float(__float2half(x[0])) + 1.0f; }\n'
)
prog = nvrtc.createProgram(src, "smoke.cu", [], [])
try:
    nvrtc.compileProgram(prog, [*opts, "-arch=compute_80", "--device-as-default-execution-space"])
except Exception:
    print(nvrtc.getProgramLog(prog))
    raise
ptx = nvrtc.getPTX(prog)
print(f"cupy {cupy.__version__}, NVRTC {'.'.join(map(str, nvrtc.getVersion()))}: "
      f"{libs['nvrtc'].abs_path}")
print(f"CUDA headers: {inc}")
print("libs from site-packages: " + ", ".join(os.path.basename(d.abs_path) for d in libs.values()))
print(f"NVRTC compiled a kernel including cuda_fp16.h and cupy/carray.cuh ({len(ptx)} bytes of PTX)")

# lenet_xp's own CUDA kernels (train --engine kernels): their .cu sources must be in the
# installed package, and compile.
try:
    from lenet_xp import kernels
except ImportError:
    kernels = None
if kernels is not None and hasattr(kernels, "compile_check"):
    missing = [f for f in ("common.cuh", *kernels.SOURCES) if not (kernels._HERE / f).is_file()]
    if missing:
        raise SystemExit(
            f"lenet_xp kernel sources missing from the installed package ({kernels._HERE}): "
            f"{', '.join(missing)}; the wheel ships only .py files unless pyproject.toml has "
            '[tool.setuptools.package-data] lenet_xp = ["kernels/*.cu", "kernels/*.cuh"]'
        )
    for f in kernels.SOURCES:
        kernels.compile_check(f)
    print(f"NVRTC compiled lenet_xp's kernels: {', '.join(kernels.SOURCES)}")
PY
)" || die "$image: CuPy's CUDA lookup failed:
$out"
    printf '%s\n' "$out" | sed "s|^|[docker_smoke] $image: |"
}

# `--device cuda` with no GPU: exit status 1 and a single line giving the reason.
check_cuda_refused() {
    local image="$1" out rc
    log "docker run $image --device cuda ${TRAIN_ARGS[*]}  (no GPU here: must exit 1)"
    set +e
    out="$(docker run --rm --network host -v "$DATA_DIR":/data:ro "$image" \
        --device cuda "${TRAIN_ARGS[@]}" 2>&1)"
    rc=$?
    set -e
    printf '%s\n' "$out"
    [ "$rc" = 1 ] || die "$image --device cuda: exit status $rc, expected 1"
    [ "$(printf '%s\n' "$out" | grep -c .)" = 1 ] || die "$image --device cuda: expected one line of output"
    printf '%s\n' "$out" | grep -q -- '--device cuda: CUDA is not usable: .*Use --device cpu' \
        || die "$image --device cuda: the line does not give the reason"
    log "$image --device cuda: exit 1, one line"
}

built=()
for variant in $VARIANTS; do
    case "$variant" in
        cpu)
            build "$CPU_IMAGE" "" cpu
            train_ok "$CPU_IMAGE"
            rm -f "$run_log"
            check_user_and_ca "$CPU_IMAGE"
            built+=("$CPU_IMAGE")
            ;;
        gpu)
            build "$GPU_IMAGE" "$GPU_EXTRAS" cuda
            check_cuda_lookup "$GPU_IMAGE"
            check_cuda_refused "$GPU_IMAGE"
            train_ok "$GPU_IMAGE" --device auto
            grep -q 'device: auto -> cpu' "$run_log" || die "$GPU_IMAGE --device auto: no 'device: auto -> cpu' line"
            log "$GPU_IMAGE --device auto: fell back to the CPU and trained"
            rm -f "$run_log"
            check_user_and_ca "$GPU_IMAGE"
            built+=("$GPU_IMAGE")
            ;;
    esac
    log "variant $variant: OK"
done

# --- 4. image sizes ------------------------------------------------------------------
log "image sizes (uncompressed, as \`docker image inspect\` reports them):"
for image in "${built[@]}"; do
    bytes="$(docker image inspect -f '{{.Size}}' "$image")"
    printf '[docker_smoke]   %-28s %6d MB  (%s bytes)\n' "$image" "$((bytes / 1000000))" "$bytes"
done

echo "docker smoke: OK ($VARIANTS)"
