#!/usr/bin/env bash
# Multi-node training under SLURM: one torchrun per node, rendezvous (c10d) on the first node of the allocation,
# HSDP by default: replicas across nodes, FSDP shards over the GPUs of a node.
#
#   sbatch --nodes 4 multinode_slurm.sh --training.steps 1000            # from the repository root
#   CONFIG_FILE=train_configs/deepseek_16b.toml sbatch --nodes 8 multinode_slurm.sh \
#       --parallelism.expert_parallel_degree 8
#
# Environment: CONFIG_FILE (default train_configs/debug_model.toml), NGPU (GPUs per node, default: those SLURM
# gives the node, else 8), MASTER_PORT (default 29500), LOG_RANK (default 0). Every argument is a config
# override and comes after the HSDP defaults (--parallelism.data_parallel_replicate_degree = nodes,
# --parallelism.data_parallel_shard_degree = GPUs per node), so it can change them.
#
# Without SLURM, start one node by hand (this is how tests/distributed/test_launchers.py simulates 2 nodes):
#   TITAN_PER_NODE=1 NNODES=2 NODE_RANK=0 NGPU=2 MASTER_ADDR=host0 MASTER_PORT=29500 ./multinode_slurm.sh ...
#   TITAN_PER_NODE=1 NNODES=2 NODE_RANK=1 NGPU=2 MASTER_ADDR=host0 MASTER_PORT=29500 ./multinode_slurm.sh ...
#
#SBATCH --job-name=titan_dsv3
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

REPO=${TITAN_DSV3_DIR:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")" && pwd)}}
cd "$REPO"
CONFIG_FILE=${CONFIG_FILE:-"./train_configs/debug_model.toml"}
NNODES=${NNODES:-${SLURM_NNODES:-1}}
NGPU=${NGPU:-${SLURM_GPUS_ON_NODE:-8}}
MASTER_PORT=${MASTER_PORT:-29500}
LOG_RANK=${LOG_RANK:-0}

overrides=(
  --parallelism.data_parallel_replicate_degree "$NNODES"
  --parallelism.data_parallel_shard_degree "$NGPU"
)
has_config=0
for a in "$@"; do
  case "$a" in --job.config_file|--job.config_file=*) has_config=1 ;; esac
done
[ "$has_config" = 1 ] || overrides=(--job.config_file "$CONFIG_FILE" "${overrides[@]}")

if [ "${TITAN_PER_NODE:-0}" != 1 ]; then
  # The batch step (first node): check the configuration once, then start one launcher per node.
  if [ -z "${SLURM_JOB_NODELIST:-}" ]; then
    echo "multinode_slurm.sh: submit with sbatch, or set TITAN_PER_NODE=1 (see the header) to start a node by hand" >&2
    exit 2
  fi
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  export MASTER_ADDR MASTER_PORT NNODES NGPU CONFIG_FILE LOG_RANK
  python3 -m titan_dsv3.config --world-size $((NNODES * NGPU)) "${overrides[@]}" "$@" || exit $?
  exec srun --nodes "$NNODES" --ntasks-per-node 1 --kill-on-bad-exit=1 \
    env TITAN_PER_NODE=1 TITAN_DSV3_DIR="$REPO" bash "$REPO/multinode_slurm.sh" "$@"
fi

# One node: torchrun starts NGPU ranks here; all nodes meet at MASTER_ADDR:MASTER_PORT. Ranks are numbered node
# by node, so the replicate dimension of the mesh (outermost after pp) spans nodes and dp_shard stays inside one.
: "${MASTER_ADDR:?set MASTER_ADDR to the address of the first node}"
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NGPU > 0 ? $(nproc) / NGPU : 1 ))}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/titan_dsv3_inductor}
exec torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NGPU" \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "${SLURM_JOB_ID:-titan_dsv3}" \
  --local-ranks-filter "$LOG_RANK" \
  -m titan_dsv3.train "${overrides[@]}" "$@"
