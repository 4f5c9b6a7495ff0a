#!/usr/bin/env bash
# The GPU check and `pytest -m gpu` in one go, on a CUDA machine that reaches no package index
# and already has PyTorch (with its pip nvidia-* libraries), onnx and transformers:
#
#   bash scripts/gpu_offline.sh ARCHIVE OUT [ONNX_IR_WHEEL]
#
# ARCHIVE: onnxruntime-gpu cut to one GPU architecture by scripts/slim_ort_gpu.py (.tar.xz),
# unpacked into a temporary folder put first on PYTHONPATH. ONNX_IR_WHEEL: an onnx-ir >= 1.1
# wheel, for an image whose onnx-ir is older (the exporters need `ir.save(alignment=)`).
# OUT gets env.txt, gpu_check.json/.md, check.log and pytest.txt. Time limits, in seconds:
# BUDGET (whole run, default 575) and CHECK_LIMIT (the check, default 470); the tests get what
# is left. Exports go to $EXPORTS (default a temporary folder) and are reused by a rerun there.
set -uo pipefail
if [ $# -lt 2 ]; then
  echo "usage: bash scripts/gpu_offline.sh ARCHIVE OUT [ONNX_IR_WHEEL]" >&2
  exit 2
fi
archive=$1 out=$2 wheel=${3:-}
budget=${BUDGET:-575} check_limit=${CHECK_LIMIT:-470}
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$out" || exit 2
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
exports=${EXPORTS:-$(mktemp -d)}
tar xJf "$archive" -C "$site" || { echo "error: cannot unpack $archive" >&2; exit 2; }
if [ -n "$wheel" ]; then
  python3 -m pip install -q --no-index --no-deps --target "$site" "$wheel" || exit 2
fi
# ONNX Runtime's CUDA provider loads the CUDA and cuDNN libraries PyTorch's wheels brought
nvidia_libs=$(python3 -c "import glob, os, torch
root = os.path.dirname(os.path.dirname(torch.__file__))
print(':'.join(sorted({os.path.dirname(p) for p in glob.glob(root + '/nvidia/**/lib*.so*', recursive=True)})))")
export LD_LIBRARY_PATH=$nvidia_libs:${LD_LIBRARY_PATH:-} PYTHONPATH=$site:$PWD PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  echo "cores: $(nproc)"
  python3 -c "import onnxruntime as o, torch, transformers, onnx
print('onnxruntime', o.__version__, o.get_available_providers())
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'onnx', onnx.__version__)"
} 2>&1 | tee "$out/env.txt"
echo "setup: $(elapsed) s"
timeout "$check_limit" python3 scripts/gpu_check.py --out "$out" --exports "$exports" 2> "$out/check.log"
echo "gpu_check: exit $? at $(elapsed) s"
grep -E "^==|FAILED" "$out/check.log" | tail -40
left=$(( budget - $(elapsed) ))
if [ "$left" -lt 30 ]; then
  echo "pytest -m gpu: not run, $left s left of BUDGET=$budget"
  exit 1
fi
timeout "$left" python3 -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_ort_cuda.py \
  tests/test_engine.py tests/test_runners.py > "$out/pytest.txt" 2>&1
echo "pytest -m gpu: exit $? at $(elapsed) s"
tail -25 "$out/pytest.txt"
