#!/usr/bin/env python
"""Benchmark the pipeline schedules: measured on this machine, projected by the simulator.

Measured: PP = 2, one CPU thread per rank (each stage on its own core), the
bundled corpus, a GPT of 17 layers x 256 split 9/8 so the stages balance
(the last stage also runs the 4096-way output layer and its cross entropy,
measured at ~1.4 transformer layers: 9 vs 8 + 1.4 keeps the stages within
~5 %; a 7/5 split of 12 layers left stage 0 9 % slower and stage 1 idle
waiting for it). For each M in
{2, 4, 8}, ``flush`` (Megatron's own 1F1B: ``--pipeline-schedule flush``
calls Megatron's function unmodified), ``2bw`` and ``stash`` are run
interleaved (mode order rotates every round) so machine noise hits all
alike. tokens/s are steady-state (rank 0's steps that are not the first of
the run nor a pipeline warm-up or drain: the no-flush pipeline drains only
at the end of training); whole-run tokens/s are in results.json. Reported side by side with the
theoretical ratio (M + P - 1) / M, per-stage steady utilization and
measured gradient delay, and peak RSS per stage.

Projected: the simulator, with the measured per-microbatch forward/backward
times, for P in {4, 8, 16, 32, 64}, on a fast link and on a 100 Mbit/s link
(activation [s, b, h] fp32 per hop), with weight-version and activation
memory per stage.

    python tools/bench_pipeline.py --out runs/bench_pipeline          # ~8 min
    python tools/bench_pipeline.py --out /tmp/bp --rounds 1 --steps 6 # quick

Writes results.json, results.md, timeline_<mode>_M4.png (measured) and
sim_timeline_<mode>_P4.png (simulated).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MODEL = ["--num-layers", "17", "--hidden-size", "256", "--num-attention-heads", "4",
         "--seq-length", "128", "--micro-batch-size", "2",
         "--untie-embeddings-and-output-weights",
         "--decoder-first-pipeline-num-layers", "9", "--decoder-last-pipeline-num-layers", "8"]
MODES = ("flush", "2bw", "stash")
# glibc malloc keeps freed memory instead of unmapping every large tensor and page-faulting
# it back on the next microbatch (the CPU analogue of a caching allocator; PyTorch's CPU
# tuning guide recommends jemalloc/tcmalloc for the same reason). Without it, bursts of
# page faults made single forwards 60 % slower at random and the ratios measured noise.
# Set for every mode alike.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 32),
              "MALLOC_TOP_PAD_": str(1 << 29)}


def run_one(out_dir: str, mode: str, M: int, steps: int, tag: str) -> dict:
    from megatron_asyncmesh.distributed import free_port

    run_dir = os.path.join(out_dir, "runs", tag)
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "megatron_asyncmesh.train", *MODEL,
           "--global-batch-size", str(2 * M), "--train-iters", str(steps),
           "--eval-iters", "0", "--eval-interval", str(10 * steps), "--lr-warmup-iters", "1",
           "--pipeline-model-parallel-size", "2", "--pipeline-schedule", mode,
           "--num-threads", "1", "--run-dir", run_dir, "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, **MALLOC_ENV)
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} M={M} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(os.path.join(run_dir, "summary.json")) as f:
        s = json.load(f)
    f_ms, b_ms = compute_times(run_dir)
    return {"mode": mode, "M": M, "tokens_per_s": s["steady_tokens_per_s"],
            "run_tokens_per_s": s["tokens_per_s"],
            "stage_utilization": s["stage_utilization"], "stage_delay": s["stage_delay"],
            "peak_rss_mb": s["peak_rss_mb"], "forward_ms": f_ms, "backward_ms": b_ms,
            "wall_s": time.time() - t0, "run_dir": run_dir}


def compute_times(run_dir: str):
    """Median forward / backward time per microbatch of each stage (ms)."""
    f_ms, b_ms = [], []
    for r in range(2):
        with open(os.path.join(run_dir, "timeline", f"rank{r}.json")) as f:
            d = json.load(f)
        iv = d["intervals"]
        f_ms.append(1000 * statistics.median(i["end"] - i["start"] for i in iv if i["kind"] == "F"))
        b_ms.append(1000 * statistics.median(i["end"] - i["start"] for i in iv if i["kind"] == "B"))
    return f_ms, b_ms


def project(fwd_ms: float, bwd_ms: float, seq: int = 128, mb: int = 2, hidden: int = 256):
    """Simulator projections for deeper pipelines (uniform stages)."""
    from megatron_asyncmesh.pipeline.simulate import Costs, simulate

    act_bytes = seq * mb * hidden * 4
    links = {"fast": dict(latency=0.0, bandwidth=None),
             # 100 Mbit/s = 12.5 MB/s = 12.5 kB per ms; 0.5 ms latency
             "100Mbit": dict(latency=0.5, bandwidth=12.5e3)}
    rows = []
    for P in (4, 8, 16, 32, 64):
        for M in (P, 4 * P):
            for link, kw in links.items():
                res = {}
                for mode in MODES:
                    c = Costs.uniform(P, fwd_ms, bwd_ms, activation_bytes=act_bytes, **kw)
                    r = simulate(mode, P, M, num_steps=6, costs=c)
                    res[mode] = r
                rows.append({
                    "P": P, "M": M, "link": link,
                    "step_ms": {m: res[m].steady_step_time() for m in MODES},
                    "speedup_2bw_vs_flush": res["flush"].steady_step_time()
                    / res["2bw"].steady_step_time(),
                    "speedup_stash_vs_flush": res["flush"].steady_step_time()
                    / res["stash"].steady_step_time(),
                    "theory": (M + P - 1) / M,
                    "min_utilization": {m: min(res[m].steady_utilization()) for m in MODES},
                    "weight_versions_stage0": {m: res[m].peak_weight_versions[0] for m in MODES},
                    "activations_stage0": {m: res[m].peak_activations[0] for m in MODES}})
    return rows


def markdown(measured, projections, out_dir) -> str:
    lines = ["# Pipeline schedules: PP = 2 on this machine (1 thread per stage)", "",
             "| M | mode | tokens/s | ratio vs flush | theory (M+P-1)/M | >= 0.95 x theory | "
             "steady util. stage 0 / 1 | delay mean stage 0 / 1 | peak RSS MB stage 0 / 1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for M in sorted({r["M"] for r in measured}):
        agg = aggregate(measured, M)
        theory = (M + 1) / M
        for mode in MODES:
            a = agg[mode]
            ratio = a["tokens_per_s"] / agg["flush"]["tokens_per_s"]
            ok = "" if mode == "flush" else ("yes" if ratio >= 0.95 * theory else "NO")
            lines.append(
                f"| {M} | {mode} | {a['tokens_per_s']:.0f} | {ratio:.3f} | "
                f"{theory if mode != 'flush' else 1:.3f} | {ok} | "
                f"{a['util'][0]:.3f} / {a['util'][1]:.3f} | "
                f"{a['delay'][0]:.2f} / {a['delay'][1]:.2f} | "
                f"{a['rss'][0]:.0f} / {a['rss'][1]:.0f} |")
    lines += ["", "tokens/s: steady state, mean over rounds (interleaved); utilization: busy (forward, "
              "backward, optimizer step) / wall time of steps that are not warm-up, drain or "
              "the first step.", "",
              "# Simulator projections (measured per-microbatch times, uniform stages)", "",
              "| P | M | link | flush step ms | 2bw step ms | speedup 2bw | theory | "
              "min util flush / 2bw / stash | weight versions stage 0 (2bw / stash) | "
              "in-flight activations stage 0 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in projections:
        lines.append(
            f"| {r['P']} | {r['M']} | {r['link']} | {r['step_ms']['flush']:.0f} | "
            f"{r['step_ms']['2bw']:.0f} | {r['speedup_2bw_vs_flush']:.3f} | {r['theory']:.3f} | "
            f"{r['min_utilization']['flush']:.3f} / {r['min_utilization']['2bw']:.3f} / "
            f"{r['min_utilization']['stash']:.3f} | {r['weight_versions_stage0']['2bw']} / "
            f"{r['weight_versions_stage0']['stash']} | {r['activations_stage0']['2bw']} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(text)
    return text


def aggregate(measured, M):
    out = {}
    for mode in MODES:
        rs = [r for r in measured if r["M"] == M and r["mode"] == mode]
        out[mode] = {
            "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in rs),
            "util": [statistics.mean((r["stage_utilization"][str(k)] or 0) for r in rs)
                     for k in range(2)],
            "delay": [statistics.mean((r["stage_delay"][str(k)]["mean"] or 0) for r in rs)
                      for k in range(2)],
            "rss": [max(r["peak_rss_mb"][k] for r in rs) for k in range(2)]}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench_pipeline")
    p.add_argument("--microbatches", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    from megatron_asyncmesh.pipeline.simulate import Costs, plot_timeline, simulate

    measured = []
    total = len(a.microbatches) * len(MODES) * a.rounds
    for rnd in range(a.rounds):
        for M in a.microbatches:
            order = MODES[rnd % 3:] + MODES[:rnd % 3]
            for mode in order:
                r = run_one(a.out, mode, M, a.steps, f"{mode}-M{M}-r{rnd}")
                r["round"] = rnd
                measured.append(r)
                print(f"[{len(measured)}/{total}] M={M} {mode:5s} {r['tokens_per_s']:.0f} tok/s "
                      f"util {r['stage_utilization']} ({r['wall_s']:.0f} s)", flush=True)
    for mode in MODES:
        src = os.path.join(a.out, "runs", f"{mode}-M4-r0", "timeline.png")
        if os.path.exists(src):
            shutil.copy(src, os.path.join(a.out, f"timeline_{mode}_M4.png"))
    flush4 = [r for r in measured if r["mode"] == "flush"]
    fwd = statistics.mean(statistics.mean(r["forward_ms"]) for r in flush4)
    bwd = statistics.mean(statistics.mean(r["backward_ms"]) for r in flush4)
    projections = project(fwd, bwd)
    for mode in MODES:
        r = simulate(mode, 4, 8, 3, Costs.uniform(4, fwd, bwd))
        plot_timeline(r.intervals, os.path.join(a.out, f"sim_timeline_{mode}_P4.png"),
                      f"simulated {mode}: P=4, M=8", 4, "ms")
    results = {"measured": measured, "per_microbatch_ms": {"forward": fwd, "backward": bwd},
               "projections": projections, "model": MODEL}
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(markdown(measured, projections, a.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
