#!/usr/bin/env bash
# Everything that needs an NVIDIA GPU, in at most two calls of ~10 minutes each on a lent
# H100/H200 (the device tool) or on any CUDA machine with torch + triton installed.
#
#   bash benchmarks/gpu_session.sh tests   # install, CUDA build of the C++ extension, GPU kernel tests
#   bash benchmarks/gpu_session.sh suite   # install, benchmarks/run_all.py --device cuda
#   bash benchmarks/gpu_session.sh all     # both (a plain CUDA machine without a time limit)
#   bash benchmarks/gpu_session.sh suite fused_kl,importance   # a subset of the suite (run_all --only),
#                                          # e.g. when the whole suite would outrun a 10-minute call
#
# Results land in $OUT (the device tool's return folder) or benchmarks/results/ otherwise:
# suite_cuda.md, gpu_tests.log, suite_cuda.log, env.txt. Commit suite_cuda.md with the device named.
#
# Liger-Kernel (the side-by-side row and the cross-check test) is not in the device image and
# nothing can be downloaded there: fetch its wheel here first and carry it (`carry: [".whl"]`):
#   echo /.whl/ >> .git/info/exclude
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl liger-kernel==0.8.5
set -uo pipefail
phase="${1:-all}"
only="${2:-}"
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
PY="${PYTHON:-python3}"

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# the image's torch/triton/transformers stay as they are: no dependency resolution, no isolated build
"$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$out/install.log" 2>&1 \
    || { tail -30 "$out/install.log"; exit 1; }
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    "$PY" - <<'EOF' 2>&1
import torch, triton, transformers
cuda = torch.cuda.is_available()
print("torch", torch.__version__, "cuda", torch.version.cuda, "| triton", triton.__version__,
      "| transformers", transformers.__version__, "|",
      torch.cuda.get_device_name() if cuda else "NO CUDA DEVICE VISIBLE: tests run the CPU paths, the suite refuses")
try:
    from importlib.metadata import version
    import liger_kernel  # noqa: F401
    print("liger-kernel", version("liger-kernel"))
except ImportError:
    print("liger-kernel not installed (no Liger rows / cross-check)")
from minitron.ops import gather_backend
print("gather backend:", gather_backend(torch.device("cuda" if cuda else "cpu")))
EOF
} | tee "$out/env.txt"

status=0
if [[ "$phase" == tests || "$phase" == all ]]; then
    # kernels vs the pure-PyTorch references on the GPU, the CUDA gather op, and the losses
    "$PY" -m pytest -q -p no:cacheprovider tests/kernels/ \
        tests/test_distill_losses.py tests/test_importance.py 2>&1 | tee "$out/gpu_tests.log"
    status=$((status | ${PIPESTATUS[0]}))
fi
if [[ "$phase" == suite || "$phase" == all ]]; then
    "$PY" benchmarks/run_all.py --device cuda ${only:+--only "$only"} --out "$out/suite_cuda.md" 2>&1 \
        | tee "$out/suite_cuda.log"
    status=$((status | ${PIPESTATUS[0]}))
fi
exit $status
