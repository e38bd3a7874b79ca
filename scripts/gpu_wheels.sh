#!/usr/bin/env bash
# Gather the wheels the GPU machine's image lacks into .whl/ (or $1) on a machine whose pip reaches a registry:
# Python 3.12, x86-64 Linux, no dependencies resolved (each name below is one the image lacks; it has torch, triton,
# transformers, accelerate, pyarrow, pandas, xxhash and the rest of what these need). About 3 MB: small enough to
# travel with a working tree. `python benchmarks/gpu_check.py --wheels .whl` installs them offline (its first phase)
# so that the benchmark times TRL's fused head, Liger and Cut Cross-Entropy there too.
#
#   scripts/gpu_wheels.sh            # into .whl/ (ignored by git)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=${1:-$ROOT/.whl}
PYTHON=${PYTHON:-python3}
# Pinned as pyproject.toml's [bench] and [trl] extras pin them, with datasets and its two pure-Python needs for TRL.
WHEELS=(liger-kernel==0.8.5 cut-cross-entropy==25.1.1 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do PLATFORMS+=(--platform "$p"); done
mkdir -p "$DEST"
"$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${PLATFORMS[@]}" -d "$DEST" "${WHEELS[@]}"
du -sh "$DEST"
