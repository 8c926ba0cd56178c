#!/bin/bash
# The multi-GPU runs the scale-out and parallelism issues ask for, as named sections, each under a time limit,
# logs in $OUT (default /tmp/scaleout), a table of the printed figures at the end.
#
#   NGPU=4 bash benchmarks/scaleout.sh weak            # about 5 min on 4 x H200 (estimate)
#   NGPU=4 bash benchmarks/scaleout.sh 16b             # three runs, about 6-7 min (2 x H200: 2 min a run)
#   NGPU=4 bash benchmarks/scaleout.sh pp cp           # about 6 min
#   NGPU=2 bash benchmarks/scaleout.sh weak            # the same sections on fewer GPUs
#   NGPU=2 bash benchmarks/scaleout.sh tests kernels   # GPU tests and kernel benchmarks, about 8 min
#   WORKLOAD_SMALL=tiny NGPU=2 bash benchmarks/scaleout.sh weak   # the plumbing on CPU (gloo), seconds
#   EXTRA='--compile.moe_one_graph=true' ...   # overrides added to every run
#   WARMUP=150 WARMUP_BIAS_SPEED=0.01 ...     # warm-up steps of every run, and the expert bias speed during them
#                                            (bench_train.py --warmup-bias-speed: time a balanced steady state)
#   ONLY=noac ...        # run only the runs whose names match this regular expression
#   PROFILE=1 ...        # also profile 2 steps of each run: $OUT/<run>.ops.txt (rank 0's and the last rank's
#                        op tables) and $OUT/<run>.traces.tar (their gzipped traces)
#
# Sections:
#   weak  bench6 work per GPU (4 x 4096 tokens) on 1, 2, ..., NGPU GPUs with FSDP + EP (EP = GPUs): weak scaling
#   16b   the 16B shape (27 layers) with FSDP NGPU + EP NGPU, 4 x 4096 a GPU, AC every 2nd block, with and without
#         the experts' FSDP unit (parallelism.expert_1rank_fsdp_unit); on 4 GPUs or more also without AC
#   16b14 the 16B shape cut to 14 layers, FSDP NGPU + EP NGPU, 4 x 4096 a GPU: without AC (with and without the
#         experts' FSDP unit) and with AC every 2nd block: the per-layer work of 16b in half the memory (2 GPUs
#         hold it without AC, as 4 hold the full depth; beside torchtitan: LAYERS=14 AC=none NGPU=2 bash
#         benchmarks/peer_torchtitan/run.sh)
#   pp    the 16B shape with PP 2 x (FSDP NGPU/2 + EP NGPU/2), 1F1B, 8 micro-batches of 1 x 4096
#   cp    the 16B shape at 64K context with CP NGPU (+ EP NGPU), one sequence, full AC
#   tests    python3 -m pytest tests/gpu (kernels on one GPU, the NCCL layouts on two)
#   kernels  benchmarks/bench_kernels.py --only mla, then --only fp8, with --profile (one GPU)
# Each bench_train run prints tok/s/GPU, MFU and the largest rank's peak memory.
set -u
NGPU=${NGPU:-4}
OUT=${OUT:-/tmp/scaleout}
SMALL=${WORKLOAD_SMALL:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
cd "$(dirname "$0")/.."

# compiled, bf16 Adam moments, fp32 masters under FSDP: the settings of the 2 x H200 figures in RESULTS.md
BASE="--compile.enable=true --optimizer.state_dtype=bfloat16"
[ -n "$SMALL" ] && BASE=""

bench() {  # bench NAME NPROC LIMIT_S WORKLOAD STEPS WARMUP OVERRIDES...
    local name=$1 nproc=$2 limit=$3 workload=$4 steps=$5 warmup=$6
    shift 6
    [[ -n "${ONLY:-}" && ! $name =~ $ONLY ]] && return
    local cmd=(benchmarks/bench_train.py --workload "${SMALL:-$workload}" --steps "$steps" --warmup "${WARMUP:-$warmup}"
        --no-eager --variant "$name=$BASE $* ${EXTRA:-}")
    [ -n "${WARMUP_BIAS_SPEED:-}" ] && cmd+=(--warmup-bias-speed "$WARMUP_BIAS_SPEED")
    [ "${PROFILE:-0}" = 1 ] && cmd+=(--profile "/tmp/scaleout_prof/$name") && rm -rf "/tmp/scaleout_prof/$name"
    echo "--- $name: $nproc process(es), limit ${limit}s"
    if [ "$nproc" = 1 ]; then
        CUDA_VISIBLE_DEVICES=0 timeout "$limit" python3 "${cmd[@]}" >"$OUT/$name.log" 2>&1
    else
        timeout "$limit" torchrun --nproc_per_node "$nproc" --rdzv_backend=c10d --rdzv_endpoint=localhost:0 \
            "${cmd[@]}" >"$OUT/$name.log" 2>&1
    fi
    echo "    exit $? ($(grep -c . "$OUT/$name.log") log lines)"
    local prof r traces=()
    [ "${PROFILE:-0}" = 1 ] || return 0  # (an earlier profiled run of the same name leaves its files in /tmp)
    # rank 0's and the last rank's tables (one file) and gzipped traces (one tar): a rank that waits in the expert
    # all-to-all shows the other was late. Two files a profiled run, as a lent machine returns at most 8 in all.
    for r in 0 $((nproc - 1)); do
        prof=$(find "/tmp/scaleout_prof/$name" -path "*rank$r/*" -name ops.txt 2>/dev/null | head -1)
        if [ -n "$prof" ]; then
            { echo "=== rank $r"; cat "$prof"; } >>"$OUT/$name.ops.txt"
            gzip -c "$(dirname "$prof")/trace.json" >"/tmp/scaleout_prof/$name.rank$r.trace.json.gz"
            traces+=("$name.rank$r.trace.json.gz")
        fi
        [ "$nproc" = 1 ] && break
    done
    [ ${#traces[@]} -gt 0 ] && tar -C /tmp/scaleout_prof -cf "$OUT/$name.traces.tar" "${traces[@]}"
}

for section in "$@"; do
    case $section in
    # weak and 16b time steps 41-60: aux-loss-free balancing needs the first ones before the EP ranks carry even
    # loads (bench6 on 2 x H200: 84% weak scaling after 3 warm-up steps, 91.5% after 40; RESULTS.md)
    weak)
        bench weak_1gpu 1 180 bench6 20 40
        n=2
        while [ "$n" -le "$NGPU" ]; do
            bench "weak_${n}gpu" "$n" 240 bench6 20 40 --parallelism.expert_parallel_degree=$n
            n=$((n * 2))
        done
        ;;
    16b)
        bench "16b_fsdp${NGPU}_ep${NGPU}" "$NGPU" 360 deepseek16b 10 40 \
            --parallelism.expert_parallel_degree=$NGPU --training.local_batch_size=4 \
            --activation_checkpoint.mode=selective --activation_checkpoint.selective_option=2
        bench "16b_fsdp${NGPU}_ep${NGPU}_nounit" "$NGPU" 360 deepseek16b 10 40 \
            --parallelism.expert_parallel_degree=$NGPU --training.local_batch_size=4 \
            --activation_checkpoint.mode=selective --activation_checkpoint.selective_option=2 \
            --parallelism.expert_1rank_fsdp_unit=false
        # 4 GPUs hold the full depth without AC (tools/memory.py: 108 GiB allocated; 2 GPUs: 144)
        [ "$NGPU" -ge 4 ] && bench "16b_fsdp${NGPU}_ep${NGPU}_noac_nounit" "$NGPU" 360 deepseek16b 10 40 \
            --parallelism.expert_parallel_degree=$NGPU --training.local_batch_size=4 \
            --activation_checkpoint.mode=none --parallelism.expert_1rank_fsdp_unit=false
        ;;
    16b14)
        bench "16b14_fsdp${NGPU}_ep${NGPU}_noac" "$NGPU" 300 deepseek16b_14l 10 40 \
            --parallelism.expert_parallel_degree=$NGPU --training.local_batch_size=4 --activation_checkpoint.mode=none
        bench "16b14_fsdp${NGPU}_ep${NGPU}_noac_nounit" "$NGPU" 300 deepseek16b_14l 10 40 \
            --parallelism.expert_parallel_degree=$NGPU --training.local_batch_size=4 --activation_checkpoint.mode=none \
            --parallelism.expert_1rank_fsdp_unit=false
        bench "16b14_fsdp${NGPU}_ep${NGPU}_ac2" "$NGPU" 300 deepseek16b_14l 10 40 \
            --parallelism.expert_parallel_degree=$NGPU --training.local_batch_size=4 \
            --activation_checkpoint.mode=selective --activation_checkpoint.selective_option=2
        ;;
    pp)
        h=$((NGPU / 2))
        bench "16b_pp2_ep${h}" "$NGPU" 300 deepseek16b 10 3 \
            --parallelism.pipeline_parallel_degree=2 --parallelism.expert_parallel_degree=$h \
            --parallelism.pipeline_parallel_schedule=1F1B --parallelism.pipeline_parallel_microbatches=8 \
            --training.local_batch_size=8 --activation_checkpoint.mode=selective \
            --activation_checkpoint.selective_option=2
        ;;
    cp)
        # the sequence-wise balance loss cannot see a whole sequence under CP: aux-loss-free balancing instead
        bench "16b_64k_cp${NGPU}" "$NGPU" 300 deepseek16b_64k 6 3 \
            --parallelism.data_parallel_shard_degree=1 --parallelism.context_parallel_degree=$NGPU \
            --parallelism.expert_parallel_degree=$NGPU --activation_checkpoint.mode=full \
            --moe.balance_loss_alpha=0 --moe.bias_update_speed=0.001
        ;;
    tests)
        echo "--- tests/gpu, limit 480s"
        timeout 480 python3 -m pytest -q -p no:cacheprovider tests/gpu >"$OUT/gpu_tests.log" 2>&1
        echo "    exit $?: $(tail -1 "$OUT/gpu_tests.log")"
        ;;
    kernels)
        for k in mla fp8; do
            echo "--- bench_kernels --only $k, limit 240s"
            CUDA_VISIBLE_DEVICES=0 timeout 240 python3 benchmarks/bench_kernels.py --only $k --profile \
                --json "$OUT/kernels_$k.json" >"$OUT/kernels_$k.txt" 2>&1
            echo "    exit $?"
        done
        ;;
    *)
        echo "unknown section $section (weak, 16b, 16b14, pp, cp, tests, kernels)" >&2
        exit 2
        ;;
    esac
done

echo
echo "run                     tok/s/GPU   ms/step    MFU%   MFUc%  peak GiB  1st step s    loss"
for f in "$OUT"/weak_*.log "$OUT"/16b*_*.log; do
    [ -e "$f" ] || continue
    row=$(grep -E "^(weak|16b|16b14)_[A-Za-z0-9_]+ +[0-9,]+ " "$f" | tail -1)  # the table row, not the profile lines
    [ -n "$row" ] && echo "$row" || echo "$(basename "$f" .log): no figures (see $f)"
done
