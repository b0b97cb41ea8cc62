#!/usr/bin/env bash
# Builds .gpucarry/: what bench/gpu.py and tests/test_gpu_parity.py need on the device machine, which has PyTorch
# and transformers but no network, and no dashscope. Run it here (with the
# project's venv active), then name .gpucarry in the device run's `carry` and start the command with
#     source .gpucarry/setup.sh
# It holds: the transformers wheel this project pins, a dashscope stand-in holding only Qwen's ranks file (what
# thinktalk's tokenizer reads), and the tokenizer files built from it (the full-size config is in tests/data/).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
out=.gpucarry
rm -rf "$out.tmp" && mkdir -p "$out.tmp/whl" "$out.tmp/shim/dashscope/resources" "$out.tmp/tokenizer"
version=$("$python" -c "import transformers; print(transformers.__version__)")
"$python" -m pip download -q --no-deps --only-binary=:all: -d "$out.tmp/whl" "transformers==$version"
ranks=$("$python" -c "import importlib.util, pathlib; spec = importlib.util.find_spec('dashscope');
print(pathlib.Path(spec.origin).parent / 'resources' / 'qwen.tiktoken')")
cp "$ranks" "$out.tmp/shim/dashscope/resources/"
: > "$out.tmp/shim/dashscope/__init__.py"
"$python" -c "from pathlib import Path; from thinktalk.processing.tokenizer import build_qwen_tokenizer_files;
build_qwen_tokenizer_files(Path('$out.tmp/tokenizer'))"
cat > "$out.tmp/setup.sh" <<'SETUP'
# Device-side set-up: the pinned transformers and the dashscope stand-in.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpucarry/whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD/.gpucarry/shim:$PWD PYTHONUNBUFFERED=1
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
SETUP
rm -rf "$out" && mv "$out.tmp" "$out"
du -sh "$out"
