#!/usr/bin/env python
"""Convergence benchmark: optimizers against staleness, on the same model, data and tokens.

One fixed small GPT (8 layers x 128, 4 heads, untied output layer) split over
P = 4 pipeline stages (one process per stage, one thread each), the bundled
corpus, global batch 8 x 128 tokens (M = 4 microbatches of 2), the same
samples in the same order for every run (Megatron's sampler, one seed), the
same warm-up + cosine schedule. Runs:

    flush-adamw (the synchronous reference), flush-muon (Muon's own sync
    reference), stash-adamw, 2bw-adamw, stash-nadamw, 2bw-nadamw, 2bw-muon,
    2bw-muon-ef (error feedback, alpha 0.5), stash-soap, 2bw-soap,
    2bw-pipemare (AdamW + PipeMare lr correction)

Output: results.json, results.md (final validation loss, gap to flush-adamw,
steps to reach flush-adamw's final loss, and to reach stash-adamw's final
loss, steady tokens/s), loss_curves.png. Every run lives in runs/<name>; a run
whose summary.json exists with the same arguments is reused, so the grid can be
built one configuration at a time:

    python tools/bench_convergence.py --out runs/bench_convergence              # all
    python tools/bench_convergence.py --out runs/bench_convergence --only 2bw-soap
    python tools/bench_convergence.py --out runs/bench_convergence --report     # table only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MODEL = ["--num-layers", "8", "--hidden-size", "128", "--num-attention-heads", "4",
         "--seq-length", "128", "--micro-batch-size", "2", "--global-batch-size", "8",
         "--untie-embeddings-and-output-weights", "--weight-decay", "0.1", "--clip-grad", "1.0",
         "--lr", "2e-3", "--min-lr", "2e-4", "--seed", "1234"]

RUNS = {                       # in the order the grid is run (most informative first)
    "flush-adamw": ["--pipeline-schedule", "flush", "--optimizer", "adam"],
    "stash-adamw": ["--pipeline-schedule", "stash", "--optimizer", "adam"],
    "2bw-adamw": ["--pipeline-schedule", "2bw", "--optimizer", "adam"],
    "stash-nadamw": ["--pipeline-schedule", "stash", "--optimizer", "nadamw"],
    # Muon's Newton-Schulz in fp32 on every machine, so the numbers compare across them
    "flush-muon": ["--pipeline-schedule", "flush", "--optimizer", "muon",
                   "--muon-fp32-matmul-prec", "highest"],
    "2bw-muon": ["--pipeline-schedule", "2bw", "--optimizer", "muon",
                 "--muon-fp32-matmul-prec", "highest"],
    "2bw-muon-ef": ["--pipeline-schedule", "2bw", "--optimizer", "muon",
                    "--muon-fp32-matmul-prec", "highest", "--delay-error-feedback", "0.5"],
    "stash-soap": ["--pipeline-schedule", "stash", "--optimizer", "soap"],
    "2bw-nadamw": ["--pipeline-schedule", "2bw", "--optimizer", "nadamw"],
    "2bw-soap": ["--pipeline-schedule", "2bw", "--optimizer", "soap"],
    "2bw-pipemare": ["--pipeline-schedule", "2bw", "--optimizer", "adam",
                     "--pipemare-anneal-iters", "{half}"],
}
REFERENCE, STASH_REFERENCE = "flush-adamw", "stash-adamw"


def run_args(name: str, steps: int, pp: int, data_args) -> list:
    extra = [a.format(half=steps // 2) for a in RUNS[name]]
    eval_every = max(1, steps // 20)
    return [*MODEL, *extra, *data_args, "--train-iters", str(steps),
            "--lr-warmup-iters", str(max(1, steps // 20)),
            "--eval-interval", str(eval_every), "--eval-iters", "4",
            "--pipeline-model-parallel-size", str(pp), "--num-threads", "1", "--no-progress"]


def run_one(out: str, name: str, args: list, pp: int) -> dict:
    from megatron_asyncmesh.distributed import free_port
    from megatron_asyncmesh.metrics import finish_bench_run, start_bench_run

    run_dir = os.path.join(out, "runs", name)
    if not start_bench_run(run_dir, args, name):
        return load(run_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(pp),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "megatron_asyncmesh.train", *args, "--run-dir", run_dir]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    t0 = time.time()
    with open(os.path.join(run_dir, "log.txt"), "w") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    finish_bench_run(run_dir, args, proc.returncode, name, t0)
    return load(run_dir)


def load(run_dir: str) -> dict:
    from megatron_asyncmesh.metrics import read_metrics

    with open(os.path.join(run_dir, "summary.json")) as f:
        s = json.load(f)
    train, val = read_metrics(run_dir)
    return {"final_val_loss": s["final_val_loss"], "steady_tokens_per_s": s["steady_tokens_per_s"],
            "stage_delay": s["stage_delay"], "stage_optimizer": s.get("stage_optimizer"),
            "val": [(r["step"], r["val_loss"]) for r in val],
            "train": [(r["step"], r["loss"]) for r in train]}


def steps_to(curve, target: float):
    """First evaluated step whose validation loss is <= target (None if never)."""
    for step, loss in curve:
        if loss <= target:
            return step
    return None


def report(out: str, results: dict) -> str:
    ref = results.get(REFERENCE)
    stash_ref = results.get(STASH_REFERENCE)
    lines = ["# Convergence: P = 4, same tokens for every run", "",
             "| run | final val loss | vs flush-adamw | steps to flush-adamw's final | "
             "steps to stash-adamw's final | steady tokens/s |", "|---|---|---|---|---|---|"]
    for name in RUNS:
        r = results.get(name)
        if r is None:
            lines.append(f"| {name} | not run | | | | |")
            continue
        rel = (f"{100 * (r['final_val_loss'] / ref['final_val_loss'] - 1):+.2f} %"
               if ref else "")
        t1 = steps_to(r["val"], ref["final_val_loss"]) if ref else None
        t2 = steps_to(r["val"], stash_ref["final_val_loss"]) if stash_ref else None
        lines.append(f"| {name} | {r['final_val_loss']:.4f} | {rel} | {t1 or '-'} | "
                     f"{t2 or '-'} | {r['steady_tokens_per_s'] or 0:.0f} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"runs": results, "reference": REFERENCE, "model_args": MODEL}, f, indent=1)
    plot(out, results)
    return text


def plot(out: str, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for name, r in results.items():
        style = "-" if name.startswith("flush") else ("--" if name.startswith("stash") else ":")
        axes[0].plot(*zip(*r["val"]), style, label=name)
        axes[1].plot(*zip(*r["val"]), style, label=name)
    axes[0].set_title("validation loss")
    axes[1].set_title("validation loss (second half)")
    last = max(s for r in results.values() for s, _ in r["val"])
    tail = [l for r in results.values() for s, l in r["val"] if s >= last // 2]
    if tail:
        axes[1].set_xlim(last // 2, last)
        axes[1].set_ylim(min(tail) - 0.02, max(tail) + 0.02)
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss_curves.png"), dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench_convergence")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--pp", type=int, default=4)
    p.add_argument("--only", nargs="+", choices=list(RUNS), help="run just these")
    p.add_argument("--report", action="store_true", help="only rebuild the table and plot")
    p.add_argument("--data-path", default=None, help="default: the bundled corpus")
    p.add_argument("--tokenizer-model", default=None)
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    from megatron_asyncmesh.metrics import bench_run_is_current

    data_args = []
    if a.data_path:
        data_args += ["--data-path", a.data_path]
    if a.tokenizer_model:
        data_args += ["--tokenizer-model", a.tokenizer_model]
    results = {}
    for name in RUNS:
        args = run_args(name, a.steps, a.pp, data_args)
        run_dir = os.path.join(a.out, "runs", name)
        if a.report or (a.only and name not in a.only):
            # a run made with other arguments is left out
            if bench_run_is_current(run_dir, args):
                results[name] = load(run_dir)
            continue
        results[name] = run_one(a.out, name, args, a.pp)
    print(report(a.out, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
