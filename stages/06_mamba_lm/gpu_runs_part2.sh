#!/usr/bin/env bash
# Stage 06, part 2 on the GPU: language modelling (Mamba vs Transformer), speed and memory, data parallel.
#
# Each job is ONE chunk of at most ~9 minutes (training jobs use --time-limit-min 8 and stop at a
# checkpoint). Exit status:
#   0   done (results written under stages/06_mamba_lm/results/)
#   75  the time limit stopped training at a checkpoint: run the SAME job again to resume
#       (under torchrun a stopped run shows as a non-zero torchrun status; rerun likewise)
# Anything else is an error.
#
# Usage (from the repository root, after the project is built with CUDA, e.g. part 1's setup):
#   bash stages/06_mamba_lm/gpu_runs_part2.sh <job>
#   bash stages/06_mamba_lm/gpu_runs_part2.sh list
#
# Data: the GPU machine reaches no network. On the lab machine, first
#   mkdir -p .data && cp ../shared/datasets/tinyshakespeare/input.txt .data/tinyshakespeare.txt \
#     && cp ../shared/datasets/aclImdb.tar.gz .data/
# and carry ".data" with each run (it is git-ignored; about 29 MB).
#
# Jobs (one H100 unless said otherwise):
#   bench-train        training tokens/s + peak memory, ~130M Mamba vs Transformer, L = 1K..64K, 64K tokens/step
#   bench-train-compile  the same with both models also through torch.compile (rows '<model>+compile')
#   bench-gen          generation tokens/s at batch 1/16/64 (prompt 2048, 256 new) + memory vs context length
#   ts-mamba           Tiny Shakespeare, char level, Mamba char-10m (9.7M params), 5000 steps x 64 x 256 tokens
#   ts-transformer     the same for the parameter-matched Transformer (same data order, tokens, recipe)
#   ts-sample          samples + tokens/s from both Tiny Shakespeare models (generate.py)
#   ts-mamba-550       Mamba char-10m, the 550-step schedule that meets <= 1.47 (window 1024, dropout 0.4, wd 0.5,
#                      lr 2e-3; SEED=0/1/2 gave best val 1.464 / 1.448 / 1.461 on an H200)
#   imdb-mamba         IMDb train reviews, BPE 8192, Mamba bpe-30m (31M params), 2000 steps x 32 x 512 tokens
#   imdb-transformer   the same for the parameter-matched Transformer
#   ddp-1gpu           (nvidia-h200-x2) char-10m Mamba, 400 steps, global batch 64, torchrun on 1 GPU
#   ddp-2gpu           (nvidia-h200-x2) the same on 2 GPUs: compare train_tokens_per_s in result.json
#   ddp130m-1gpu       (nvidia-h200-x2) ~130M Mamba, 60 steps x 32 x 2048 tokens (global), torchrun on 1 GPU
#   ddp130m-2gpu       (nvidia-h200-x2) the same global batch split over 2 GPUs (throughput at scale)
#
# Expected cost: not measured yet (no GPU during writing); the bench jobs should take a few minutes
# each, the training jobs one or more 8-minute chunks (rerun while the status is 75).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
STAGE=stages/06_mamba_lm
RES=$STAGE/results
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
TS=(--text .data/tinyshakespeare.txt --size char-10m --seq-len 256 --batch-size 64 --steps 5000 --lr 1e-3
    --warmup 200 --eval-every 250 --ckpt-every 250 --log-every 50 --out "$RES/lm/tinyshakespeare-char-10m")
IMDB=(--level bpe --text imdb --imdb .data/aclImdb.tar.gz --vocab-size 8192 --size bpe-30m --seq-len 512
      --batch-size 32 --steps 2000 --lr 1e-3 --warmup 200 --eval-every 200 --eval-windows 512 --ckpt-every 200
      --log-every 50 --out "$RES/lm/imdb-bpe-30m")
DDP=(--text .data/tinyshakespeare.txt --size char-10m --seq-len 256 --batch-size 64 --steps 400 --lr 1e-3
     --warmup 100 --eval-every 400 --eval-windows 64 --ckpt-every 400 --log-every 50)
DDP130=(--text .data/tinyshakespeare.txt --size 130m --seq-len 2048 --batch-size 32 --steps 60 --lr 6e-4
        --warmup 10 --eval-every 60 --eval-windows 16 --ckpt-every 60 --log-every 10)
# TIME_LIMIT_MIN / THREADS: override when several jobs share one GPU.
TRAIN=(--device cuda --precision auto --time-limit-min "${TIME_LIMIT_MIN:-8}" --threads "${THREADS:-4}" --no-progress)

need() { [ -e "$1" ] || { echo "missing $1: copy the data into .data/ and carry it (see the header)" >&2; exit 2; }; }

job=${1:-list}
case "$job" in
  bench-train) exec "$PY" "$STAGE/bench_speed.py" --sections train --device cuda --out "$RES/bench" ;;
  bench-train-compile) exec "$PY" "$STAGE/bench_speed.py" --sections train --compile --device cuda --out "$RES/bench" ;;
  bench-gen)   exec "$PY" "$STAGE/bench_speed.py" --sections gen memory --device cuda --out "$RES/bench" ;;
  ts-mamba|ts-transformer)
    need .data/tinyshakespeare.txt
    exec "$PY" "$STAGE/train_lm.py" --model "${job#ts-}" "${TS[@]}" "${TRAIN[@]}" ;;
  ts-mamba-550)
    need .data/tinyshakespeare.txt
    exec "$PY" "$STAGE/train_lm.py" --model mamba --text .data/tinyshakespeare.txt --size char-10m --seq-len 1024 \
      --batch-size 16 --steps 550 --lr 2e-3 --warmup 80 --dropout 0.4 --weight-decay 0.5 --eval-every 25 \
      --ckpt-every 100000 --log-every 50 --seed "${SEED:-1}" --out "$RES/lm/tinyshakespeare-schedule/E_1024_s550_d04_seed${SEED:-1}" \
      "${TRAIN[@]}" ;;
  ts-sample)
    for m in mamba transformer; do
      "$PY" "$STAGE/generate.py" --model-dir "$RES/lm/tinyshakespeare-char-10m/$m/model" --prompt "ROMEO:" \
        --max-new-tokens 500 --temperature 0.8 --top-k 40 --device cuda --out "$RES/lm/tinyshakespeare-char-10m/$m/sample.json"
    done ;;
  imdb-mamba|imdb-transformer)
    need .data/aclImdb.tar.gz
    exec "$PY" "$STAGE/train_lm.py" --model "${job#imdb-}" "${IMDB[@]}" "${TRAIN[@]}" ;;
  ddp-1gpu|ddp-2gpu)
    need .data/tinyshakespeare.txt
    n=${job:4:1}
    exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$n" "$STAGE/train_lm.py" --model mamba \
      "${DDP[@]}" --out "$RES/lm/ddp-${n}gpu" "${TRAIN[@]}" ;;
  ddp130m-1gpu|ddp130m-2gpu)
    need .data/tinyshakespeare.txt
    n=${job:7:1}
    exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$n" "$STAGE/train_lm.py" --model mamba \
      "${DDP130[@]}" --out "$RES/lm/ddp130m-${n}gpu" "${TRAIN[@]}" ;;
  list)
    sed -n '/^# Jobs/,/^#   ddp130m-2gpu/p' "$0" | sed 's/^# \{0,1\}//' ;;
  *) echo "unknown job: $job (try: bash $0 list)" >&2; exit 2 ;;
esac
