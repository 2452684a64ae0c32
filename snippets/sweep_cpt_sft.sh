#!/usr/bin/env bash
# CPT -> SFT for every cell of an experiment matrix: two Hydra multiruns, SFT of each cell starting from the
# final checkpoint of the same cell's CPT run (docs/experiments.md, "CPT -> SFT chains").
#
#   snippets/sweep_cpt_sft.sh ROOT --cells CELL... [--both OVERRIDE...] [--cpt OVERRIDE...] [--sft OVERRIDE...]
#
#   snippets/sweep_cpt_sft.sh runs/dedup \
#       --cells data.sequence.dedup=true,false \
#       --both size=llama3_2_1b hydra/launcher=slurm hydra.launcher.partition=gpu \
#       --cpt data=cpt/mls_hubert_large_l22 model=models/Llama-3.2-1B-5000-dsus max_steps=20000 \
#       --sft data=sft/mls_hubert_large_l22 max_steps=5000
#
# --cells   the swept overrides (Hydra sweep syntax, key=a,b); their keys alone name the runs
#           (sweep.cell_keys), so cell <name> has ROOT/cpt/<name> and ROOT/sft/<name>
# --both    overrides for both stages (size, data sources, launcher, device...); no sweeps here
# --cpt     CPT-only overrides: the data preset, the base model (model=), steps, learning rate...
# --sft     SFT-only overrides; SFT's model= is set by this script: ROOT/cpt/<cell name>, i.e. the final
#           checkpoint of that run (an unfinished CPT run is refused when the SFT job starts)
#
# Without a Slurm launcher the two sweeps run here, one job after the other, CPT first. With
# hydra/launcher=slurm (conf/hydra/launcher/slurm.yaml) both are submitted at once: task i of the SFT array
# waits for task i of the CPT array (--dependency=aftercorr, so every cell starts SFT as soon as its own CPT
# is done) and is cancelled if that CPT task fails (--kill-on-invalid-dep=yes). The script waits for both
# sweeps, as Hydra's launcher does; the jobs do not need it (they requeue and resume on their own), and
# running the same command again resumes every unfinished cell. Exit code: non-zero if any job failed.
# SSI_PYTHON selects the interpreter (default: the repository's .venv/bin/python, else python).
set -euo pipefail

usage() { echo "usage: $0 ROOT --cells CELL... [--both OVERRIDE...] [--cpt OVERRIDE...] [--sft OVERRIDE...]" >&2; exit 2; }
die() { echo "error: $*" >&2; exit 2; }
[ $# -ge 1 ] || usage
ROOT=$1
shift
[[ $ROOT != -* ]] || usage
CELLS=() BOTH=() CPT=() SFT=() section=
for arg in "$@"; do
  case $arg in
    --cells | --both | --cpt | --sft) section=${arg#--} ;;
    *)
      case $section in
        cells) CELLS+=("$arg") ;;
        both) BOTH+=("$arg") ;;
        cpt) CPT+=("$arg") ;;
        sft) SFT+=("$arg") ;;
        *) usage ;;
      esac
      ;;
  esac
done
[ ${#CELLS[@]} -gt 0 ] || die "--cells needs at least one override (e.g. data.sequence.dedup=true,false)"

key_of() { local key=${1%%=*}; key=${key#++}; echo "${key#+}"; }
is_sweep() { local value=${1#*=}; value=$(sed -E 's/\[[^]]*\]//g' <<<"$value"); [[ $value == *,* ]]; }
for arg in "${CELLS[@]}" "${BOTH[@]}" "${SFT[@]}"; do
  case $(key_of "$arg") in
    model | checkpointer.checkpoint_dir) die "$arg: SFT starts from the cell's CPT run; give the base model with --cpt model=..." ;;
  esac
done
for arg in "${CELLS[@]}" "${BOTH[@]}" "${CPT[@]}" "${SFT[@]}"; do
  case $(key_of "$arg") in
    output_dir | hydra.sweep.dir | sweep.cell_keys) die "$arg: this script sets it (runs go to $ROOT/cpt/<cell> and $ROOT/sft/<cell>)" ;;
  esac
done
for arg in "${BOTH[@]}" "${CPT[@]}" "${SFT[@]}"; do
  if is_sweep "$arg"; then die "$arg: only --cells may sweep (both stages must have the same cells)"; fi
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${SSI_PYTHON:-$([ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python)}
mkdir -p "$ROOT"
ROOT=$(cd "$ROOT" && pwd)
KEYS=$(for arg in "${CELLS[@]}"; do key_of "$arg"; done | paste -sd, -)
CPT_CMD=("$PYTHON" "$REPO/recipes/cpt.py" -m "hydra.sweep.dir=$ROOT/cpt" "sweep.cell_keys=[$KEYS]"
         "${CELLS[@]}" "${BOTH[@]}" "${CPT[@]}")
SFT_CMD=("$PYTHON" "$REPO/recipes/sft.py" -m "hydra.sweep.dir=$ROOT/sft" "sweep.cell_keys=[$KEYS]"
         "${CELLS[@]}" "${BOTH[@]}" "${SFT[@]}" "model=$ROOT/cpt/\${ssi.cell:}")

ON_SLURM=0
for arg in "${BOTH[@]}"; do
  case $arg in hydra/launcher=slurm | hydra/launcher=submitit_slurm) ON_SLURM=1 ;; esac
done

if [ $ON_SLURM = 0 ]; then
  echo "ssi: CPT sweep -> $ROOT/cpt"
  cpt_rc=0
  "${CPT_CMD[@]}" || cpt_rc=$?
  echo "ssi: SFT sweep -> $ROOT/sft (each cell from $ROOT/cpt/<cell>)"
  sft_rc=0
  "${SFT_CMD[@]}" || sft_rc=$?
else
  # Submit CPT, read its array id from the folder submitit creates for it, then submit SFT behind it.
  SUBMITIT=$ROOT/cpt/.submitit
  mkdir -p "$SUBMITIT"
  before=$(ls "$SUBMITIT")
  echo "ssi: submitting the CPT sweep -> $ROOT/cpt"
  "${CPT_CMD[@]}" &
  cpt_driver=$!
  array=
  while [ -z "$array" ]; do
    kill -0 "$cpt_driver" 2>/dev/null || break
    array=$(comm -13 <(echo "$before" | sort) <(ls "$SUBMITIT" | sort) | grep -E '^[0-9]+$' | head -n1 || true)
    [ -n "$array" ] || sleep 1
  done
  if [ -z "$array" ]; then
    wait "$cpt_driver" || true
    die "the CPT sweep was not submitted (its output is above)"
  fi
  echo "ssi: CPT is Slurm array $array; submitting the SFT sweep -> $ROOT/sft (task i after CPT task i)"
  sft_rc=0
  "${SFT_CMD[@]}" "+hydra.launcher.additional_parameters.dependency=aftercorr:$array" \
    "+hydra.launcher.additional_parameters.kill_on_invalid_dep=yes" || sft_rc=$?
  cpt_rc=0
  wait "$cpt_driver" || cpt_rc=$?
fi
echo "ssi: CPT sweep exit code $cpt_rc, SFT sweep exit code $sft_rc (runs: $ROOT/cpt, $ROOT/sft)"
[ "$cpt_rc" = 0 ] && [ "$sft_rc" = 0 ]
