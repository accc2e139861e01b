#!/usr/bin/env bash
# Build Holdfast for an ARM target on an x86_64 Debian/Ubuntu host, without Docker, and print
# the binary's path on the last line of stdout. Installs what is missing:
#   - glibc targets: Debian's cross gcc (apt-get; sudo when not root) and the rustup target;
#   - musl targets: zig (PyPI `ziglang`) + cargo-zigbuild (crates.io), since Debian ships musl
#     headers and libc only for the host architecture. armv7 musl has no prebuilt rust-std,
#     so std is compiled from source with nightly (-Zbuild-std).
#
#   cross/build.sh aarch64-unknown-linux-gnu        # Pi 3/4/5, Zero 2: 64-bit Raspberry Pi OS
#   cross/build.sh armv7-unknown-linux-gnueabihf    # Pi 2/3/4: 32-bit Raspberry Pi OS
#   cross/build.sh aarch64-unknown-linux-musl       # static, any 64-bit ARM Linux
#   cross/build.sh armv7-unknown-linux-musleabihf   # static, any ARMv7 hard-float Linux
#
# Environment:
#   PROFILE=dist (default; fat LTO, no debug info, what ships) | release (fat LTO, line tables)
#          | dev (unoptimized; quickest, what CI builds)
#   NO_INSTALL=1   never install anything; fail with the command that would have been run
# Extra arguments go to cargo (e.g. --locked). See cross/README.md.
set -euo pipefail

targets="aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf"
if [[ $# -lt 1 || " $targets " != *" $1 "* ]]; then
    echo "usage: $0 TARGET [cargo args...]" >&2
    echo "  TARGET: ${targets// / | }" >&2
    exit 2
fi
target=$1
shift
profile=${PROFILE:-dist}
cd "$(dirname "$0")/.."

die() {
    echo "cross/build.sh: $*" >&2
    exit 1
}
note() {
    echo "cross/build.sh: $*" >&2
}

# --- system packages (apt) -------------------------------------------------------------
apt_install() {
    # apt_install PACKAGE... : install Debian packages, as root or through sudo.
    local sudo=()
    if [[ -n "${NO_INSTALL:-}" ]]; then
        die "missing: $* (NO_INSTALL is set; run: apt-get install $*)"
    fi
    command -v apt-get >/dev/null || die "missing: $* and no apt-get here; install the equivalent packages by hand"
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null || die "missing: $*; not root and no sudo: run as root: apt-get install $*"
        sudo=(sudo)
    fi
    note "installing $* (apt-get)"
    if ! DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y --no-install-recommends "$@" >&2; then
        note "apt-get install failed; refreshing the package lists and retrying"
        "${sudo[@]}" apt-get update >&2 || true
        DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y --no-install-recommends "$@" >&2 ||
            die "could not install $* with apt-get (see above)"
    fi
}

# --- Rust standard library for the target ------------------------------------------------
ensure_std() {
    # A prebuilt std for $target in the active toolchain's sysroot, or `rustup target add`.
    [[ -d "$(rustc --print sysroot)/lib/rustlib/$target/lib" ]] && return 0
    command -v rustup >/dev/null || die "no std for $target in $(rustc --print sysroot) and no rustup to add it"
    [[ -z "${NO_INSTALL:-}" ]] || die "std for $target missing (NO_INSTALL is set; run: rustup target add $target)"
    note "rustup target add $target"
    rustup target add "$target" >&2 ||
        die "rustup could not download the std for $target (offline, or not distributed for this toolchain)"
}

cargo_cmd=(cargo --config cross/cargo-config.toml)
build_std=()
case $target in
*-gnu | *-gnueabihf)
    case $target in
    aarch64-*) gcc=aarch64-linux-gnu-gcc pkgs=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross) ;;
    armv7-*) gcc=arm-linux-gnueabihf-gcc pkgs=(gcc-arm-linux-gnueabihf libc6-dev-armhf-cross) ;;
    esac
    command -v "$gcc" >/dev/null || apt_install "${pkgs[@]}"
    command -v "$gcc" >/dev/null || die "$gcc still not found after installing ${pkgs[*]}"
    ensure_std
    ;;
*-musl | *-musleabihf)
    # zig compiles the C code (SQLite, ring) against musl headers for the target and links
    # with its musl crt; cargo-zigbuild drives it.
    if ! command -v zig >/dev/null && ! python3 -m ziglang version >/dev/null 2>&1; then
        [[ -z "${NO_INSTALL:-}" ]] || die "zig missing (NO_INSTALL is set; run: pip install ziglang)"
        command -v python3 >/dev/null || die "zig missing and no python3 to pip install ziglang"
        note "pip install ziglang"
        python3 -m pip install --quiet ziglang >&2 || die "pip install ziglang failed"
    fi
    if ! command -v cargo-zigbuild >/dev/null; then
        [[ -z "${NO_INSTALL:-}" ]] || die "cargo-zigbuild missing (NO_INSTALL is set; run: cargo install --locked cargo-zigbuild)"
        note "cargo install --locked cargo-zigbuild"
        cargo install --locked cargo-zigbuild >&2 || die "cargo install cargo-zigbuild failed"
    fi
    cargo_cmd=(cargo)
    if [[ $target == armv7-unknown-linux-musleabihf ]]; then
        # rustup has no prebuilt std for this target (HTTP 404 for rust-std 1.95): build std
        # from source with nightly. Needs the nightly toolchain and its rust-src component.
        if ! rustc +nightly --version >/dev/null 2>&1; then
            [[ -z "${NO_INSTALL:-}" ]] || die "nightly missing (run: rustup toolchain install nightly --component rust-src)"
            rustup toolchain install nightly --profile minimal --component rust-src >&2 ||
                die "could not install the nightly toolchain (needed for -Zbuild-std)"
        fi
        if [[ ! -d "$(rustc +nightly --print sysroot)/lib/rustlib/src/rust/library" ]]; then
            [[ -z "${NO_INSTALL:-}" ]] || die "rust-src missing (run: rustup component add rust-src --toolchain nightly)"
            rustup component add rust-src --toolchain nightly >&2 ||
                die "could not add rust-src to nightly (needed for -Zbuild-std)"
        fi
        cargo_cmd=(cargo +nightly)
        # llvm-libunwind: the unwinder is compiled from rust-src too (panic = "unwind" is kept).
        build_std=(-Zbuild-std=std,panic_unwind -Zbuild-std-features=llvm-libunwind)
    else
        ensure_std
    fi
    cargo_cmd+=(zigbuild --config cross/cargo-config.toml)
    ;;
esac
[[ ${cargo_cmd[1]} == --config ]] && cargo_cmd+=(build)
note "${cargo_cmd[*]} --profile $profile --target $target ${build_std[*]} $*"
"${cargo_cmd[@]}" --profile "$profile" --target "$target" --bin holdfast "${build_std[@]}" "$@" >&2

out_dir=$profile
[[ $profile == dev || $profile == test ]] && out_dir=debug
out="${CARGO_TARGET_DIR:-target}/$target/$out_dir/holdfast"
[[ -x $out ]] || die "cargo succeeded but $out is missing"
echo "$out"
