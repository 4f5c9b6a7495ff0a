#!/usr/bin/env bash
# Build the TensorRT engines for one artefact directory on a Jetson Orin (or any CUDA machine),
# then check that the runtime loads them. The ONNX export happens on x86; see README.md here.
#
#   scripts/jetson/build_engines.sh ARTIFACTS_DIR [python -m export.engine flags...]
#
# With no extra flags on a board with less than 16 GB, it limits the context to 2048 positions
# (KV cache, prompt activations) and the builder workspace to 1 GiB, and refuses a decoder plan
# whose memory, computed from shapes, exceeds the board's memory minus 2 GiB. PYTHON picks the
# interpreter (default python3: JetPack's system python, which has TensorRT).
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 ARTIFACTS_DIR [python -m export.engine flags...]" >&2
    exit 2
fi
ARTIFACTS=$1
shift
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if [ -r /etc/nv_tegra_release ]; then
    echo "Jetson: $(head -n 1 /etc/nv_tegra_release)"
else
    echo "note: not a Jetson (no /etc/nv_tegra_release); building for this machine's GPU"
fi

if ! "$PYTHON" -c "import tensorrt as t; print('TensorRT', t.__version__)" 2>/dev/null; then
    echo "error: $PYTHON cannot import tensorrt: on JetPack 6.1+ use the system python3" \
         "(a venv needs --system-site-packages); elsewhere pip install tensorrt" >&2
    exit 1
fi

if [ ! -f "$ARTIFACTS/manifest.json" ]; then
    echo "error: $ARTIFACTS/manifest.json not found: copy the export made on x86 here first" >&2
    exit 1
fi
if ! grep -q '"precision": "fp16"' "$ARTIFACTS/manifest.json"; then
    echo "note: this export is not fp16: the engines will be FP32 (re-export with --precision fp16)"
fi

mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
avail_kb=$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo)
echo "memory: $((mem_kb / 1024)) MiB total, $((avail_kb / 1024)) MiB available (shared with the GPU on Jetson)"

flags=("$@")
if [ ${#flags[@]} -eq 0 ] && [ "$mem_kb" -lt $((16 * 1024 * 1024)) ]; then
    flags=(--max-context 2048 --workspace-gb 1 --memory-budget-gb $((mem_kb / 1024 / 1024 - 2)))
    echo "small board: using ${flags[*]}"
fi

"$PYTHON" -m export.engine --artifacts "$ARTIFACTS" "${flags[@]}"

if "$PYTHON" -c "import cuda.bindings.runtime" 2>/dev/null || "$PYTHON" -c "from cuda import cudart" 2>/dev/null; then
    "$PYTHON" -m runtime.backends.trt "$ARTIFACTS"
else
    echo "note: cuda-python is missing, so the load check was skipped: pip install 'cuda-python>=12.6,<13'"
fi
