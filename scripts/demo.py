#!/usr/bin/env python
"""The whole ssi loop on a laptop, through the same command lines users run (what `make demo` does).

1. scripts/make_tiny_llama.py         a small Llama-3.2-shaped base model (random weights, real tokenizer files)
2. scripts/make_synthetic_dataset.py  a synthetic DSU corpus in the MLS schema (learnable "phones")
3. scripts/convert_benchmark.py       a likelihood benchmark from its test split: real speech vs word-shuffled speech
4. scripts/extend_llama3_2.py         + 300 DSU tokens and the two modality tokens
5. scripts/generate.py                WER of the extended, untrained model (vLLM; torch if vLLM cannot start)
6. scripts/evaluate.py                benchmark accuracy of the untrained model
7. recipes/cpt.py                     continued pre-training on interleaved speech/text
8. scripts/evaluate_run.py            benchmark accuracy of every CPT checkpoint (results in the CPT run)
9. recipes/sft.py                     ASR fine-tuning from the last CPT checkpoint
10. scripts/generate.py               WER after SFT
11. scripts/evaluate.py               benchmark accuracy after SFT
12. scripts/plot_losses.py            train/dev loss curves of CPT and SFT
13. scripts/report.py                 one table across both runs: losses, WER, benchmark accuracy per checkpoint

  python scripts/demo.py [--out demo_outputs] [--cpt_steps 400] [--sft_steps 2000] [--overwrite]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
N_DSUS = 300


class StepFailed(RuntimeError):
    pass


QUIET_ENV = {"VLLM_LOGGING_LEVEL": "ERROR"}  # an engine start prints some 150 INFO lines and 40 warnings


def run_step(title: str, args: list[str]) -> float:
    """Run one entry point with this interpreter, streaming its output; returns its wall time."""
    print(f"\n=== {title}\n$ python {' '.join(args)}", flush=True)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], cwd=REPO)
    if done.returncode != 0:
        raise StepFailed(f"{title}: `python {' '.join(args)}` exited with {done.returncode}")
    return time.perf_counter() - start


def last_checkpoint(run_dir: Path) -> Path:
    from ssi.run_dir import list_checkpoints

    return list_checkpoints(run_dir)[-1].path


def generate(title: str, model: Path, extra: list[str], backend: str) -> tuple[float, str]:
    """WER of one model via scripts/generate.py: vLLM first (unless `backend=torch`), the PyTorch backend if vLLM
    cannot start (greedy decoding: both give the same tokens)."""
    args = ["scripts/generate.py", f"model={model}", "sampling_params.max_tokens=48", *extra]
    if backend == "torch":
        return run_step(f"{title} (PyTorch backend)", [*args, "backend=torch"]), "torch"
    try:
        seconds = run_step(f"{title} (vLLM)", [*args, "backend=vllm"])
        backend = "vllm"
    except StepFailed as err:
        print(f"\n!!! {err}\n!!! vLLM could not run here; generating with the PyTorch backend instead", flush=True)
        seconds = run_step(f"{title} (PyTorch backend)", [*args, "backend=torch", "overwrite=true"])
        backend = "torch"
    return seconds, backend


def benchmark_accuracy(results: Path) -> float:
    """Accuracy from the summary.json of an evaluation (the only one under `results`)."""
    (summary,) = results.rglob("summary.json")
    return json.loads(summary.read_text())["accuracy"]


def run_summary(run_dir: Path) -> dict[str, float]:
    from ssi.run_dir import read_metrics, series

    metrics = read_metrics(run_dir)
    _, losses = series(metrics, "loss")
    _, dev = series(metrics, "dev_loss")
    _, speed = series(metrics, "tokens_per_second")
    return {
        "steps": max(metrics),
        "loss": losses[-1],
        "dev_loss": dev[-1] if dev else float("nan"),
        "dev_loss_first": dev[0] if dev else float("nan"),
        "tokens_per_second": sum(speed) / len(speed),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "demo_outputs", help="outputs folder (default: %(default)s)")
    parser.add_argument("--cpt_steps", type=int, default=400)
    parser.add_argument("--sft_steps", type=int, default=2000)
    parser.add_argument("--n_train", type=int, default=4000, help="synthetic training utterances")
    parser.add_argument("--n_test", type=int, default=200, help="synthetic test utterances")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing --out folder first")
    parser.add_argument(
        "--backend", choices=("vllm", "torch"), default="vllm", help="generation backend (torch: no engine start)"
    )
    parser.add_argument("--verbose", action="store_true", help="also show vLLM's INFO lines")
    args = parser.parse_args(argv)
    if not args.verbose:
        os.environ.update(QUIET_ENV)  # for every step it starts
    out = args.out.resolve()
    if out.exists():
        if not args.overwrite:
            print(
                f"error: {out} exists (a previous demo?). Remove it, pass --overwrite (make demo FRESH=1), "
                "or choose another folder (make demo OUT=...)",
                file=sys.stderr,
            )
            return 2
        shutil.rmtree(out)
    started = time.perf_counter()
    base, model = out / "models/Llama-3.2-tiny", out / f"models/Llama-3.2-tiny-{N_DSUS}-dsus"
    corpus, cpt_run, sft_run = out / "data/synthetic", out / "runs/cpt", out / "runs/sft"
    benchmark = out / "benchmarks/synthetic_test.jsonl"
    report = out / "report"
    # The benchmark is scored with the PyTorch backend: exact, and no engine start for 200 short items.
    evaluate = ["scripts/evaluate.py", f"benchmark={benchmark}", "backend=torch", "progress=false"]
    data = [f"data.train.dataset.source={corpus}"]
    # Both recipes collapse repeated units (dedup): the model reads one token per "phone", not per frame.
    common = [
        "size=tiny",
        *data,
        "data.sequence.dedup=true",
        "data.train.dataloader.batch_size=16",
        "progress=false",
        "log_steps=25",
    ]
    try:
        run_step("1/13 base model", ["scripts/make_tiny_llama.py", "--output_dir", str(base)])
        run_step(
            "2/13 synthetic corpus",
            [
                "scripts/make_synthetic_dataset.py",
                "--output_dir",
                str(corpus),
                "--n_train",
                str(args.n_train),
                "--n_validation",
                "200",
                "--n_test",
                str(args.n_test),
                "--n_units",
                str(N_DSUS),
            ],
        )
        run_step(
            "3/13 likelihood benchmark from the test split",
            ["scripts/convert_benchmark.py", "synthetic", "--corpus", str(corpus), "--output", str(benchmark)],
        )
        run_step(
            "4/13 extend the vocabulary",
            [
                "scripts/extend_llama3_2.py",
                "--n_new_dsus",
                str(N_DSUS),
                "--input_dir",
                str(base),
                "--output_dir",
                str(model),
                "--dsu_encoder",
                "synthetic",
                "--frame_rate",
                "50",
                "--no-progress",
            ],
        )
        _, backend_before = generate(
            "5/13 WER before training",
            model,
            [
                "data=sft/synthetic",
                *data,
                "data.sequence.dedup=true",
                f"gen.output_dir={out / 'generations/untrained'}",
            ],
            args.backend,
        )
        run_step(
            "6/13 benchmark accuracy before training",
            # outside a run: build sequences as the CPT run will (deduplicated units)
            [*evaluate, f"model={model}", f"output_dir={out / 'evaluations/untrained'}", "sequence.dedup=true"],
        )
        cpt_s = run_step(
            "7/13 CPT",
            [
                "recipes/cpt.py",
                "data=cpt/synthetic",
                *common,
                f"model={model}",
                f"output_dir={cpt_run}",
                f"max_steps={args.cpt_steps}",
                "optimizer.lr=2e-3",
                f"save_steps={args.cpt_steps}",
                "eval_steps=100",
                "lr_scheduler.num_warmup_steps=20",
            ],
        )
        run_step(
            "8/13 benchmark accuracy of every CPT checkpoint",
            ["scripts/evaluate_run.py", f"run={cpt_run}", "test_sets=[]", f"benchmarks=[{benchmark}]",
             "evaluate.backend=torch", "evaluate.progress=false"],
        )  # fmt: skip
        sft_s = run_step(
            "9/13 SFT",
            [
                "recipes/sft.py",
                "data=sft/synthetic",
                *common,
                f"model={last_checkpoint(cpt_run)}",
                f"output_dir={sft_run}",
                f"max_steps={args.sft_steps}",
                "optimizer.lr=2e-3",
                f"save_steps={args.sft_steps}",
                "eval_steps=250",
                "lr_scheduler.num_warmup_steps=50",
            ],
        )
        final = last_checkpoint(sft_run)
        _, backend_after = generate("10/13 WER after SFT", final, [], args.backend)
        run_step("11/13 benchmark accuracy after SFT", [*evaluate, f"model={final}"])
        run_step(
            "12/13 loss curves",
            ["scripts/plot_losses.py", str(cpt_run), str(sft_run), "--output", str(out / "losses.png")],
        )
        run_step(
            "13/13 report across the runs", ["scripts/report.py", str(cpt_run), str(sft_run), "--output", str(report)]
        )
    except StepFailed as err:
        print(f"\ndemo failed: {err}", file=sys.stderr)
        return 1

    wer_before = json.loads(next((out / "generations/untrained").rglob("wer.json")).read_text())
    wer_after = json.loads(next((sft_run / "generations").rglob("wer.json")).read_text())
    cpt, sft = run_summary(cpt_run), run_summary(sft_run)
    rows = [
        ("stage", "steps", "train loss", "dev loss (start -> end)", "tokens/s", "wall s"),
        (
            "CPT",
            cpt["steps"],
            f"{cpt['loss']:.3f}",
            f"{cpt['dev_loss_first']:.3f} -> {cpt['dev_loss']:.3f}",
            f"{cpt['tokens_per_second']:.0f}",
            f"{cpt_s:.0f}",
        ),
        (
            "SFT",
            sft["steps"],
            f"{sft['loss']:.3f}",
            f"{sft['dev_loss_first']:.3f} -> {sft['dev_loss']:.3f}",
            f"{sft['tokens_per_second']:.0f}",
            f"{sft_s:.0f}",
        ),
    ]
    print("\n" + "=" * 100 + "\nssi demo summary\n")
    for row in rows:
        print(f"{row[0]:<6}{row[1]:>7}{row[2]:>12}{row[3]:>28}{row[4]:>11}{row[5]:>9}")
    print(f"\nWER on the synthetic test split ({wer_after['n_utterances']} utterances, whisper normaliser):")
    print(f"  extended base model, untrained : {100 * wer_before['wer']:6.1f}%   ({backend_before})")
    print(f"  after CPT + SFT                : {100 * wer_after['wer']:6.1f}%   ({backend_after})")
    accuracy = {
        "untrained": benchmark_accuracy(out / "evaluations/untrained"),
        "cpt": benchmark_accuracy(cpt_run / "evaluations"),
        "sft": benchmark_accuracy(sft_run / "evaluations"),
    }
    n_items = sum(1 for line in benchmark.read_text().splitlines() if line.strip())
    print(f"\nBenchmark accuracy on the synthetic test split ({n_items} items: real vs word-shuffled speech):")
    print(f"  extended base model, untrained : {100 * accuracy['untrained']:6.1f}%")
    print(f"  after CPT                      : {100 * accuracy['cpt']:6.1f}%")
    print(f"  after CPT + SFT                : {100 * accuracy['sft']:6.1f}%")
    print(
        f"\noutputs: {out}\n  models     {model}\n  benchmark  {benchmark}"
        f"\n  CPT run    {cpt_run}\n  SFT run    {sft_run}"
        f"\n  final ckpt {final}\n  loss plot  {out / 'losses.png'}\n  report     {report / 'report.md'}"
        f"\n  total      {time.perf_counter() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
