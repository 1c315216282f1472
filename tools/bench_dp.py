#!/usr/bin/env python
"""Data-parallel benchmark: AsyncMesh sparse averaging against DeepSpeed ZeRO and Megatron DP.

Same GPT (Megatron-core GPTModel, layout-independent init), same bundled-corpus
samples, same AdamW and schedule, DP = 2, equal tokens for every run.

Part 1, loopback (``--steps`` steps, default 600):

    megatron-sync        Megatron's DDP gradient all-reduce (the synchronous reference)
    zero1, zero2, zero3  DeepSpeed ZeRO through deepspeed.initialize
    sparse-ema-tau{0,10,50}   AsyncMesh on Megatron, p = 0.05, ema correction
    sparse-avg-tau10     the AsyncSPARTA baseline (no drift correction)
    ds-sparse-ema-tau10  the same averaging as a DeepSpeed engine hook (ZeRO-0)
    mesh-2bw-nadamw      PP = 2 x DP = 2, 2bw + nadamw + sparse ema (4 ranks)
    mesh-sync            PP = 2 x DP = 2, flush + AdamW + gradient all-reduce (its reference)
    mesh-2bw-nadamw-allreduce   the asynchronous pipeline alone (gradient all-reduce kept)
    dense-avg-tau0       parameter averaging of every coordinate every step (p = 1, tau = 0):
                         what replacing gradient averaging by parameter averaging costs

Part 2, a 100 Mbit/s link (``--link``): the two replicas on two emulated hosts
(network namespaces on a bridge, each link shaped with ``tc qdisc ... tbf``,
``tools/shaped_net.py``); a wider
model whose gradients (tens of MB per step) dominate the step; ZeRO-1 against
sparse averaging on the same DeepSpeed engine. Needs root (``ip netns``);
skipped with a message otherwise.

Bytes are what each rank hands to its collectives per step: deepspeed's comms
logger for DeepSpeed runs, the averager's own counter for sparse runs (equal to
the logger's, tests/test_dataparallel.py), the gradient buffer for Megatron's
DDP (one all-reduce of every fp32 gradient per step).

Output: results.json, results.md, loss_curves.png. Runs are reused when their
arguments did not change (``--only NAME`` runs one, ``--report`` rebuilds the table).
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from shaped_net import StarNetwork, unavailable  # noqa: E402

MODEL = ["--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4",
         "--seq-length", "128", "--micro-batch-size", "4", "--global-batch-size", "16",
         "--untie-embeddings-and-output-weights", "--lr", "2e-3", "--min-lr", "2e-4",
         "--weight-decay", "0.1", "--clip-grad", "1.0", "--seed", "1234"]
# Part 2: few tokens per step, many parameters: 6 layers x 512 (~23 M with embeddings).
WIDE = ["--num-layers", "6", "--hidden-size", "512", "--num-attention-heads", "8",
        "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--untie-embeddings-and-output-weights", "--lr", "1e-3", "--min-lr", "1e-4",
        "--seed", "1234"]
SPARSE = ["--dp-averaging", "sparse", "--dp-fraction", "0.05"]

# name: (entry, nproc, extra args). "{ema}" is the step the drift EMA's momentum starts
# its cosine annealing: about 3 % of training, as in the AsyncMesh paper (and mesh.yaml).
RUNS = {
    "megatron-sync": ("train", 2, []),
    "zero1": ("deepspeed", 2, ["--zero-stage", "1"]),
    "sparse-ema-tau10": ("train", 2, [*SPARSE, "--dp-delay", "10", "--dp-correction", "ema",
                                      "--dp-ema-start", "{ema}"]),
    "sparse-avg-tau10": ("train", 2, [*SPARSE, "--dp-delay", "10", "--dp-correction", "avg"]),
    "sparse-ema-tau0": ("train", 2, [*SPARSE, "--dp-delay", "0", "--dp-correction", "ema",
                                     "--dp-ema-start", "{ema}"]),
    "sparse-ema-tau50": ("train", 2, [*SPARSE, "--dp-delay", "50", "--dp-correction", "ema",
                                      "--dp-ema-start", "{ema}"]),
    "ds-sparse-ema-tau10": ("deepspeed", 2, ["--zero-stage", "0", *SPARSE, "--dp-delay", "10",
                                             "--dp-correction", "ema", "--dp-ema-start",
                                             "{ema}"]),
    "zero2": ("deepspeed", 2, ["--zero-stage", "2"]),
    "zero3": ("deepspeed", 2, ["--zero-stage", "3"]),
    "mesh-2bw-nadamw": ("train", 4, ["--pipeline-model-parallel-size", "2",
                                     "--pipeline-schedule", "2bw", "--optimizer", "nadamw",
                                     *SPARSE, "--dp-delay", "10", "--dp-correction", "ema",
                                     "--dp-ema-start", "{ema}"]),
    # What the mesh's gap is made of: the synchronous PP = 2 x DP = 2 reference (flush,
    # Megatron's gradient all-reduce) and the asynchronous pipeline alone (2bw + nadamw
    # with the gradient all-reduce kept).
    "mesh-sync": ("train", 4, ["--pipeline-model-parallel-size", "2",
                               "--pipeline-schedule", "flush"]),
    "mesh-2bw-nadamw-allreduce": ("train", 4, ["--pipeline-model-parallel-size", "2",
                                               "--pipeline-schedule", "2bw", "--optimizer",
                                               "nadamw"]),
    # The cost of averaging parameters instead of gradients at all: every coordinate,
    # every step, no delay (each replica keeps its own Adam state).
    "dense-avg-tau0": ("train", 2, ["--dp-averaging", "sparse", "--dp-fraction", "1",
                                    "--dp-delay", "0", "--dp-correction", "avg"]),
}
MESH_REFERENCE = "mesh-sync"
LINK_RUNS = {
    "link-zero1": ["--zero-stage", "1"],
    "link-sparse-ema-tau10": ["--zero-stage", "0", *SPARSE, "--dp-delay", "10",
                              "--dp-correction", "ema"],
}
REFERENCE = "megatron-sync"
DENSE_REFERENCE = "dense-avg-tau0"
ENTRY = {"train": "megatron_asyncmesh.train", "deepspeed": "megatron_asyncmesh.train_deepspeed"}
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "4294967296",
          "MALLOC_TOP_PAD_": "268435456"}


def model_args(global_batch: int, lr: float | None = None) -> list:
    args = list(MODEL)
    args[args.index("--global-batch-size") + 1] = str(global_batch)
    if lr is not None:      # the peak lr; the cosine schedule ends at a tenth of it
        args[args.index("--lr") + 1] = f"{lr:g}"
        args[args.index("--min-lr") + 1] = f"{lr / 10:g}"
    return args


def ema_start(steps: int) -> int:
    return max(1, round(0.03 * steps))


def run_args(name: str, steps: int, global_batch: int = 16, lr: float | None = None,
             lam: float | None = None) -> list:
    entry, _, extra = RUNS[name]
    ema = "--dp-correction" in extra and extra[extra.index("--dp-correction") + 1] == "ema"
    weight = ["--dp-lambda", f"{lam:g}"] if lam is not None and ema else []
    return [*model_args(global_batch, lr), *[a.format(ema=ema_start(steps)) for a in extra],
            *weight, "--train-iters", str(steps),
            "--lr-warmup-iters", str(max(1, steps // 20)), "--eval-interval",
            str(max(1, steps // 12)), "--eval-iters", "4", "--num-threads", "1", "--no-progress"]


def run_loopback(out: str, name: str, steps: int, global_batch: int,
                 lr: float | None = None, lam: float | None = None) -> dict:
    from megatron_asyncmesh.distributed import free_port
    from megatron_asyncmesh.metrics import finish_bench_run, start_bench_run

    entry, nproc, _ = RUNS[name]
    args = run_args(name, steps, global_batch, lr, lam)
    run_dir = os.path.join(out, "runs", name)
    if not start_bench_run(run_dir, args, name):
        return load(run_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", ENTRY[entry], *args, "--run-dir", run_dir]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, DS_ACCELERATOR="cpu",
               PYTHONWARNINGS="ignore", **MALLOC)
    t0 = time.time()
    with open(os.path.join(run_dir, "log.txt"), "w") as log:
        rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    finish_bench_run(run_dir, args, rc, name, t0)
    return load(run_dir)


# --------------------------------------------------------------------------- link
LINK_HOSTS = 2


def run_link(net, out: str, name: str, steps: int, rate: str) -> dict:
    from megatron_asyncmesh.metrics import finish_bench_run, start_bench_run

    args = [*WIDE, *LINK_RUNS[name], "--train-iters", str(steps), "--lr-warmup-iters", "2",
            "--eval-interval", str(steps), "--eval-iters", "1", "--num-threads", "1",
            "--no-progress", f"--link={rate}"]
    run_dir = os.path.join(out, "runs", name)
    if not start_bench_run(run_dir, args, name):
        return load(run_dir)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, DS_ACCELERATOR="cpu",
               PYTHONWARNINGS="ignore", **MALLOC)
    t0 = time.time()
    rc = net.run([(i, [sys.executable, "-m", "torch.distributed.run", "--nnodes",
                       str(LINK_HOSTS), "--node_rank", str(i), "--nproc_per_node", "1",
                       "--master_addr", net.addr(0), "--master_port", "29777",
                       "-m", ENTRY["deepspeed"], *args[:-1], "--run-dir", run_dir])
                  for i in range(LINK_HOSTS)], run_dir, env, timeout=1800)
    finish_bench_run(run_dir, args, rc, name, t0)
    return load(run_dir)


# --------------------------------------------------------------------------- report
def load(run_dir: str) -> dict:
    from megatron_asyncmesh.metrics import read_metrics

    with open(os.path.join(run_dir, "summary.json")) as f:
        s = json.load(f)
    _, val = read_metrics(run_dir)
    return {"final_val_loss": s["final_val_loss"],
            "consensus_val_loss": s.get("consensus_val_loss"),
            "tokens_per_s": s.get("tokens_per_s"),
            "steady_tokens_per_s": s.get("steady_tokens_per_s"),
            "bytes_per_step": bytes_per_step(s),
            "val": [(r["step"], r["val_loss"]) for r in val]}


def bytes_per_step(s: dict) -> dict:
    """Per-rank bytes per step by kind (max over ranks)."""
    stats = [a for a in s.get("dp_averaging_stats") or [] if a]
    if stats:
        return {"sparse_all_reduce": max(a["bytes_per_step"] for a in stats)}
    if s.get("engine") == "deepspeed":
        rows = s["per_rank"]
        steps = s["train_iters"]
        ops = {}
        for r in rows:
            for op, b in r["comm_bytes_by_op"].items():
                if op != "broadcast":           # the one-off initial weight broadcast
                    ops[op] = max(ops.get(op, 0), b / steps)
        return ops
    # Megatron DDP: one all-reduce of the fp32 gradient buffer per step.
    grad = max(s.get("grad_all_reduce_bytes_per_step") or [0])
    return {"grad_all_reduce": grad} if grad else {}


def model_loss(r: dict) -> float:
    """The loss of the run's one model: the replicas' mean (consensus) for parameter
    averaging, as the AsyncMesh paper evaluates; the model itself otherwise."""
    c = r.get("consensus_val_loss")
    return c if c is not None else r["final_val_loss"]


def _rel(r: dict, ref: dict | None) -> str:
    return f"{100 * (model_loss(r) / model_loss(ref) - 1):+.2f} %" if ref else ""


def report(out: str, results: dict, link: dict, link_note: str, global_batch: int = 16,
           lr: float | None = None) -> str:
    ref, dense = results.get(REFERENCE), results.get(DENSE_REFERENCE)
    zero1 = results.get("zero1")
    zero1_grad = (zero1 or {}).get("bytes_per_step", {}).get("all_reduce")
    lines = [f"# Data parallelism, DP = 2, equal tokens (loopback, global batch {global_batch} "
             f"x {MODEL[MODEL.index('--seq-length') + 1]} tokens)", "",
             "Losses compared are each run's one model: the replicas' mean (consensus) for "
             "parameter averaging. Two references: synchronous gradient data parallelism "
             f"({REFERENCE}) and dense parameter averaging, every coordinate every step "
             f"({DENSE_REFERENCE}, the AsyncMesh paper's synchronous run). Mesh runs are "
             f"also compared with their own synchronous reference ({MESH_REFERENCE}).", "",
             "| run | val loss (replica) | consensus val loss | vs gradient DP | "
             "vs dense averaging | bytes/step/rank (by collective) | vs ZeRO-1 gradient bytes | "
             "tokens/s |", "|---|---|---|---|---|---|---|---|"]
    mesh_ref = results.get(MESH_REFERENCE)
    for name in RUNS:
        r = results.get(name)
        if r is None:
            lines.append(f"| {name} | not run | | | | | | |")
            continue
        vs_grad, vs_dense = _rel(r, ref), _rel(r, dense)
        if name.startswith("mesh-"):
            vs_dense = ""            # PP = 2 x DP = 2: its own reference instead
            if name != MESH_REFERENCE and mesh_ref:
                vs_grad += f" ({_rel(r, mesh_ref)} vs {MESH_REFERENCE})"
        b = r["bytes_per_step"]
        total = sum(b.values())
        ratio = f"1/{zero1_grad / total:.1f}" if zero1_grad and total else ""
        desc = ", ".join(f"{k} {v / 1e6:.3f} MB" for k, v in b.items())
        cons = r.get("consensus_val_loss")
        lines.append(f"| {name} | {r['final_val_loss']:.4f} | "
                     f"{f'{cons:.4f}' if cons is not None else ''} | {vs_grad} | {vs_dense} | "
                     f"{desc} | {ratio} | {r['tokens_per_s'] or 0:.0f} |")
    lines += ["", "# Across a shaped link (two emulated hosts, tools/shaped_net.py)", ""]
    if link:
        lines += ["| run | bytes/step/rank | tokens/s | final val loss |", "|---|---|---|---|"]
        for name, r in link.items():
            desc = ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in r["bytes_per_step"].items())
            lines.append(f"| {name} | {desc} | {r['tokens_per_s'] or 0:.1f} | "
                         f"{r['final_val_loss']:.4f} |")
        a, b = link.get("link-sparse-ema-tau10"), link.get("link-zero1")
        if a and b and b["tokens_per_s"]:
            lines.append("")
            lines.append(f"sparse / ZeRO-1 tokens/s: **{a['tokens_per_s'] / b['tokens_per_s']:.2f}x**")
    else:
        lines.append(f"skipped: {link_note}")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"loopback": results, "link": link, "link_note": link_note,
                   "model_args": model_args(global_batch, lr), "link_model_args": WIDE}, f, indent=1)
    plot(out, results)
    return text


def plot(out: str, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for name, r in results.items():
        style = "-" if "sync" in name or name.startswith("zero") else "--"
        for ax in axes:
            ax.plot(*zip(*r["val"]), style, label=name)
    last = max(s for r in results.values() for s, _ in r["val"])
    tail = [l for r in results.values() for s, l in r["val"] if s >= last // 2]
    axes[1].set_xlim(last // 2, last)
    axes[1].set_ylim(min(tail) - 0.02, max(tail) + 0.02)
    axes[0].set_title("validation loss, DP = 2, equal tokens")
    axes[1].set_title("second half")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss_curves.png"), dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench_dp")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--global-batch-size", type=int, default=16,
                   help="loopback part: sequences per step over both replicas (a multiple "
                        "of 8: micro-batch 4 x DP 2)")
    p.add_argument("--lr", type=float, default=None,
                   help="loopback part: peak lr of every run (default 2e-3); the cosine "
                        "schedule decays to a tenth of it")
    p.add_argument("--dp-lambda", type=float, default=None,
                   help="loopback part: the drift correction's weight in the sparse ema runs "
                        "(default 1, the paper's; at tau = 10, 1.5-2 measured better below the "
                        "best lr only: the README's data-parallel section)")
    p.add_argument("--only", nargs="+", choices=[*RUNS, *LINK_RUNS])
    p.add_argument("--report", action="store_true", help="only rebuild the table and plot")
    p.add_argument("--no-link", action="store_true", help="skip the shaped-link part")
    p.add_argument("--link-rate", default="100mbit")
    p.add_argument("--link-steps", type=int, default=20)
    a = p.parse_args(argv)
    from megatron_asyncmesh.metrics import BENCH_MANIFEST, bench_run_is_current

    os.makedirs(a.out, exist_ok=True)
    results, link = {}, {}
    for name in RUNS:
        run_dir = os.path.join(a.out, "runs", name)
        if a.report or (a.only and name not in a.only):
            if bench_run_is_current(run_dir, run_args(name, a.steps, a.global_batch_size, a.lr,
                                                      a.dp_lambda)):
                results[name] = load(run_dir)
            continue
        results[name] = run_loopback(a.out, name, a.steps, a.global_batch_size, a.lr,
                                     a.dp_lambda)
    link_note = "--no-link" if a.no_link else unavailable()
    wanted = [n for n in LINK_RUNS if not a.only or n in a.only]
    for name in LINK_RUNS:
        run_dir = os.path.join(a.out, "runs", name)
        if os.path.exists(os.path.join(run_dir, BENCH_MANIFEST)) and (
                a.report or link_note or name not in wanted):
            link[name] = load(run_dir)
    if not a.report and not link_note and wanted:
        with StarNetwork(LINK_HOSTS, a.link_rate) as net:
            for name in wanted:
                link[name] = run_link(net, a.out, name, a.link_steps, a.link_rate)
    elif link_note:
        print(f"shaped-link part skipped: {link_note}", flush=True)
    print(report(a.out, results, link, link_note, a.global_batch_size, a.lr))
    return 0


if __name__ == "__main__":
    sys.exit(main())
