#!/usr/bin/env python
"""The one-command GPU check: what a user's bf16 path costs on one GPU.

On a GPU (sized for one H200 in under 8 minutes, data preparation included)::

    python tools/gpu_check.py --out runs/gpu_check

1. bf16 training of ``launch/configs/gpt-125m.yaml`` (one GPU: PP = 1) under ``flush``,
   ``2bw`` and ``stash``: ms per step, tokens/s, model FLOPs utilisation (6 N tokens/s
   over the GPU's dense bf16 peak), peak device memory, weight copies held by the
   version store and their bytes;
2. one optimizer step of nadamw, Muon and SOAP against AdamW on the same model
   (``tools/bench_optimizer_step.py``);
3. the sparse averager alone against a fused AdamW step (``tools/bench_averager.py``).

Writes ``results.json`` and ``results.md``. ``--dry-run`` runs the same path on the CPU
with the tiny config, a few steps each (the test suite does, so the check cannot rot;
its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}   # dense, per GPU
MODES = ("flush", "2bw", "stash")


def _run(cmd, log: str, timeout: float) -> None:
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                              timeout=timeout, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if proc.returncode != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}) after "
                           f"{time.time() - t0:.0f} s:\n{tail}")


def peak_flops() -> tuple:
    import torch

    if not torch.cuda.is_available():
        return None, None
    name = torch.cuda.get_device_name()
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return name, flops
    return name, None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/gpu_check")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny config, a few steps: checks the path, not the speed")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--data-path", default=None)
    parser.add_argument("--tokenizer-model", default=None)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    config = os.path.join(REPO, "launch", "configs",
                          "tiny.yaml" if args.dry_run else "gpt-125m.yaml")
    steps = args.steps or (3 if args.dry_run else 30)
    data = []
    if args.data_path:
        data = ["--data-path", args.data_path]
    if args.tokenizer_model:
        data += ["--tokenizer-model", args.tokenizer_model]
    device, flops = peak_flops()
    results = {"device": device or "cpu", "dry_run": args.dry_run, "config": config,
               "steps": steps, "training": {}}
    for mode in MODES:
        run_dir = os.path.join(args.out, f"train_{mode}")
        _run([sys.executable, "-m", "megatron_asyncmesh.train", "--config", config, "--bf16",
              "--pipeline-schedule", mode, "--train-iters", str(steps),
              "--lr-warmup-iters", "1", "--eval-iters", "0", "--eval-interval", str(steps),
              "--no-progress", "--run-dir", run_dir, *data],
             os.path.join(args.out, f"train_{mode}.log"), timeout=600)
        with open(os.path.join(run_dir, "summary.json")) as f:
            s = json.load(f)
        cfg = s["config"]
        tokens_per_step = cfg["global_batch_size"] * cfg["seq_length"]
        tok_s = s["steady_tokens_per_s"] or s["tokens_per_s"]
        rank = s["per_rank"][0]
        versions = (s["pipeline"][0].get("weight_versions") or {})
        copies = versions.get("peak_weight_copies", 1)
        results["training"][mode] = {
            "ms_per_step": 1e3 * tokens_per_step / tok_s if tok_s else None,
            "tokens_per_s": tok_s,
            "mfu": 6 * s["parameters"] * tok_s / flops if flops and tok_s else None,
            "parameters": s["parameters"],
            "peak_device_memory_mb": rank.get("peak_device_memory_mb"),
            "weight_copies": copies,
            "weight_copies_mb": copies * 2 * s["parameters"] / 2 ** 20,     # bf16
            "device_synchronizations_in_steps": rank["device_synchronizations_in_steps"],
            "final_train_loss": s["final_train_loss"]}
    opt_dir = os.path.join(args.out, "optimizer_step")
    _run([sys.executable, os.path.join(REPO, "tools", "bench_optimizer_step.py"), "--config",
          config, "--out", opt_dir, *(["--rounds", "1", "--steps", "1", "--vocab", "1024"]
                                      if args.dry_run else [])],
         os.path.join(args.out, "optimizer_step.log"), timeout=600)
    with open(os.path.join(opt_dir, "results.json")) as f:
        results["optimizer_step"] = json.load(f)
    avg_dir = os.path.join(args.out, "averager")
    _run([sys.executable, os.path.join(REPO, "tools", "bench_averager.py"), "--out", avg_dir,
          "--sizes", *(["tiny"] if args.dry_run else ["125m"]),
          "--steps", "25" if args.dry_run else "60"],
         os.path.join(args.out, "averager.log"), timeout=600)
    with open(os.path.join(avg_dir, "results.json")) as f:
        results["averager"] = json.load(f)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    lines = [f"GPU check on {results['device']} ({'dry run' if args.dry_run else 'bf16'}, "
             f"{os.path.basename(config)}, {steps} steps per mode)", "",
             "| schedule | ms/step | tokens/s | MFU | peak memory (MB) | weight copies (MB) |"
             " syncs in steps |", "|---|---|---|---|---|---|---|"]
    for mode, r in results["training"].items():
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.3f}"
        lines.append(
            f"| {mode} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:.0f} | {mfu} | "
            f"{r['peak_device_memory_mb'] or 'n/a'} | {r['weight_copies']} "
            f"({r['weight_copies_mb']:.0f}) | {r['device_synchronizations_in_steps']} |")
    lines += ["", "Optimizer step vs AdamW:", ""]
    lines += [f"- {name}: {r['ratio_to_adamw']:.2f}x ({r['median_ms']:.1f} ms)"
              for name, r in results["optimizer_step"]["methods"].items()]
    a = results["averager"][0]
    lines += ["", f"Sparse averager (p 0.05, tau 10, ema) at {a['parameters'] / 1e6:.1f} M "
              f"parameters: mean {a['mean_ratio']:.3f}x, max {a['max_ratio_to_mean_adamw']:.3f}x "
              f"of an AdamW step; {a['state_bytes_per_parameter']:.1f} B/parameter of state."]
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
