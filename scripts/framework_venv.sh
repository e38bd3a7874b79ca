#!/usr/bin/env bash
# Build .venv-NAME (NAME = openrlhf | verl) in the repository root: torch 2.13.0, the framework at a pinned
# release, this project with its test extra. Idempotent: a second run only checks a stamp and exits.
#
# Every pip call runs under a constraints file pinning torch==2.13.0, so no dependency can swap in another torch
# (an unpinned torch would pull GBs of CUDA wheels on a CPU runner).
#
# Stubs (import-only modules written into the venv's site-packages, every attribute raises when used):
#   openrlhf: flash_attn  - a CUDA-only build; openrlhf.models.ring_attn_utils imports flash_attn.bert_padding at
#                           module level, but only ring attention (packed samples) calls it; the tests do not.
#             vllm        - an extra of OpenRLHF, imported by openrlhf/trainer/ray/vllm_engine.py through the package
#                           __init__ that the experience maker's import chain runs; only generation calls it.
#   verl:     none        - verl 0.9's base dependencies (plus fastapi, uvicorn below) all install on a CPU machine.
set -euo pipefail
NAME=${1:?usage: scripts/framework_venv.sh openrlhf|verl}
PYTHON=${PYTHON:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV="$ROOT/.venv-$NAME"
case "$NAME" in
  openrlhf) PIN="openrlhf==0.11.2"
            STUBS="flash_attn flash_attn.bert_padding flash_attn.utils flash_attn.utils.distributed
                   vllm vllm.inputs vllm.utils" ;;
  verl)     PIN="verl==0.9.1";      STUBS="" ;;
  *) echo "unknown framework: $NAME (openrlhf | verl)" >&2; exit 2 ;;
esac
STAMP="$VENV/.installed-$PIN-$(cat "$ROOT/pyproject.toml" "$0" | sha1sum | cut -c1-12)"
[ -f "$STAMP" ] && { echo "$VENV is up to date"; exit 0; }

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
echo "torch==2.13.0" > "$VENV/constraints.txt"
export PIP_CONSTRAINT="$VENV/constraints.txt"   # also applies inside isolated build environments
"${PIP[@]}" --upgrade pip setuptools wheel
"${PIP[@]}" torch==2.13.0

if [ "$NAME" = openrlhf ]; then
  # The framework itself, then every base dependency it declares except flash-attn (stubbed below).
  "${PIP[@]}" --no-deps "$PIN"
  mapfile -t DEPS < <("$VENV/bin/python" - <<'PY'
from importlib.metadata import requires
for req in requires("openrlhf"):
    if "extra ==" not in req and not req.startswith("flash-attn"):
        print(req.split(";")[0].strip())
PY
)
  # DeepSpeed ships as an sdist whose setup.py imports torch: build it against the venv's torch, no CUDA ops.
  DS_BUILD_OPS=0 "${PIP[@]}" --no-build-isolation "$(printf '%s\n' "${DEPS[@]}" | grep '^deepspeed')"
  "${PIP[@]}" "${DEPS[@]}"
else
  # fastapi and uvicorn come from verl's verl-core extra: verl/workers/engine_workers.py (the actor worker, whose
  # loss hook the adapter sets) imports them; the rest of that extra (TransferQueue, torchcodec, nvtx, ...) is not.
  "${PIP[@]}" "$PIN" fastapi uvicorn
fi
"${PIP[@]}" -e "$ROOT[test]"

SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for module in $STUBS; do
  dir="$SITE/${module//.//}"
  mkdir -p "$dir"
  cat > "$dir/__init__.py" <<PY
"""Import-only stub of $module written by rankgrpo-kernels' scripts/framework_venv.sh (not the real package)."""
__version__ = "0.0.0+stub"


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)

    def unavailable(*args, **kwargs):
        raise RuntimeError(f"$module.{name} is a stub in this test environment; the code under test never calls it")

    return unavailable
PY
done
rm -f "$VENV"/.installed-*
touch "$STAMP"
echo "$VENV ready"
