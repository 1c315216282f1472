#!/usr/bin/env python
"""Cost of the sparse averager alone against a fused AdamW step on the same tensors.

For each model size (GPT-shaped parameter lists from the named configs: 25 M, 125 M,
350 M by default) the tensors are made on the device (CUDA if present), and every step
times one AdamW step (``fused=True`` on CUDA, ``foreach`` on CPU) and one averager step
(``SparseAverager`` with p = 0.05, tau = 10, ema, the block selector by default,
``--selectors block partition`` to compare) over a one-rank group, so no network is involved: what is left is the averager's own work
(selection, gather, scatter, EMA), which is what must stay proportional to what it
sends. Reported: mean and max ms of each, their ratios, how often the selector drew a
cycle's permutations, and the averager's state in bytes per parameter.

    python tools/bench_averager.py --out runs/bench_averager
    python tools/bench_averager.py --sizes tiny --steps 30 --out /tmp/b     # seconds

Writes results.json and results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# name -> (layers, hidden, vocab): GPT-2 small-ish shapes of launch/configs/.
SIZES = {"tiny": (2, 64, 1024), "25m": (6, 384, 50257), "125m": (12, 768, 50257),
         "350m": (24, 1024, 50257)}


def gpt_tensors(layers: int, hidden: int, vocab: int, device) -> list:
    import torch

    shapes = [("embedding.word_embeddings.weight", (vocab, hidden)),
              ("embedding.position_embeddings.weight", (1024, hidden))]
    for i in range(layers):
        p = f"decoder.layers.{i}."
        shapes += [(p + "self_attention.linear_qkv.weight", (3 * hidden, hidden)),
                   (p + "self_attention.linear_qkv.bias", (3 * hidden,)),
                   (p + "self_attention.linear_proj.weight", (hidden, hidden)),
                   (p + "self_attention.linear_proj.bias", (hidden,)),
                   (p + "mlp.linear_fc1.weight", (4 * hidden, hidden)),
                   (p + "mlp.linear_fc1.bias", (4 * hidden,)),
                   (p + "mlp.linear_fc2.weight", (hidden, 4 * hidden)),
                   (p + "mlp.linear_fc2.bias", (hidden,)),
                   (p + "input_layernorm.weight", (hidden,)),
                   (p + "input_layernorm.bias", (hidden,)),
                   (p + "pre_mlp_layernorm.weight", (hidden,)),
                   (p + "pre_mlp_layernorm.bias", (hidden,))]
    shapes.append(("decoder.final_layernorm.weight", (hidden,)))
    g = torch.Generator(device="cpu").manual_seed(0)
    return [(n, torch.nn.Parameter(torch.randn(s, generator=g).mul_(0.02).to(device)))
            for n, s in shapes]


class OneRank:
    """A one-rank group: no network, the averager's own work only."""

    @staticmethod
    def get_world_size(group=None):
        return 1


def measure(size: str, steps: int, fraction: float, delay: int, selector: str = "block",
            block_size: int = 1024) -> dict:
    import torch

    from megatron_asyncmesh.dataparallel.averaging import AveragingConfig, SparseAverager

    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    params = gpt_tensors(*SIZES[size], device)
    numel = sum(p.numel() for _, p in params)
    for _, p in params:
        p.grad = torch.randn_like(p).mul_(1e-3)
    adam = torch.optim.AdamW([p for _, p in params], lr=1e-4,
                             **({"fused": True} if cuda else {"foreach": True}))
    avg = SparseAverager(params, AveragingConfig(fraction=fraction, delay=delay,
                                                 correction="ema", ema_start=0,
                                                 selector=selector, block_size=block_size,
                                                 train_iters=steps), comm=OneRank())

    def timed(fn) -> float:
        if cuda:
            torch.cuda.synchronize()        # measurement only: the bench is not training
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3

    adam_ms, avg_ms = [], []
    for i in range(steps + 2):
        a, b = timed(adam.step), timed(avg.step)
        if i >= 2:                           # the first steps allocate state
            adam_ms.append(a)
            avg_ms.append(b)
    return {"size": size, "selector": selector,
            "block_size": block_size if selector == "block" else None,
            "parameters": numel, "device": str(device), "steps": steps,
            "fraction": fraction, "delay": delay,
            "adamw_mean_ms": statistics.mean(adam_ms), "adamw_max_ms": max(adam_ms),
            "averager_mean_ms": statistics.mean(avg_ms), "averager_max_ms": max(avg_ms),
            "mean_ratio": statistics.mean(avg_ms) / statistics.mean(adam_ms),
            "max_ratio_to_mean_adamw": max(avg_ms) / statistics.mean(adam_ms),
            "selector_builds": avg.selector.builds,
            "cycles_started": (steps + 2 - 1) // avg.cfg.groups + 1,
            "state_bytes_per_parameter": avg.state_bytes_per_parameter(),
            "pending_bytes_per_parameter": avg.pending_bytes_per_parameter()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["25m", "125m", "350m"],
                        choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--delay", type=int, default=10)
    parser.add_argument("--selectors", nargs="+", default=["block"],
                        choices=["block", "partition", "bernoulli"])
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--out", default="runs/bench_averager")
    args = parser.parse_args(argv)
    import megatron_asyncmesh  # noqa: F401

    from megatron_asyncmesh.metrics import format_table

    os.makedirs(args.out, exist_ok=True)
    rows = []
    for size in args.sizes:
        for selector in args.selectors:
            r = measure(size, args.steps, args.fraction, args.delay, selector, args.block_size)
            rows.append(r)
            print(f"{size} {selector}: averager {r['averager_mean_ms']:.1f} ms (max "
                  f"{r['averager_max_ms']:.1f}) vs AdamW {r['adamw_mean_ms']:.1f} ms",
                  flush=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    table = format_table(
        [(r["size"], r["selector"] + (f" {r['block_size']}" if r["block_size"] else ""),
          f"{r['parameters'] / 1e6:.1f} M", r["device"],
          f"{r['adamw_mean_ms']:.1f}", f"{r['averager_mean_ms']:.1f}",
          f"{r['averager_max_ms']:.1f}", f"{r['mean_ratio']:.3f}",
          f"{r['max_ratio_to_mean_adamw']:.3f}",
          f"{r['selector_builds']} / {r['cycles_started']}",
          f"{r['state_bytes_per_parameter']:.1f}") for r in rows],
        ("model", "selector", "parameters", "device", "AdamW ms", "averager ms (mean)", "averager ms (max)",
         "mean / AdamW", "max / AdamW", "selector draws / cycles", "state B/param"))
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"Sparse averager (p = {args.fraction}, tau = {args.delay}, ema) "
                f"vs AdamW on the same tensors, {args.steps} steps:\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
