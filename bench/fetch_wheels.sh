#!/usr/bin/env bash
# Downloads the wheels that the GPU check's benchmarks need beyond a GPU machine's image (torch, triton,
# transformers, pytest, ninja, pybind11 are assumed there): Liger-Kernel and Cut Cross-Entropy, whose only
# requirements are torch and triton. Run it where pip can reach the package index; the GPU machine needs no
# network. bench/gpu_check.sh installs whatever bench/wheels/*.whl holds (pip --no-deps --target) when the
# folder travels with the checkout (it is git-ignored: copy it along, or name it among the untracked paths to
# bring).
#
#   bash bench/fetch_wheels.sh [NAME==VERSION ...]     (default: the versions below)
#
# PYTHON_VERSION (default 3.12) and PLATFORMS select the target interpreter and manylinux tags.
set -euo pipefail
cd "$(dirname "$0")"
DEST=wheels
PY=${PYTHON:-python3}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
PKGS=("$@")
[ ${#PKGS[@]} -gt 0 ] || PKGS=(liger-kernel==0.8.5 cut-cross-entropy==25.1.1)
PLATFORMS=${PLATFORMS:-"manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 any"}
mkdir -p "$DEST"
for spec in "${PKGS[@]}"; do  # one version of each: an older wheel of the same project is removed first
  name=$(echo "${spec%%[=<>!~]*}" | tr '-' '_')
  find "$DEST" -maxdepth 1 -iname "${name}-*.whl" -delete
done
args=()
for p in $PLATFORMS; do args+=(--platform "$p"); done
"$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
  "${args[@]}" -d "$DEST" "${PKGS[@]}"
ls -l "$DEST"
