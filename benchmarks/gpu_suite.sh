#!/usr/bin/env bash
# One command for every GPU figure of the project, printed as one markdown table (benchmarks/README.md says what
# each row means). Made for one H100/H200 (about 5-7 minutes there); --dry-run runs every step on the CPU with
# the tiny network, tiny sizes and 1-2 iterations, so that a test keeps the suite working.
#
#   bash benchmarks/gpu_suite.sh               # on the GPU machine, with .whl carried (benchmarks/device_wheels.sh)
#   bash benchmarks/gpu_suite.sh --dry-run     # anywhere: the same steps on the CPU
#   bash benchmarks/gpu_suite.sh --out DIR     # also write gpu_suite.md, gpu_suite.log, gpu_suite.json to DIR
#                                              # (default: $OUT when it is set)
# Exit status: 0 all rows measured, 1 a step failed (its row says so), 2 something needed is missing (nothing ran).
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
DRY=0
DEST=${OUT:-}
while (($#)); do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) DEST=${2:?--out needs a folder}; shift ;;
        -h|--help) sed -n '2,10p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "gpu_suite.sh: unknown argument '$1' (use --dry-run, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done
cd "$REPO"
die() { echo "gpu_suite.sh: $*" >&2; exit 2; }
command -v "$PY" >/dev/null || die "no '$PY' on PATH (set PYTHON to the python that has torch)."

# the carried wheels (benchmarks/device_wheels.sh), installed as the device README says, only when needed
if ! "$PY" -c "import monai, ignite, fire" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    echo "gpu_suite.sh: installing the carried wheels from .whl into /tmp/site" >&2
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || die "the wheels in .whl do not install (rebuild them with bash benchmarks/device_wheels.sh)."
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
TORCHRUN=$(command -v torchrun || echo "$(dirname "$("$PY" -c 'import sys; print(sys.executable)')")/torchrun")

if ((DRY)); then
    DEVICE=cpu PRESET=tiny SIZE=32 BATCH=2 STEPS=1 WARMUP=1 REF_BATCH=2 REF_STEPS=1 REF_WARMUP=0 BACKEND=eager
    REF_PRECISION=bf16  # fp16 convolutions are emulated on most CPUs: minutes even for the tiny network
    THREADS=(--threads 1)
    FEWSHOT=(--preset tiny --blocks 3 4 5 6 7 --crop-size 32 --image-size 64 64 --num-images 2 --steps 1 --warmup 0)
    FEWSHOT+=(--sw-batch 2 --threads 1)
    DDP=(--preset tiny --image_size 32 --batch_size 2 --max_iterations 3 --num_workers 0 --amp False)
    DDP_SETTING="tiny 32 px, batch 2, fp32"
    IMAGES=(--count 4 --size 40)
    LIMIT=600
else
    DEVICE=cuda PRESET=paper SIZE=256 BATCH=32 STEPS=5 WARMUP=2 REF_BATCH=128 REF_STEPS=2 REF_WARMUP=1 BACKEND=inductor
    REF_PRECISION=fp16  # the reference trains in fp16
    THREADS=()
    FEWSHOT=(--preset paper --num-images 16 --image-size 1024 1024 --steps 5 --warmup 1 --sw-batch 8)
    DDP=(--preset paper --image_size 256 --batch_size 32 --max_iterations 12 --num_workers 8)
    DDP+=(--amp True --amp_dtype bfloat16)
    DDP_SETTING="paper 256 px, batch 32, bf16"
    IMAGES=(--count 32 --size 320)
    LIMIT=300
fi
"$PY" benchmarks/gpu_suite.py check --device "$DEVICE" --torchrun "$TORCHRUN" || die "stopped before running anything (see above)."

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")
LOG=$WORK/gpu_suite.log
FAILED=0
step() {  # step NAME COMMAND...: run with a time limit, output to the log; a failure is noted and the suite goes on
    local name=$1 start=$SECONDS
    shift
    echo "gpu_suite.sh: $name ..." >&2
    { echo; echo "===== $name: $*"; } >>"$LOG"
    timeout "$LIMIT" "$@" >>"$LOG" 2>&1
    local rc=$?
    echo "===== $name: exit status $rc after $((SECONDS - start)) s" >>"$LOG"
    if ((rc)); then
        FAILED=1
        echo "gpu_suite.sh: $name FAILED (exit status $rc$( ((rc == 124)) && echo ", over ${LIMIT} s")); see the log" >&2
    fi
}

PRETRAIN=(benchmarks/pretrain_throughput.py --device "$DEVICE" --preset "$PRESET" --image-size "$SIZE" --skip-masking)
PRETRAIN+=("${THREADS[@]}")
TIMED=(--batch "$BATCH" --steps "$STEPS" --warmup "$WARMUP")
step pretrain_fp32 "$PY" "${PRETRAIN[@]}" "${TIMED[@]}" --precision fp32 --json "$WORK/pretrain_fp32.json"
step pretrain_bf16 "$PY" "${PRETRAIN[@]}" "${TIMED[@]}" --precision bf16 --json "$WORK/pretrain_bf16.json"
step pretrain_bf16_cl_compile "$PY" "${PRETRAIN[@]}" "${TIMED[@]}" --precision bf16 --channels-last --compile \
    --compile-backend "$BACKEND" --json "$WORK/pretrain_bf16_cl_compile.json"
step pretrain_bf16_ckpt "$PY" "${PRETRAIN[@]}" "${TIMED[@]}" --precision bf16 --gradient-checkpointing \
    --json "$WORK/pretrain_bf16_ckpt.json"
step pretrain_reference "$PY" "${PRETRAIN[@]}" --batch "$REF_BATCH" --micro-batches "$REF_BATCH" \
    --precision "$REF_PRECISION" --steps "$REF_STEPS" --warmup "$REF_WARMUP" --json "$WORK/pretrain_reference.json"
step fewshot "$PY" benchmarks/fewshot_memory.py --device "$DEVICE" "${FEWSHOT[@]}" --json "$WORK/fewshot.json"

# the pretraining bundle itself, DDP on one process (nccl on a GPU, gloo on the CPU), timed by --timing_file
step images "$PY" benchmarks/gpu_suite.py images "$WORK/images" "${IMAGES[@]}"
printf '{"setting": "%s"}\n' "$DDP_SETTING" >"$WORK/ddp_settings.json"
step ddp_bundle "$TORCHRUN" --standalone --nnodes=1 --nproc_per_node=1 -m monai.bundle run \
    --config_file "['bundles/mdm_pretrain/configs/train.json','bundles/mdm_pretrain/configs/multi_gpu_train.json']" \
    --dataset_dir "$WORK/images" --output_dir "$WORK/ddp_run" "${DDP[@]}" --save_interval 100000 --grid_interval 0 \
    --resume False --progress_bar False --timing_file "$WORK/ddp_timing.json"
rm -rf "$WORK/ddp_run" "$WORK/images"

HEADER=("$("$PY" -c "
import platform, torch
dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() and '$DEVICE' == 'cuda' else 'CPU'
print(f'GPU suite ($( ((DRY)) && echo 'dry run on the CPU: tiny sizes, not figures' || echo 'measured')) on {dev}, '
      f'torch {torch.__version__}, Python {platform.python_version()}, $(date -u +%Y-%m-%dT%H:%MZ)')
")")
TABLE_ARGS=(benchmarks/gpu_suite.py table "$WORK" --header "${HEADER[0]}")
[[ -n "$DEST" ]] && TABLE_ARGS+=(--out "$DEST/gpu_suite.md" --results "$DEST/gpu_suite.json")
"$PY" "${TABLE_ARGS[@]}" || FAILED=1
if [[ -n "$DEST" ]]; then
    mkdir -p "$DEST" && cp "$LOG" "$DEST/gpu_suite.log"
fi
((FAILED)) && echo "gpu_suite.sh: some steps failed; the log: ${DEST:+$DEST/gpu_suite.log or }$LOG" >&2
exit $FAILED
