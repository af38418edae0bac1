#!/bin/bash
# Multi-node training with SLURM: one `accelerate launch` per node, rendezvous on the first node.
#
#   sbatch --nodes=2 launch/slurm.sh launch/zero3.yaml recipes/qwen2.5-7b/sft.yaml [key=value ...]
#
# The per-node process count comes from the accelerate config's num_processes (GPUs per node);
# the total is that times the number of nodes.
#SBATCH --job-name=align
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
set -euo pipefail

CONFIG=${1:?usage: sbatch launch/slurm.sh ACCELERATE_CONFIG RECIPE [key=value ...]}
RECIPE=${2:?usage: sbatch launch/slurm.sh ACCELERATE_CONFIG RECIPE [key=value ...]}
shift 2

PER_NODE=$(python -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['num_processes'])" "$CONFIG")
NODES=${SLURM_NNODES:-1}
MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-29500}

# srun starts one launcher per node; each learns its rank from SLURM_NODEID.
srun --kill-on-bad-exit=1 bash -c "accelerate launch \
  --config_file '$CONFIG' \
  --num_machines $NODES \
  --num_processes $((PER_NODE * NODES)) \
  --machine_rank \$SLURM_NODEID \
  --main_process_ip $MAIN_ADDR \
  --main_process_port $MAIN_PORT \
  --rdzv_backend c10d \
  -m align train '$RECIPE' $*"
