#!/usr/bin/env python
"""Time to target loss across slow links: the full mesh against synchronous Megatron and ZeRO-1.

Every rank of a PP = 2 x DP = 2 job (4 ranks) runs on its own emulated host (``--placement
rank``, the default): its own network namespace, one link to a bridge, shaped with
``tc tbf`` at ``--rates`` in both directions (``tools/shaped_net.py``). So every pipeline
link and every data-parallel link crosses two shaped hops, and nothing is faster than
the link. ``--placement replica`` puts each replica (both its stages) on one host, as a
replica of several GPUs inside one machine would be: only the data-parallel traffic
crosses the links. Ranks are started
directly with torchrun's environment variables (one process per host); the same model,
data and tokens per step in every run (``launch/configs/mesh.yaml``):

    sync    synchronous Megatron: Megatron's flush 1F1B + its gradient all-reduce, with
            the mesh's optimizer and hyperparameters (Muon, lr, schedule; no error
            feedback, nothing to correct)
    mesh    the full asynchronous mesh, mesh.yaml as it is (stash + Muon + error feedback,
            sparse ema averaging at mesh.yaml's fraction and delay); trains
            ``--mesh-steps-factor`` times as many steps (its own cosine schedule), so it
            can reach the target if it learns slower
    zero1   DeepSpeed ZeRO-1 data parallelism over the 4 ranks (DP = 4: DeepSpeed's
            engine here has no pipeline), torch AdamW (the engine's optimizer) at
            ``--zero1-lr`` on every tensor

``--model-flags`` changes the model or the batch of all three runs alike (e.g. fewer tokens
per step, so the gradients weigh more against this CPU's compute, as they do against a
GPU's).

The target is the sync run's final validation loss; the mesh is judged on its
consensus loss (the replicas' mean). The clock is the time spent in training steps
(``train_time_s`` of the evaluation lines: evaluations and start-up excluded, the same
for every run). A run that never reaches the target is reported by the loss it has at
the sync run's finishing time instead.

Output in ``--out``: results-{placement}.json / .md, time_to_target-{placement}.png. Finished runs are
reused when their arguments did not change (``--report`` rebuilds the table only).
Needs root (namespaces); without it the tool says so and exits 77.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from shaped_net import StarNetwork, unavailable  # noqa: E402

CONFIG = os.path.join(REPO, "launch", "configs", "mesh.yaml")
WORLD, REPLICAS = 4, 2
SYNC_FLAGS = ["--pipeline-schedule", "flush", "--dp-averaging", "none",
              "--delay-error-feedback", "0"]


def run_spec(name: str, steps: int, factor: float, zero1_lr: float, model_flags=()):
    """(entry module, flags) of one run. ``model_flags``: training flags every run takes
    (the model's shape and the batch: the same model and tokens in every run)."""
    common = ["--config", CONFIG, "--num-threads", "1", "--no-progress", "--eval-iters", "4",
              *model_flags]
    if name == "sync":
        flags = [*SYNC_FLAGS, "--train-iters", str(steps)]
        return "megatron_asyncmesh.train", [*common, *flags, *_evals(steps)]
    if name == "mesh":
        n = int(round(steps * factor))
        return "megatron_asyncmesh.train", [*common, "--train-iters", str(n), *_evals(n)]
    if name == "zero1":
        flags = ["--pipeline-model-parallel-size", "1", "--pipeline-schedule", "flush",
                 "--dp-averaging", "none", "--delay-error-feedback", "0", "--optimizer", "adam",
                 "--zero-stage", "1", "--lr", f"{zero1_lr:g}", "--min-lr", f"{zero1_lr / 10:g}",
                 # AdamW trains every tensor at --zero1-lr (not at mesh.yaml's Muon-side
                 # embedding / output lr)
                 "--decoupled-lr", f"{zero1_lr:g}", "--decoupled-min-lr", f"{zero1_lr / 10:g}",
                 "--train-iters", str(steps)]
        return "megatron_asyncmesh.train_deepspeed", [*common, *flags, *_evals(steps)]
    raise ValueError(name)


def _evals(steps: int) -> list:
    return ["--eval-interval", str(max(1, steps // 10))]


def hosts(placement: str) -> int:
    return WORLD if placement == "rank" else REPLICAS


def host_of(rank: int, name: str, placement: str) -> int:
    """The emulated host of ``rank``. ``rank``: one host per rank. ``replica``: one host
    per replica, its two stages side by side (only the data-parallel traffic crosses
    the links), following the rank order each run uses (``distributed.rank_order``):
    the mesh is replica-major (rank = stage + PP x replica), synchronous Megatron keeps
    its default (rank = replica + DP x stage); ZeRO-1 (DP = 4) puts two consecutive ranks
    on each host."""
    if placement == "rank":
        return rank
    if name == "sync":
        return rank % REPLICAS
    return rank // (WORLD // REPLICAS)


def run_one(net: StarNetwork, run_dir: str, name: str, entry: str, flags: list,
            placement: str, timeout: float) -> int:
    """Start every rank on its host with torchrun's variables; the first failure ends
    the others (as a launcher would). Returns the failing status, else 0."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, DS_ACCELERATOR="cpu",
               PYTHONWARNINGS="ignore")
    placed = [host_of(i, name, placement) for i in range(WORLD)]
    commands = []
    for i, host in enumerate(placed):
        local = [r for r in range(WORLD) if placed[r] == host]
        commands.append((host, [
            f"RANK={i}", f"WORLD_SIZE={WORLD}", f"LOCAL_RANK={local.index(i)}",
            f"LOCAL_WORLD_SIZE={len(local)}", f"MASTER_ADDR={net.addr(placed[0])}",
            "MASTER_PORT=29810", sys.executable, "-m", entry, *flags, "--run-dir", run_dir]))
    return net.run(commands, run_dir, env, timeout)


def curve(run_dir: str, name: str) -> list:
    """[(train seconds, step, loss)] at every evaluation (the mesh: consensus loss)."""
    from megatron_asyncmesh.metrics import read_metrics

    _, val = read_metrics(run_dir)
    key = "consensus_val_loss" if name == "mesh" else "val_loss"
    return [(v["train_time_s"], v["step"], v[key] if v.get(key) is not None else v["val_loss"])
            for v in val]


def time_to(points: list, target: float):
    """Seconds until the loss first reaches ``target`` (linear between evaluations)."""
    for (t0, _, l0), (t1, _, l1) in zip(points, points[1:]):
        if l1 <= target:
            if l0 <= target or l0 == l1:
                return t1 if l0 > target else t0
            return t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return None


def loss_at(points: list, seconds: float):
    """The loss at ``seconds`` of training (linear between evaluations); None past the end."""
    for (t0, _, l0), (t1, _, l1) in zip(points, points[1:]):
        if t0 <= seconds <= t1:
            return l0 + (l1 - l0) * (seconds - t0) / (t1 - t0) if t1 > t0 else l1
    return None


def summarize(run_dir: str, name: str) -> dict:
    with open(os.path.join(run_dir, "summary.json")) as f:
        s = json.load(f)
    points = curve(run_dir, name)
    return {"curve": points, "train_iters": s["train_iters"],
            "final_loss": points[-1][2], "final_val_loss": s["final_val_loss"],
            "consensus_val_loss": s.get("consensus_val_loss"),
            "train_seconds": points[-1][0], "tokens_per_s": s.get("tokens_per_s")}


def report(out: str, results: dict, placement: str = "rank", model_flags: str = "") -> str:
    where = ("4 emulated hosts, one per rank: every pipeline and data-parallel link shaped"
             if placement == "rank" else "2 emulated hosts, one per replica: the "
             "data-parallel traffic crosses the shaped links, the pipeline stays inside")
    model = f"mesh.yaml with `{model_flags}`" if model_flags else "mesh.yaml"
    lines = [f"# Time to target loss across shaped links (PP 2 x DP 2; {where})", "",
             f"Model and batch: {model}.", "",
             "Target: the sync run's final validation loss. The clock: seconds in training "
             "steps. The mesh is judged on its consensus (replica-mean) loss.", "",
             "| link | run | steps | final loss | seconds to target | speed-up vs sync | "
             "loss at sync's finish | tokens/s |", "|---|---|---|---|---|---|---|---|"]
    for rate, runs in results.items():
        sync = runs.get("sync")
        target = sync["final_loss"] if sync else None
        t_sync = sync["train_seconds"] if sync else None
        for name, r in runs.items():
            tt = time_to(r["curve"], target) if target is not None else None
            speed = f"{t_sync / tt:.2f}x" if tt and t_sync else ("not reached" if target else "")
            at = loss_at(r["curve"], t_sync) if t_sync else None
            r.update(target=target, seconds_to_target=tt, loss_at_sync_finish=at)
            lines.append(f"| {rate} | {name} | {r['train_iters']} | {r['final_loss']:.4f} | "
                         f"{f'{tt:.0f}' if tt else 'not reached'} | {speed} | "
                         f"{f'{at:.4f}' if at is not None else 'ran shorter'} | "
                         f"{r['tokens_per_s'] or 0:.0f} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, f"results-{placement}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, f"results-{placement}.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(out, results, placement)
    return text


def plot(out: str, results: dict, placement: str = "rank") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        return
    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.8), squeeze=False)
    for ax, (rate, runs) in zip(axes[0], results.items()):
        for name, r in runs.items():
            t, _, loss = zip(*r["curve"])
            ax.plot(t, loss, "-o", ms=3, label=name)
        if "sync" in runs:
            ax.axhline(runs["sync"]["final_loss"], color="gray", ls=":", lw=1, label="target")
        ax.set_title(f"validation loss against training time, {rate} links")
        ax.set_xlabel("seconds in training steps")
        ax.set_ylabel("validation loss (mesh: consensus)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"time_to_target-{placement}.png"), dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench_link")
    p.add_argument("--rates", nargs="+", default=["100mbit", "1gbit"])
    p.add_argument("--steps", type=int, default=100, help="sync and zero1 training steps")
    p.add_argument("--mesh-steps-factor", type=float, default=2.0)
    p.add_argument("--zero1-lr", type=float, default=2e-3)
    p.add_argument("--placement", choices=["rank", "replica"], default="rank",
                   help="rank: every rank its own host, every pipeline and data-parallel "
                        "link shaped; replica: one host per replica (its stages on one "
                        "machine), only the data-parallel traffic crosses the links")
    p.add_argument("--runs", nargs="+", choices=["sync", "mesh", "zero1"],
                   default=["sync", "mesh", "zero1"])
    p.add_argument("--only", nargs="+", choices=["sync", "mesh", "zero1"])
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    p.add_argument("--model-flags", default="",
                   help="training flags for every run, on top of mesh.yaml (one string), "
                        "e.g. '--hidden-size 512 --micro-batch-size 1 --global-batch-size 8': "
                        "a model whose gradients weigh more against its compute, as on GPUs")
    p.add_argument("--report", action="store_true", help="only rebuild the table and plot")
    a = p.parse_args(argv)
    from megatron_asyncmesh.metrics import (bench_run_is_current, finish_bench_run,
                                            start_bench_run)

    reason = unavailable()
    if reason and not a.report:
        print(f"bench_link skipped: {reason}", flush=True)
        return 77
    os.makedirs(a.out, exist_ok=True)
    results: dict = {}
    for rate in a.rates:
        results[rate] = results_rate = {}
        for name in a.runs:
            entry, flags = run_spec(name, a.steps, a.mesh_steps_factor, a.zero1_lr,
                                    shlex.split(a.model_flags))
            manifest = [entry, *flags, f"--link={rate}", f"--placement={a.placement}"]
            run_dir = os.path.join(a.out, "runs", f"{rate}-{a.placement}-{name}")
            if a.report or (a.only and name not in a.only):
                if bench_run_is_current(run_dir, manifest):
                    results_rate[name] = summarize(run_dir, name)
                continue
            if start_bench_run(run_dir, manifest, f"{rate} {name}"):
                t0 = time.time()
                with StarNetwork(hosts(a.placement), rate) as net:
                    rc = run_one(net, run_dir, name, entry, flags, a.placement, a.timeout)
                finish_bench_run(run_dir, manifest, rc, f"{rate} {name}", t0)
            results_rate[name] = summarize(run_dir, name)
    print(report(a.out, results, a.placement, a.model_flags))
    return 0


if __name__ == "__main__":
    sys.exit(main())
