#!/usr/bin/env bash
# Launch `python -m pure.train` on several nodes with torchrun (one process per GPU).
#
# Run the SAME command on every node, with NODE_RANK set to 0..NNODES-1 and MASTER_ADDR naming node 0:
#
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 recipes/train/launch_multinode.sh \
#       recipes/train/pure_7b_zero3.yaml --set data.config=/shared/data/pure_train.yaml
#
# Under SLURM the variables come from the allocation (one task per node):
#
#   srun --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 recipes/train/launch_multinode.sh RECIPE.yaml
#
# With DeepSpeed's own launcher instead (passwordless ssh to every host listed in a hostfile of
# "hostname slots=8" lines), run once from node 0:
#
#   deepspeed --hostfile hostfile --module pure.train RECIPE.yaml --set ...
#
# Requirements: the run folder (output_dir) and the shards on a file system every node sees (checkpoints
# are written by all ranks and renamed once complete); the same code, environment and recipe everywhere.
# Resume after an interruption by launching again with `--resume` appended (same number of GPUs).
# The global batch (train.global_batch_size) stays the same on any number of GPUs: gradient accumulation
# makes up the difference, so the learning-rate schedule and the data order do not change.
set -euo pipefail

NNODES=${NNODES:-${SLURM_NNODES:-1}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi --list-gpus 2>/dev/null | wc -l)}
if [[ -z "${MASTER_ADDR:-}" && -n "${SLURM_JOB_NODELIST:-}" ]]; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python}

if [[ $# -lt 1 ]]; then
    echo "usage: [NNODES=N NODE_RANK=i MASTER_ADDR=host] $0 RECIPE.yaml [--set key=value ...] [--resume]" >&2
    exit 2
fi
if [[ "$GPUS_PER_NODE" -lt 1 ]]; then
    echo "error: no GPU found (set GPUS_PER_NODE)" >&2
    exit 2
fi

echo "node $NODE_RANK of $NNODES, $GPUS_PER_NODE GPUs, rendezvous $MASTER_ADDR:$MASTER_PORT" >&2
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" \
    --node_rank "$NODE_RANK" \
    --nproc_per_node "$GPUS_PER_NODE" \
    --master_addr "$MASTER_ADDR" \
    --master_port "$MASTER_PORT" \
    -m pure.train "$@"
