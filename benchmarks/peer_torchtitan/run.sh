#!/usr/bin/env bash
# torchtitan 0.2.2 (PyPI) as a peer benchmark of the DeepSeek-V2-Lite-shaped 16B model, on a GPU machine without
# network; run from anywhere, it works in the repository root. See README.md beside this file.
#
#   NGPU=4 bash benchmarks/peer_torchtitan/run.sh [extra torchtitan flags, appended last]
#
# Environment (defaults):
#   NGPU=4          processes (GPUs); FSDP degree = EP degree = NGPU
#   STEPS=50        training steps, every one logged (log_freq 1)
#   WARMUP=40       steps left out of the summary's means: step 1 holds the compile, and both frameworks' bias
#                   balancing evens the experts out over the first tens of steps (scaleout.sh's 16b section also
#                   times steps 41-50)
#   LAYERS=27       27: the 16B shape; 14: the same cut to 14 layers (flavor "16B_sdpa_14l", our workload
#                   `deepseek16b_14l`), which fits 2 GPUs (ATTN=sdpa only)
#   ATTN=sdpa       sdpa: flavor "16B_sdpa" = torchtitan's "16B" with SDPA + causal mask, the attention our
#                   `deepseek16b` workload runs (tt_peer_flavors.py); flex: the published "16B" flavor untouched
#                   (FlexAttention, per-document mask)
#   AC=selective AC_OPT=op
#                   activation checkpointing. torchtitan's published deepseek_v3_16b.toml (v0.2.2) uses selective
#                   with op-level selection ('op'), and the project's notes record its 16B running out of memory on
#                   this 4 x H200 shape without AC (108 GiB with it): so selective/op, its own choice. AC_OPT=2 gives
#                   every 2nd block, the choice of our train_configs/deepseek_16b.toml.
#   COMPILE=model,loss
#                   torch.compile components; "model,loss" is what our "ours compiled" variant compiles. The
#                   published toml compiles the loss only (COMPILE=loss); COMPILE=none turns compile off.
#   DATASETS        5.2.0 or 4.8.5 (both carried); default: 5.2.0 when the image's pyarrow is >= 24, else 4.8.5
#   CHECK_ONLY=0    1: install, make the assets, parse and check the config (check_config.py), no torchrun (CPU OK)
#   WHEELS=.wheels/peer  SITE=/tmp/site  WORK=/tmp/peer_torchtitan  OUT (if set: the log goes to $OUT/torchtitan.log)
#   TT_TIMEOUT=480  seconds before torchrun is stopped, so the summary still prints inside a 10-minute call
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
cd "$ROOT"

NGPU=${NGPU:-4}
STEPS=${STEPS:-50}
WARMUP=${WARMUP:-40}
ATTN=${ATTN:-sdpa}
LAYERS=${LAYERS:-27}
AC=${AC:-selective}
AC_OPT=${AC_OPT:-op}
COMPILE=${COMPILE:-model,loss}
CHECK_ONLY=${CHECK_ONLY:-0}
WHEELS=${WHEELS:-$ROOT/.wheels/peer}
SITE=${SITE:-/tmp/site}
WORK=${WORK:-/tmp/peer_torchtitan}
TT_TIMEOUT=${TT_TIMEOUT:-480}
LOG=${OUT:+$OUT/torchtitan.log}
LOG=${LOG:-$WORK/torchtitan.log}
mkdir -p "$WORK" "$(dirname "$LOG")"

# NVLink multicast stays off on the lent machines (NCCL, PyTorch symmetric memory, NVSHMEM).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# No network: the datasets/hub libraries must not try to reach the Hub.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HOME=${HF_HOME:-$WORK/hf_home}
# As torchtitan's own run_train.sh (PYTORCH_ALLOC_CONF) and our run_train.sh (PYTORCH_CUDA_ALLOC_CONF) set it.
export PYTORCH_ALLOC_CONF=${PYTORCH_ALLOC_CONF:-expandable_segments:True}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-$PYTORCH_ALLOC_CONF}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$WORK/inductor}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NGPU > 0 ? $(nproc) / NGPU : 1 ))}

# --- 1. wheels: torchtitan and what the image lacks (fetch_wheels.sh); datasets by the image's pyarrow -----------
py_ver=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
[ "$py_ver" = 3.12 ] || echo "warning: python $py_ver; the carried multiprocess wheel is for 3.12" >&2
vers=$(python3 - <<'PY'
import importlib.metadata as md
for n in ("torch", "triton", "pyarrow", "pandas", "fsspec", "huggingface-hub", "tokenizers", "tensorboard", "typing-extensions"):
    try:
        print(f"{n}={md.version(n)}", end=" ")
    except md.PackageNotFoundError:
        print(f"{n}=MISSING", end=" ")
PY
)
echo "image: python $py_ver $vers"
pa_major=$(python3 -c 'import importlib.metadata as m; print(m.version("pyarrow").split(".")[0])' 2>/dev/null || echo 0)
if [ "$pa_major" -ge 24 ]; then ds=5.2.0; else ds=4.8.5; fi   # datasets 5.2 requires pyarrow>=24, 4.8.5 >=21
ds=${DATASETS:-$ds}
wheels=()
for w in torchtitan-0.2.2 torchdata-0.11.0 tyro-1.0.17 docstring_parser-0.18.0 typeguard-4.6.1 "datasets-$ds" \
         dill-0.4.1 multiprocess-0.70.19; do
  f=$(ls "$WHEELS"/"$w"-*.whl 2>/dev/null | head -1) || true
  [ -n "$f" ] || { echo "missing $w wheel in $WHEELS (run fetch_wheels.sh where PyPI is reachable)" >&2; exit 2; }
  wheels+=("$f")
done
# Clear earlier copies of these packages in $SITE first (pip --target --upgrade leaves stale dist-info behind).
for d in torchtitan torchdata tyro docstring_parser typeguard datasets dill multiprocess _multiprocess; do
  rm -rf "${SITE:?}/$d" "$SITE"/"$d"-*.dist-info
done
python3 -m pip install -q --no-index --no-deps --upgrade --target "$SITE" "${wheels[@]}" 2>&1 \
  | grep -v -E "Running pip as the 'root' user|Target directory .* already exists" || true
export PYTHONPATH="$SITE:$HERE${PYTHONPATH:+:$PYTHONPATH}"
python3 -c 'import torchtitan, datasets, tyro, torchdata; print("installed: torchtitan", torchtitan.__version__, "datasets", datasets.__version__, "tyro", tyro.__version__)'

# --- 2. assets from our own data: tokenizer folder + JSON-lines dataset (make_assets.py) ----------------------------
ASSETS=$WORK/assets
python3 "$HERE/make_assets.py" "$ASSETS" --check

# --- 3. the torchtitan command line -------------------------------------------------------------------------------
case "$ATTN/$LAYERS" in
  sdpa/27) flavor=(--model.flavor 16B_sdpa --experimental.custom_import tt_peer_flavors) ;;
  sdpa/14) flavor=(--model.flavor 16B_sdpa_14l --experimental.custom_import tt_peer_flavors) ;;
  flex/27) flavor=(--model.flavor 16B) ;;
  *) echo "ATTN=$ATTN LAYERS=$LAYERS: use ATTN=sdpa or flex with LAYERS=27, or ATTN=sdpa with LAYERS=14" >&2; exit 2 ;;
esac
if [ "$COMPILE" = none ]; then compile=(--compile.no-enable); else compile=(--compile.enable --compile.components "$COMPILE"); fi
DUMP=$WORK/dump
rm -rf "$DUMP/tb"
TT_ARGS=(
  --job.dump_folder "$DUMP"
  --job.description "peer benchmark: torchtitan 0.2.2 deepseek_v3 16B, ${NGPU} GPUs"
  --model.name deepseek_v3 "${flavor[@]}"
  --model.hf_assets_path "$ASSETS/tokenizer"
  --training.dataset c4_test --training.dataset_path "$ASSETS/dataset"
  --training.local_batch_size 4 --training.seq_len 4096 --training.steps "$STEPS"
  --training.dtype float32 --training.mixed_precision_param bfloat16 --training.mixed_precision_reduce float32
  --optimizer.name AdamW --lr_scheduler.warmup_steps 2
  --parallelism.data_parallel_replicate_degree 1 --parallelism.data_parallel_shard_degree "$NGPU"
  --parallelism.expert_parallel_degree "$NGPU" --parallelism.tensor_parallel_degree 1
  --parallelism.pipeline_parallel_degree 1 --parallelism.context_parallel_degree 1
  --activation_checkpoint.mode "$AC" --activation_checkpoint.selective_ac_option "$AC_OPT"
  "${compile[@]}"
  --checkpoint.no-enable
  --metrics.log_freq 1 --metrics.disable_color_printing --metrics.enable_tensorboard
  --comm.init_timeout_seconds 900 --comm.train_timeout_seconds 600
  "$@"
)
python3 "$HERE/check_config.py" --world-size "$NGPU" -- "${TT_ARGS[@]}"
[ "$CHECK_ONLY" = 1 ] && { echo "CHECK_ONLY=1: not launching torchrun"; exit 0; }

# --- 4. run ----------------------------------------------------------------------------------------------------------
echo "log: $LOG"
set +e
timeout --signal=TERM --kill-after=30 "$TT_TIMEOUT" \
  torchrun --nproc_per_node="$NGPU" --rdzv_backend c10d --rdzv_endpoint=localhost:0 \
  --local-ranks-filter "${LOG_RANK:-0}" --role rank \
  -m torchtitan.train "${TT_ARGS[@]}" 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
set -e
echo "torchrun exit status: $rc"

# --- 5. what to read off ---------------------------------------------------------------------------------------------
echo "--- last metric lines ---"
grep -a -E "step: *[0-9]+ +loss:" "$LOG" | tail -n 5 || true
python3 "$HERE/summarize_log.py" "$LOG" --warmup "$WARMUP" --tokens-per-step $((4 * 4096)) --tb "$DUMP/tb" || true
exit "$rc"
