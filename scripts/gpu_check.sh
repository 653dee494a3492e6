#!/usr/bin/env bash
# The GPU checks in one command: install the GPU extras, run the GPU tests (tests/test_gpu.py) and a short
# realistic-scale benchmark, and write every result to files.
#
#   bash scripts/gpu_check.sh                      # all stages: env install tests slow bench
#   bash scripts/gpu_check.sh env install tests    # some stages, in the order given
#
# Needs: Linux x86_64, one or more NVIDIA GPUs of compute capability >= 8.0 (A100, H100/H200, L4, RTX 30xx/40xx:
# bfloat16, FlexAttention's Triton kernels, flash-attention), a CUDA build of torch >= 2.5 (FlexAttention BlockMask
# API) and an NVIDIA driver recent enough for that build's CUDA (CUDA 12.x: driver >= 525; CUDA 13: >= 580;
# `nvidia-smi` prints both). bitsandbytes 0.50 ships its CUDA kernels in the wheel. flash-attn is optional (its tests
# and benchmark row are skipped without it): FLASH_ATTN=1 tries `pip install flash-attn --no-build-isolation`
# (online; it compiles when no wheel matches). DeepSpeed (ZeRO-3 tests) is optional too: DEEPSPEED=1 installs it
# (offline from DS_WHEELS, default $WHEELS: its sdist is built there against the machine's torch).
#
# Environment:
#   OUT=dir       results (default runs/gpu; the session device tool sets OUT to the folder it brings back)
#   WHEELS=dir    install offline from the wheels in dir (`pip download` them on a machine with network, e.g.
#                 `bash scripts/gpu_check.sh download`, into wheels/, which git ignores); the machine must already
#                 have a CUDA torch, transformers, peft and accelerate. Without WHEELS: `pip install -e ".[test]"`.
#   PYTEST_ARGS   extra pytest arguments (e.g. "-k fsdp2"); BENCH_ARGS replaces the benchmark's arguments.
#
# Through a session's device tool (offline, 10 minutes per command, 64 MiB carried): fill wheels/ (46 MB) and, for
# ZeRO-3, wheels-ds/ (13 MB) here with the download stages, then run in separate commands, carrying the folder used:
#   WHEELS=wheels bash scripts/gpu_check.sh env install tests          (carry wheels/; about 5-6 minutes, estimated)
#   bash scripts/gpu_check.sh bench                                    (same warm machine)
#   WHEELS=wheels DEEPSPEED=1 DS_WHEELS=wheels-ds bash scripts/gpu_check.sh install slow   (carry both)
#
# Files in $OUT: environment.txt (nvidia-smi, versions), install.log, pytest-gpu.txt and pytest-gpu-slow.txt (+ junit
# XML), measured.json (the differences and memory ratios each GPU test measured: the source of the bf16 tolerance),
# benchmark-gpu.md/.json (also copied to docs/benchmark-gpu.md), summary.txt (the exit code of every stage).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" GPO_GPU_RESULTS="$OUT" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
PYTHON=${PYTHON:-python}
PINNED="trl==1.16.0 datasets==5.2.0 bitsandbytes==0.50.2 pytest==9.0.3 hypothesis==6.155.2"
# Their dependencies that a machine with torch/transformers/peft/accelerate/pandas/pyarrow/xxhash may lack
DEPENDENCIES="dill==0.4.1 fsspec==2026.9.0 iniconfig==2.3.0 pluggy==1.6.0 pygments==2.20.0 sortedcontainers==2.4.0"

stage_download() {  # on a machine with network: the wheels for WHEELS=wheels (no torch: the GPU machine has its own)
    mkdir -p wheels
    $PYTHON -m pip download --no-deps -d wheels $PINNED $DEPENDENCIES &&
    for version in 3.10 3.11 3.12 3.13; do  # multiprocess (datasets) has one wheel per Python minor
        $PYTHON -m pip download --no-deps --only-binary=:all: --python-version "$version" -d wheels multiprocess==0.70.19
    done
}

stage_download_deepspeed() {  # optional, 13 MB: wheels-ds/ for DEEPSPEED=1 DS_WHEELS=wheels-ds
    mkdir -p wheels-ds
    $PYTHON -m pip download --no-deps -d wheels-ds deepspeed==0.19.8 hjson ninja py-cpuinfo einops nvidia-ml-py \
        pydantic==2.13.4 annotated-types typing-inspection &&
    for version in 3.10 3.11 3.12 3.13; do
        $PYTHON -m pip download --no-deps --only-binary=:all: --python-version "$version" \
            --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d wheels-ds pydantic-core==2.46.4 msgpack
    done
}

stage_env() {
    { nvidia-smi; echo; $PYTHON - <<'EOF'
import importlib.metadata as m, platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    print(f"gpu {i}:", torch.cuda.get_device_name(i), "capability", torch.cuda.get_device_capability(i))
for name in ("transformers", "peft", "accelerate", "trl", "datasets", "bitsandbytes", "flash_attn", "deepspeed"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "not installed")
EOF
    } > "$OUT/environment.txt" 2>&1
    cat "$OUT/environment.txt"
    $PYTHON -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" ||
        { echo "gpu_check: torch sees no CUDA GPU (see $OUT/environment.txt)"; return 1; }
}

stage_install() {
    {
        if [ -n "${WHEELS:-}" ]; then
            $PYTHON -m pip install --no-index --find-links "$WHEELS" $PINNED
        else
            $PYTHON -m pip install -e ".[test]"
        fi || return 1
        if [ "${FLASH_ATTN:-0}" = 1 ]; then
            $PYTHON -m pip install flash-attn --no-build-isolation || echo "flash-attn not installed: its tests skip"
        fi
        if [ "${DEEPSPEED:-0}" = 1 ]; then
            local ds_wheels=${DS_WHEELS:-${WHEELS:-}}
            DS_BUILD_OPS=0 $PYTHON -m pip install --no-build-isolation \
                ${ds_wheels:+--no-index --find-links "$ds_wheels"} deepspeed==0.19.8 ||
                echo "deepspeed not installed: the ZeRO-3 tests skip"
        fi
        $PYTHON -m pip check || true
    } > "$OUT/install.log" 2>&1
    local code=$?
    tail -5 "$OUT/install.log"
    return $code
}

run_pytest() {  # $1: marker expression, $2: file stem
    # shellcheck disable=SC2086
    $PYTHON -m pytest tests/test_gpu.py -m "$1" -ra -v --durations=15 --junitxml "$OUT/$2.xml" ${PYTEST_ARGS:-} \
        2>&1 | tee "$OUT/$2.txt"
    return "${PIPESTATUS[0]}"
}

stage_tests() { run_pytest "gpu and not slow" pytest-gpu; }
stage_slow() { run_pytest "gpu and slow" pytest-gpu-slow; }  # FSDP2 / ZeRO-3 launches: several minutes

stage_bench() {
    local args=${BENCH_ARGS:---device cuda --scale qwen2.5-0.5b --steps 6 --warmup 2}
    # shellcheck disable=SC2086
    $PYTHON scripts/benchmark.py $args --json "$OUT/benchmark-gpu.json" --markdown "$OUT/benchmark-gpu.md" 2>&1 |
        tee "$OUT/benchmark-gpu.txt"
    local code=${PIPESTATUS[0]}
    [ "$code" = 0 ] && cp "$OUT/benchmark-gpu.md" docs/benchmark-gpu.md
    return "$code"
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(env install tests slow bench)
status=0
for stage in "${stages[@]}"; do
    if ! declare -F "stage_$stage" > /dev/null; then
        echo "gpu_check: unknown stage '$stage' (stages: download download_deepspeed env install tests slow bench)"; exit 2
    fi
    echo "=== gpu_check: $stage ($(date -u +%H:%M:%S) UTC)"
    started=$SECONDS
    "stage_$stage"
    code=$?
    echo "$stage: exit $code, $((SECONDS - started)) s" | tee -a "$OUT/summary.txt"
    [ "$code" = 0 ] || status=1
    # Nothing after the environment or the install can run without them
    if [ "$code" != 0 ] && { [ "$stage" = env ] || [ "$stage" = install ]; }; then break; fi
done
exit $status
