#!/usr/bin/env bash
# Builds .gpucarry/: what bench/gpu_run.py, bench/gpu.py and tests/test_gpu_parity.py need on the device machine,
# which has PyTorch (and some transformers) but no network and no dashscope. Works from a fresh clone: it needs only
# a python3 with pip on PATH (or PYTHON=...) and access to PyPI; no virtual environment, no installed thinktalk.
#
#     bash bench/gpu_carry.sh [--dry-run]      # --dry-run: print the downloads instead of running them
#
# Then name .gpucarry in the device run's `carry` and start the command with
#     source .gpucarry/setup.sh
# It holds: whl/ the transformers wheel pyproject.toml pins (the reference implementation); shim/dashscope/ a
# stand-in package holding only dashscope's Qwen ranks file (what thinktalk's tokenizer reads), taken from the
# dashscope wheel; tokenizer/ the tokenizer files built from it, when this interpreter can import thinktalk (torch,
# tokenizers), else setup.sh builds them on the device (seconds); setup.sh. The full-size config is in tests/data/.
set -euo pipefail
cd "$(dirname "$0")/.."
dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; elif [[ $# -gt 0 ]]; then echo "usage: $0 [--dry-run]" >&2; exit 2; fi
python=${PYTHON:-}
if [[ -z "$python" ]]; then
  if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=$(command -v python3 || true); fi
fi
if [[ -z "$python" ]] || ! "$python" -m pip --version > /dev/null 2>&1; then
  echo "gpu_carry.sh needs a python3 with pip: put one on PATH or set PYTHON (got '${python:-none}')" >&2
  exit 1
fi
version=$(sed -n 's/.*"transformers==\([0-9][0-9.]*\)".*/\1/p' pyproject.toml | head -n 1)
dashscope=$(sed -n 's/.*"\(dashscope[<>=!~][^"]*\)".*/\1/p' pyproject.toml | head -n 1)
if [[ -z "$version" || -z "$dashscope" ]]; then
  echo "pyproject.toml pins no transformers==VERSION or dashscope requirement" >&2
  exit 1
fi
out=.gpucarry
rm -rf "$out.tmp" && mkdir -p "$out.tmp/whl" "$out.tmp/shim/dashscope/resources" "$out.tmp/tokenizer" "$out.tmp/dl"
download() {  # a wheel, no dependencies, into $2
  if [[ $dry_run == 1 ]]; then
    echo "would run: $python -m pip download -q --no-deps --only-binary=:all: -d $2 '$1'"
  else
    "$python" -m pip download -q --no-deps --only-binary=:all: -d "$2" "$1"
  fi
}
download "transformers==$version" "$out.tmp/whl"
download "$dashscope" "$out.tmp/dl"
: > "$out.tmp/shim/dashscope/__init__.py"
if [[ $dry_run == 0 ]]; then
  "$python" - "$out.tmp" <<'PY'
import sys, zipfile
from pathlib import Path
out = Path(sys.argv[1])
[wheel] = (out / "dl").glob("dashscope-*.whl")
with zipfile.ZipFile(wheel) as archive:
    data = archive.read("dashscope/resources/qwen.tiktoken")  # KeyError names the file if a release drops it
(out / "shim/dashscope/resources/qwen.tiktoken").write_bytes(data)
print(f"ranks: {len(data.splitlines())} lines from {wheel.name}")
PY
  if PYTHONPATH="$out.tmp/shim:$PWD" "$python" -c "import torch, tokenizers" 2> /dev/null; then
    PYTHONPATH="$out.tmp/shim:$PWD" "$python" -c "import sys; from thinktalk.processing.tokenizer import \
build_qwen_tokenizer_files as build; build(sys.argv[1])" "$out.tmp/tokenizer"
  else
    echo "no torch/tokenizers in $python: setup.sh builds the tokenizer files on the device"
  fi
fi
rm -rf "$out.tmp/dl"
cat > "$out.tmp/setup.sh" <<'SETUP'
# Device-side set-up: the pinned transformers, the dashscope stand-in, and the tokenizer files if not built yet.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpucarry/whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD/.gpucarry/shim:$PWD PYTHONUNBUFFERED=1
if [ ! -f .gpucarry/tokenizer/tokenizer.json ]; then
  python3 -c "from thinktalk.processing.tokenizer import build_qwen_tokenizer_files as b; b('.gpucarry/tokenizer')" || return 1
fi
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
SETUP
rm -rf "$out" && mv "$out.tmp" "$out"
if [[ $dry_run == 1 ]]; then echo "dry run: $out/ holds setup.sh and the shim, without the downloads"; fi
du -sh "$out"
