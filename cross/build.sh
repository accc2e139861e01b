#!/usr/bin/env bash
# Release build for an ARM target with Debian's cross toolchains. Installs nothing;
# see cross/README.md for the packages and rustup targets it needs.
#   cross/build.sh aarch64-unknown-linux-gnu     (Raspberry Pi 3/4/5, 64-bit OS)
#   cross/build.sh armv7-unknown-linux-gnueabihf (Raspberry Pi 2/3/4, 32-bit OS)
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 TARGET   (aarch64-unknown-linux-gnu | armv7-unknown-linux-gnueabihf)" >&2
    exit 2
fi
target=$1
cd "$(dirname "$0")/.."

cargo --config cross/cargo-config.toml build --release --target "$target"
echo "built: target/$target/release/holdfast"
