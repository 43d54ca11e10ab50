#!/bin/bash
# Run on EACH node, from the repository root (MASTER_ADDR = node 0's address, reachable from the others):
#   NNODES=2 NODE_RANK=0 NPROC_PER_NODE=8 MASTER_ADDR=10.0.0.1 bash recipes/launch/torchrun_multi_node.sh RECIPE [key.sub=value ...]   # node 0
#   NNODES=2 NODE_RANK=1 NPROC_PER_NODE=8 MASTER_ADDR=10.0.0.1 bash recipes/launch/torchrun_multi_node.sh RECIPE [key.sub=value ...]   # node 1
# The same job as slurm_multi_node.sbatch without accelerate's launcher: torchrun starts the processes and
# Accelerate reads RANK/WORLD_SIZE/LOCAL_RANK from the environment. Mixed precision then comes from the recipe
# (train.mixed_precision: bf16), since no accelerate config file is read. output_dir must be on a shared filesystem.
set -euo pipefail

RECIPE=${1:?usage: torchrun_multi_node.sh RECIPE [key.sub=value ...]}
shift
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "${NPROC_PER_NODE:-8}" \
  --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
  -m hftoolkit train "$RECIPE" train.resume_from_checkpoint=latest "$@"
