#!/usr/bin/env bash
# Generate and score (WER) every checkpoint of a training run that has no generations yet.
#
#   snippets/generation_launcher.sh RUN_DIR [EPOCH] [-- scripts/generate.py overrides ...]
#
#   snippets/generation_launcher.sh runs/sft-1b                          # this machine, every checkpoint
#   snippets/generation_launcher.sh runs/sft-1b 2                        # only checkpoints of epoch 2
#   snippets/generation_launcher.sh runs/sft-1b -- gen.split=validation sampling_params.max_tokens=128
#   srun -n1 --gpus=1 --cpus-per-task=8 --time=02:00:00 snippets/generation_launcher.sh runs/sft-1b
#   sbatch -n1 --gpus=1 --time=04:00:00 --wrap "snippets/generation_launcher.sh runs/sft-1b"
#
# Each checkpoint <RUN_DIR>/checkpoints/epoch_E/global_step_S is passed to scripts/generate.py as
# `model=...` (oldest first), so the run's own data preset, test split and vLLM backend are used unless
# overridden after `--`. Outputs land in <RUN_DIR>/generations/epoch_E/global_step_S/<dataset>/<split>/.
# A checkpoint whose output directory for that dataset/split already exists is skipped (generate.py
# exits with code 3 before loading anything), so the launcher can be re-run after each save, e.g. from
# a cron job or at the end of a training job, and a different split is generated when asked for.
# A failing checkpoint does not stop the others; the exit code is 1 if any failed.
# SSI_PYTHON selects the interpreter (default: the repository's .venv/bin/python, else python).
set -euo pipefail

usage() { echo "usage: $0 RUN_DIR [EPOCH] [-- generate.py overrides...]" >&2; exit 2; }
[ $# -ge 1 ] || usage
RUN_DIR=${1%/}
shift
EPOCH=
if [ $# -ge 1 ] && [ "$1" != "--" ]; then
  EPOCH=$1
  shift
  [[ $EPOCH =~ ^[0-9]+$ ]] || { echo "error: EPOCH must be a non-negative integer, got '$EPOCH'" >&2; exit 2; }
fi
if [ $# -ge 1 ]; then
  [ "$1" = "--" ] || usage
  shift
fi
[ -f "$RUN_DIR/torchtune_config.yaml" ] || {
  echo "error: $RUN_DIR is not a training run directory (no torchtune_config.yaml)" >&2; exit 2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${SSI_PYTHON:-$([ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python)}

# Complete checkpoints only: partial writes live under hidden names that this glob does not match.
shopt -s nullglob
EPOCH_GLOB=epoch_${EPOCH:-*}
mapfile -t CHECKPOINTS < <(
  for dir in "$RUN_DIR"/checkpoints/$EPOCH_GLOB/global_step_*; do
    [ -f "$dir/ssi.json" ] && echo "${dir##*/global_step_} $dir"
  done | sort -n | cut -d' ' -f2-
)
if [ ${#CHECKPOINTS[@]} -eq 0 ]; then
  echo "no checkpoints under $RUN_DIR/checkpoints${EPOCH:+ for epoch $EPOCH}" >&2
  exit 0
fi

generated=0 skipped=0 failed=0
for ckpt in "${CHECKPOINTS[@]}"; do
  echo "=== $ckpt"
  rc=0
  "$PYTHON" "$REPO/scripts/generate.py" "model=$ckpt" "$@" || rc=$?
  case $rc in
    0) generated=$((generated + 1)) ;;
    3) skipped=$((skipped + 1)); echo "already generated: skipped" ;;
    *) failed=$((failed + 1)); echo "FAILED (exit $rc): $ckpt" >&2 ;;
  esac
done
echo "generation launcher: $generated generated, $skipped already done, $failed failed (${#CHECKPOINTS[@]} checkpoints)"
[ "$failed" -eq 0 ]
