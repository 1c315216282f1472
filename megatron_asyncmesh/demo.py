"""The default demo (``asyncmesh-demo``; ``bash launch/demo.sh`` sets up and runs it).

1. Prepares the bundled corpus (the interpreter's standard library) if it is
   not cached yet: SentencePiece tokenizer + Megatron ``.bin/.idx``.
2. Trains the same small GPT on the same tokens twice on CPU, PP = 2 x DP = 2,
   four ranks started by ``torchrun`` each time:

   - ``mesh``: the fully asynchronous mesh of ``launch/configs/mesh.yaml`` (the
     recommended recipe), no pipeline flush (``stash``) and no gradient all-reduce
     (sparse, delayed parameter averaging);
   - ``sync``: the same config with both synchronisations put back: synchronous
     Megatron, the pipeline flushed every step (1F1B) and the gradients
     all-reduced over the replicas; the same optimizer and hyperparameters.
3. Ends with one table (validation loss of each run and the mesh's consensus
   loss, tokens/s, bytes per step on each axis, measured pipeline utilisation)
   and one plot of both runs' losses (``comparison.md / .json / .png``); each
   run's directory holds ``metrics.jsonl``, ``summary.json``, ``loss.png`` and
   ``tensorboard/``.

Extra arguments are passed to both runs, e.g. ``--train-iters 50``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGS = os.path.join(REPO, "launch", "configs")
# What turns the mesh recipe into its synchronous reference: the pipeline flush and the
# gradient all-reduce come back (error feedback corrects a delay there is no more of);
# the optimizer and every hyperparameter stay.
SYNC = ["--pipeline-schedule", "flush", "--dp-averaging", "none",
        "--delay-error-feedback", "0"]
RUNS = {"sync": ("synchronous Megatron (1F1B flush + gradient all-reduce)", SYNC),
        "mesh": ("asynchronous mesh (no flush + sparse delayed averaging)", [])}


def _launch(name: str, args, train_args, run_dir: str) -> int:
    from megatron_asyncmesh.distributed import free_port

    config = ["--config", args.config, *RUNS[name][1]]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "megatron_asyncmesh.train", *config,
           "--data-path", args.data_path, "--tokenizer-model", args.tokenizer_model,
           "--run-dir", run_dir, *train_args]
    print(f"[demo] {name}: {RUNS[name][0]}\n[demo] launching {args.nproc} CPU ranks: "
          f"{' '.join(cmd[1:])}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.call(cmd, env=env)


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def pipeline_bytes_per_step(cfg: dict, num_microbatches: int) -> int:
    """Activations sent across each stage boundary per step, both directions: one
    [seq, micro-batch, hidden] tensor forward and its gradient backward per
    micro-batch (what Megatron's p2p exchanges), per replica."""
    width = 2 if cfg.get("bf16") else 4
    return (2 * num_microbatches * cfg["seq_length"] * cfg["micro_batch_size"]
            * cfg["hidden_size"] * width)


def comparison(run_dirs: dict) -> dict:
    """One row per run from its summary.json."""
    rows = {}
    for name, run_dir in run_dirs.items():
        with open(os.path.join(run_dir, "summary.json")) as f:
            s = json.load(f)
        stats = [x for x in s["dp_averaging_stats"] if x]
        dp_bytes = (_mean([x["bytes_per_step"] for x in stats]) if stats
                    else _mean(s["grad_all_reduce_bytes_per_step"]))
        pp = s["pipeline_model_parallel_size"]
        rows[name] = {
            "run": RUNS[name][0] if name in RUNS else name, "run_dir": run_dir,
            "pipeline_schedule": s["pipeline_schedule"], "optimizer": s["optimizer"],
            "dp_averaging": s["dp_averaging"],
            "final_val_loss": s["final_val_loss"],
            "consensus_val_loss": s["consensus_val_loss"],
            "final_train_loss": s["final_train_loss"],
            "tokens_per_s": s["tokens_per_s"], "steady_tokens_per_s": s["steady_tokens_per_s"],
            "dp_bytes_per_step": dp_bytes,
            "pp_bytes_per_step": (pipeline_bytes_per_step(s["config"], s["num_microbatches"])
                                  if pp > 1 else 0),
            "stage_utilization": _mean((s["stage_utilization"] or {}).values()),
            "val_loss_history": s["val_loss_history"], "wall_time_s": s["wall_time_s"]}
    return rows


def _fmt(x, spec=".4f"):
    return "n/a" if x is None else format(x, spec)


def comparison_table(rows: dict) -> str:
    from megatron_asyncmesh.metrics import format_table

    base = rows.get("sync", {}).get("final_val_loss")
    out = []
    for name, r in rows.items():
        model_loss = r["consensus_val_loss"] if r["consensus_val_loss"] is not None \
            else r["final_val_loss"]
        gap = (f"{100 * (model_loss / base - 1):+.1f} %" if base and name != "sync" else "")
        out.append((name, f"{r['pipeline_schedule']} + {r['optimizer']}, DP {r['dp_averaging']}",
                    _fmt(r["final_val_loss"]), _fmt(r["consensus_val_loss"]), gap,
                    _fmt(r["tokens_per_s"], ".0f"),
                    _fmt(r["dp_bytes_per_step"] and r["dp_bytes_per_step"] / 1e6, ".3f"),
                    _fmt(r["pp_bytes_per_step"] / 1e6, ".3f"),
                    _fmt(r["stage_utilization"], ".2f")))
    return format_table(out, (
        "run", "schedule + optimizer, data axis", "val loss (per replica mean)",
        "consensus val loss", "vs sync", "tokens/s", "data-axis MB/step/rank",
        "pipeline-axis MB/step/boundary", "stage utilisation"))


def plot_comparison(rows: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_asyncmesh.metrics import read_metrics

    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, r), color in zip(rows.items(), ("tab:blue", "tab:red", "tab:green")):
        train, val = read_metrics(r["run_dir"])
        ax.plot([x["step"] for x in train], [x["loss"] for x in train], color=color, lw=0.6,
                alpha=0.4)
        ax.plot([x["step"] for x in val], [x["val_loss"] for x in val], color=color, marker="o",
                ms=3, label=f"{name}: val loss")
        cons = [(x["step"], x["consensus_val_loss"]) for x in val
                if x.get("consensus_val_loss") is not None]
        if cons:
            ax.plot(*zip(*cons), color=color, ls="--", marker="x", ms=4,
                    label=f"{name}: consensus val loss")
    ax.set_xlabel("step (equal tokens per step)")
    ax.set_ylabel("loss (thin: train)")
    ax.set_title("synchronous Megatron vs the asynchronous mesh, PP = 2 x DP = 2")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="asyncmesh-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=4, help="ranks to start (PP x DP)")
    parser.add_argument("--config", default=os.path.join(CONFIGS, "mesh.yaml"),
                        help="the mesh's config (default: the recommended recipe); the "
                             "synchronous run is the same config with both "
                             "synchronisations back")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS),
                        help="which runs to train (default: both)")
    parser.add_argument("--data-path", default=None,
                        help="a preprocessed corpus prefix (default: the bundled corpus, "
                             "built on first use)")
    parser.add_argument("--tokenizer-model", default=None,
                        help="its SentencePiece model (default: <data-path>.tokenizer.model)")
    parser.add_argument("--run-dir", default=None,
                        help="default: runs/demo-<date>-<time> in the current directory")
    args, train_args = parser.parse_known_args(argv)

    from megatron_asyncmesh.data.preprocess import ensure_bundled, tokenizer_path_for

    t0 = time.time()
    if args.data_path is None:
        args.data_path = ensure_bundled(log=lambda msg: print(f"[demo] {msg}", flush=True))
    args.tokenizer_model = args.tokenizer_model or tokenizer_path_for(args.data_path)
    print(f"[demo] corpus ready in {time.time() - t0:.0f} s: {args.data_path}", flush=True)
    root = args.run_dir or os.path.join("runs", time.strftime("demo-%Y%m%d-%H%M%S"))
    run_dirs = {}
    for name in args.runs:
        run_dirs[name] = os.path.join(root, name)
        code = _launch(name, args, train_args, run_dirs[name])
        if code != 0:
            print(f"[demo] {name} failed with exit code {code}", file=sys.stderr)
            return code
    rows = comparison(run_dirs)
    table = comparison_table(rows)
    with open(os.path.join(root, "comparison.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(root, "comparison.md"), "w") as f:
        f.write(table + "\n")
    plot_comparison(rows, os.path.join(root, "comparison.png"))
    print("\n" + table + "\n", flush=True)
    print(f"[demo] done in {time.time() - t0:.0f} s; outputs in {os.path.abspath(root)}: "
          f"comparison.md/.json/.png and one directory per run (metrics.jsonl, summary.json, "
          f"loss.png, tensorboard/)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
