"""Run outputs: metrics.jsonl, summary.json, tensorboard events, a progress bar.

Only global rank 0 writes. Both engines write the same schema. ``metrics.jsonl`` has one
JSON object per line: training lines (:data:`TRAIN_KEYS`), evaluation lines
(:data:`EVAL_KEYS`) and checkpoint lines (:data:`CHECKPOINT_KEYS`); ``summary.json``
holds exactly :data:`SUMMARY_KEYS` (the run skeleton builds it).
"""

from __future__ import annotations

import json
import math
import os
import resource
from typing import Any, Dict, Optional


TRAIN_KEYS = ("step", "loss", "lr", "grad_norm", "step_time_s", "tokens_per_s",
              "dp_bytes_sent")
EVAL_KEYS = ("step", "val_loss", "val_ppl", "consensus_val_loss", "consensus_bytes",
             "train_time_s")
CHECKPOINT_KEYS = ("step", "checkpoint_save_s", "drain_step_s")
SUMMARY_KEYS = (
    "engine", "zero_stage", "final_val_loss", "consensus_val_loss", "final_average_bytes",
    "final_train_loss", "val_loss_history",
    "tokens_per_s", "steady_tokens_per_s", "train_iters", "start_iteration", "peak_rss_mb",
    "pipeline_model_parallel_size", "data_parallel_size", "num_microbatches",
    "pipeline_schedule", "stage_utilization", "stage_delay", "optimizer", "stage_optimizer",
    "checkpoints", "checkpoint_load_s", "dp_averaging", "dp_averaging_stats",
    "grad_all_reduce_bytes_per_step", "replica_grad_all_reduce_bytes_per_step",
    "comm_bytes_per_step", "per_rank", "pipeline",
    "parameters", "world_size", "launcher", "threads_per_rank", "wall_time_s", "device",
    "run_dir", "config")


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class RunWriter:
    def __init__(self, run_dir: str, total_steps: int, enabled: bool, progress: bool,
                 start_step: int = 0):
        self.enabled = enabled
        self.run_dir = run_dir
        self._jsonl = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a" if start_step else "w")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        except ImportError:  # tensorboard is in requirements.txt; tolerate its absence
            self._tb = None
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train",
                             dynamic_ncols=True, mininterval=1.0)

    def log(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        step = record["step"]
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(("val/" if key.startswith("val_") else "train/") + key,
                                        value, step)
        if self._bar is not None:
            if "loss" in record:
                self._bar.update(max(0, step - self._bar.n))
                self._bar.set_postfix(loss=f"{record['loss']:.3f}",
                                      tok_s=f"{record['tokens_per_s']:.0f}")
            elif "val_loss" in record:
                self._bar.write(f"step {step}: val_loss {record['val_loss']:.4f}")

    def progress(self, step: int) -> None:
        """Advance the bar for a step whose metrics are not reduced yet."""
        if self._bar is not None:
            self._bar.update(max(0, step - self._bar.n))

    def write_summary(self, summary: Dict[str, Any]) -> str:
        path = os.path.join(self.run_dir, "summary.json")
        if self.enabled:
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(summary, f, indent=2)
            os.replace(tmp, path)
        return path

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()


def format_table(rows, headers) -> str:
    """A small markdown table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    out = [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def final_table(summary: Dict[str, Any]) -> str:
    val = summary.get("val_loss_history") or []
    rows = [
        ("train_iters", summary.get("train_iters")),
        ("layout", f"PP={summary['pipeline_model_parallel_size']} x "
                   + (f"TP={tp} x " if (tp := (summary.get("config") or {}).get(
                       "tensor_model_parallel_size", 1)) > 1 else "")
                   + f"DP={summary['data_parallel_size']}"
                   + (f" ({r} ranks per replica)" if (r := (summary.get("config") or {}).get(
                       "dp_ranks_per_replica", 1)) > 1 else "")),
        ("first val_loss", f"{val[0]['val_loss']:.4f}" if val else "n/a"),
        ("final val_loss", _fmt(summary.get("final_val_loss"))),
        ("final train loss", _fmt(summary.get("final_train_loss"))),
        # None when no step was timed (a resumed run with one step left).
        ("tokens/s", "n/a" if summary.get("tokens_per_s") is None
         else f"{summary['tokens_per_s']:.0f}"),
        ("wall time (s)", f"{summary.get('wall_time_s', 0):.1f}"),
        ("peak RSS per rank (MB)", ", ".join(f"{x:.0f}" for x in summary.get("peak_rss_mb", []))),
        ("run dir", summary.get("run_dir")),
    ]
    return format_table(rows, ("metric", "value"))


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def read_metrics(run_dir: str):
    """metrics.jsonl -> (training records, evaluation records)."""
    train, val = [], []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "loss" in rec:
                train.append(rec)
            elif "val_loss" in rec:
                val.append(rec)
    return train, val


# --- benchmark runs (tools/bench_*.py): reused when made with the same arguments ---------
BENCH_MANIFEST = "bench_args.json"       # a run's arguments, written last: marks it done


def bench_run_is_current(run_dir: str, args: list) -> bool:
    """The run finished (summary.json and its manifest) with exactly these arguments."""
    manifest = os.path.join(run_dir, BENCH_MANIFEST)
    if not (os.path.exists(os.path.join(run_dir, "summary.json")) and os.path.exists(manifest)):
        return False
    with open(manifest) as f:
        return json.load(f) == args


def start_bench_run(run_dir: str, args: list, name: str) -> bool:
    """False when a finished run with the same arguments is there (reuse it); else an
    empty run directory is made and True returned."""
    import shutil

    if bench_run_is_current(run_dir, args):
        print(f"{name}: reusing {run_dir}", flush=True)
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    return True


def finish_bench_run(run_dir: str, args: list, returncode: int, name: str, t0: float) -> None:
    """Raise if the run failed; else write its manifest (last: a run without it is redone)."""
    import time

    if returncode != 0:
        raise RuntimeError(f"{name} failed (exit {returncode}); see {run_dir}/log.txt")
    with open(os.path.join(run_dir, BENCH_MANIFEST), "w") as f:
        json.dump(args, f)
    print(f"{name}: {time.time() - t0:.0f} s", flush=True)


def plot_losses(run_dir: str) -> Optional[str]:
    """loss.png: training loss and validation loss against steps."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_recs, val_recs = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in train_recs]
    val = [(r["step"], r["val_loss"]) for r in val_recs]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    out = os.path.join(run_dir, "loss.png")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
