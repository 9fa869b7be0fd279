#!/usr/bin/env bash
# Full-size synthetic-task runs of stage 06 on one GPU (written for an H100).
#
# Each call runs ONE chunk of at most ~7 minutes of training (--time-limit-min 7),
# then evaluates if training is complete. Exit status:
#   0   done: results/<task>_<preset>.json and .png written (merged with other models' entries)
#   75  time limit reached, checkpoint saved under runs/06_mamba_lm/: run the SAME line again to resume
# Anything else is an error.
#
# Usage:  bash stages/06_mamba_lm/gpu_runs.sh <job>        (from the repository root)
#         bash stages/06_mamba_lm/gpu_runs.sh list
#
# Jobs (one model per job so each fits a 10-minute slot; rerun a job while it exits 75):
#   sc-paper-mamba  sc-paper-s4d  sc-paper-s4d-nogate     selective copying, paper: V=16, 16 tokens, context 4096
#   sc-paper-mamba-curriculum                             the same Mamba with a length curriculum, 64 -> 256 -> 1024 -> 4096
#                                                         (CURRICULUM below); results/selective_copying_paper_curriculum.json
#   sc-study-mamba  sc-study-s4d  sc-study-s4d-nogate     selective copying, reference study: V=30, L=64 -> 128, 10k examples
#   ih-paper-mamba  ih-paper-s4d  ih-paper-transformer     induction heads, paper: V=16, train 256, test 2^6 .. 2^20
#
# Measured cost on an H100 alone: sc-paper-mamba (17,000 steps of 64 x 4112 tokens) 365 s of training,
# so two chunks of 7 minutes with the checkpoint resume; the curriculum job 249 s (README); the others a few
# minutes each.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
STAGE=stages/06_mamba_lm
COMMON=(--device cuda --precision auto --time-limit-min 7 --threads 4 --no-progress)
# Length curriculum (context:steps): the model learns the copying at short contexts, then the paper's 4096.
# Measured on the H100 alone (2026-12-06, the default below, the preset's lr 2e-3): 249 s of training for the
# 17,000 steps, 100.00% at 4096 (the plain job, same steps and lr: 365 s, 99.93%). Short steps are bound by
# per-step overhead, so they are only ~1.5x cheaper than steps at 4096. Override with CURRICULUM=... (a new
# curriculum needs a new --tag or an empty runs/ folder: a resume checks that the checkpoint's curriculum is
# the same).
CURRICULUM=${CURRICULUM:-64:6000,256:4000,1024:3000,4096:4000}

job=${1:-list}
case "$job" in
  sc-paper-mamba-curriculum)
    exec "$PY" "$STAGE/selective_copying.py" --preset paper --models mamba --curriculum "$CURRICULUM" --tag curriculum "${COMMON[@]}" ;;
  sc-paper-*)  exec "$PY" "$STAGE/selective_copying.py" --preset paper --models "${job#sc-paper-}" "${COMMON[@]}" ;;
  sc-study-*)  exec "$PY" "$STAGE/selective_copying.py" --preset study --models "${job#sc-study-}" "${COMMON[@]}" ;;
  ih-paper-*)  exec "$PY" "$STAGE/induction_heads.py" --preset paper --models "${job#ih-paper-}" "${COMMON[@]}" ;;
  list)
    sed -n '/^# Jobs/,/^#   ih-paper/p' "$0" | sed 's/^# \{0,1\}//'
    ;;
  *) echo "unknown job: $job (try: bash $0 list)" >&2; exit 2 ;;
esac
