#!/usr/bin/env bash
# Stage 05 GPU runs (written for one H100): the IMDb table, the kernel benchmark, the S4D char-LM rung.
#
# Each call runs ONE job for at most ~8 minutes of training (--time-limit 480), then evaluates on the
# full test split if training is complete. Exit status:
#   0   done: stages/05_s4/results/<name>.json and .png written (and copied to $OUT when it is set)
#   3   time limit reached, checkpoint saved under runs/05_s4/<name>/: run the SAME line again to resume
# Anything else is an error (2: the data was not found).
#
# Usage (from the repository root):
#   mkdir -p .data && cp ../shared/datasets/aclImdb.tar.gz .data/     # once; .data/ is git-ignored: carry it
#   bash stages/05_s4/gpu_runs.sh <job>
#   bash stages/05_s4/gpu_runs.sh list
#
# Jobs (one model per job so each fits a 10-minute slot; rerun a job while it exits 3):
#   bpe-mamba  bpe-s4d  bpe-s4  bpe-transformer     subword (BPE 8192 trained on train), max 1024 tokens, ~6M params
#   byte-s4d   byte-s4  byte-mamba                  bytes, length 4096 (the LRA text setting), ~1M params
#   byte-transformer-causal                        bytes, the Transformer with causal attention (flash path), ~1M params
#   bpe-mamba-best                                 bpe-mamba with dropout 0.2, weight EMA 0.999, scored at the best val AUC
#   byte-s4d-lr5e3                                 byte-s4d at lr 5e-3 (its 2e-3 run was still improving), best val AUC
#   bpe-mamba-9ep  bpe-s4d-7ep                      9 / 7 epochs instead of 5 (both were still improving), best val AUC
#   bpe-bimamba                                     Mamba with a second block reading backwards (--bidirectional), best val AUC
#   byte-bimamba                                    the same on bytes (4096)
#   bpe-bimamba-best                                BiMamba with dropout 0.2, weight EMA 0.999, best val AUC (H200: 90.3%, AUC 0.964)
#   bpe-s4d-best                                    S4D with dropout 0.2, weight EMA 0.999, best val AUC
#   byte-s4d-ssmlr  byte-s4-ssmlr                   bytes, lr 5e-3 with --ssm-lr 1e-3 (the S4 convention), 10 epochs, best val AUC
#   byte-s4d-ssmlr-14ep                             byte-s4d-ssmlr for 14 epochs (the 10-epoch run's val AUC was still rising)
#   bpe-s4d-ssmlr                                   BPE S4D at lr 2e-3 with --ssm-lr 1e-3, best val AUC
#   bpe-s4d-ssmlr-seed1  bpe-s4-ssmlr               the same with seed 1; S4 with the same recipe
#   bench                                           kernel generation time / memory vs L (up to 131072)
#   charlm                                          S4D character LM (the ladder's corpus), ~2.7M params
#
# Priority when device time is short: bpe-mamba, bpe-s4d, byte-s4d, bpe-s4, bench, the rest.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
STAGE=stages/05_s4
export SSMLAB_IMDB=${SSMLAB_IMDB:-.data/aclImdb.tar.gz}
# TIME_LIMIT / THREADS: override when several jobs share one GPU (e.g. THREADS=2).
COMMON=(--device cuda --time-limit "${TIME_LIMIT:-480}" --threads "${THREADS:-4}" --no-progress)

copy_out() {  # copy the finished job's small results to $OUT (the device tool brings them back)
  if [[ -n "${OUT:-}" ]]; then cp "$@" "$OUT"/ 2>/dev/null || true; fi
}

run_imdb() {  # $1 tokenizer, $2 model, rest: extra flags
  local tok=$1 model=$2; shift 2
  local name="${NAME:-imdb_${model}_${tok}}"
  if [[ ! -e "$SSMLAB_IMDB" ]]; then
    echo "no IMDb archive at $SSMLAB_IMDB: copy ../shared/datasets/aclImdb.tar.gz to .data/ (and carry .data)" >&2
    exit 2
  fi
  set +e
  "$PY" "$STAGE/train_imdb.py" --model "$model" --tokenizer "$tok" --name "$name" "${COMMON[@]}" "$@"
  local rc=$?
  set -e
  if [[ $rc -eq 0 ]]; then copy_out "$STAGE/results/$name.json" "$STAGE/results/$name.png"; fi
  exit $rc
}

job=${1:-list}
case "$job" in
  bpe-mamba|bpe-s4d|bpe-s4|bpe-transformer) run_imdb bpe "${job#bpe-}" ;;
  byte-s4d|byte-s4|byte-mamba)              run_imdb byte "${job#byte-}" ;;
  byte-transformer-causal)                  NAME=imdb_transformer_causal_byte run_imdb byte transformer --causal ;;
  bpe-mamba-best)   NAME=imdb_mamba_bpe_best run_imdb bpe mamba --dropout 0.2 --ema-decay 0.999 --ema-start-step 200 --keep-best auc ;;
  byte-s4d-lr5e3)   NAME=imdb_s4d_byte_lr5e3 run_imdb byte s4d --lr 5e-3 --keep-best auc ;;
  bpe-mamba-9ep)    NAME=imdb_mamba_bpe_9ep run_imdb bpe mamba --epochs 9 --keep-best auc ;;
  bpe-bimamba)      NAME=imdb_bimamba_bpe run_imdb bpe mamba --bidirectional --keep-best auc ;;
  byte-bimamba)     NAME=imdb_bimamba_byte run_imdb byte mamba --bidirectional --epochs 6 --keep-best auc ;;
  bpe-bimamba-best) NAME=imdb_bimamba_bpe_best run_imdb bpe mamba --bidirectional --dropout 0.2 --ema-decay 0.999 --ema-start-step 200 --keep-best auc ;;
  bpe-s4d-best)     NAME=imdb_s4d_bpe_best run_imdb bpe s4d --dropout 0.2 --ema-decay 0.999 --ema-start-step 200 --keep-best auc ;;
  byte-s4d-ssmlr)   NAME=imdb_s4d_byte_ssmlr_10ep run_imdb byte s4d --lr 5e-3 --ssm-lr 1e-3 --epochs 10 --keep-best auc ;;
  byte-s4-ssmlr)    NAME=imdb_s4_byte_ssmlr_10ep run_imdb byte s4 --lr 5e-3 --ssm-lr 1e-3 --epochs 10 --keep-best auc ;;
  byte-s4d-ssmlr-14ep) NAME=imdb_s4d_byte_ssmlr_14ep run_imdb byte s4d --lr 5e-3 --ssm-lr 1e-3 --epochs 14 --keep-best auc ;;
  bpe-s4d-ssmlr)    NAME=imdb_s4d_bpe_ssmlr run_imdb bpe s4d --lr 2e-3 --ssm-lr 1e-3 --keep-best auc ;;
  bpe-s4d-ssmlr-seed1) NAME=imdb_s4d_bpe_ssmlr_seed1 run_imdb bpe s4d --lr 2e-3 --ssm-lr 1e-3 --keep-best auc --seed 1 ;;
  bpe-s4-ssmlr)     NAME=imdb_s4_bpe_ssmlr run_imdb bpe s4 --lr 2e-3 --ssm-lr 1e-3 --keep-best auc ;;
  bpe-s4d-7ep)      NAME=imdb_s4d_bpe_7ep run_imdb bpe s4d --epochs 7 --keep-best auc ;;
  bench)
    "$PY" "$STAGE/bench_kernel.py" --device cuda --H 256
    copy_out "$STAGE/results/bench_kernel_cuda.json" "$STAGE/results/bench_kernel_cuda.png" ;;
  charlm)
    "$PY" "$STAGE/train_charlm.py" --device cuda --d-model 256 --n-layers 6 --steps 3000 --batch-size 64 \
      --eval-every 500 --eval-chars 0 --name charlm_s4d_gpu --no-progress
    copy_out "$STAGE/results/charlm_s4d_gpu.json" "$STAGE/results/charlm_s4d_gpu.png" ;;
  list)
    sed -n '/^# Jobs/,/^#   charlm/p' "$0" | sed 's/^# \{0,1\}//' ;;
  *) echo "unknown job: $job (try: bash $0 list)" >&2; exit 2 ;;
esac
