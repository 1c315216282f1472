#!/usr/bin/env python
"""What checkpoint integrity costs: save + verify + load with and without checksums.

For each data-parallel size (fresh processes each time, Megatron's synchronous data
parallelism, the named config in fp32 on the CPU): one training step with ``--save``,
then a second launch that ``--load``s it; the save time (``checkpoint_save_s``) and the
load time (``checkpoint_load_s``, the slowest rank; verification included) come from
``summary.json``. The same pair runs with ``ASYNCMESH_CHECKSUMS=0`` (sizes checked, no
hashing). Every rank hashes only its share of the bytes, so the ratio must not grow
with the ranks.

    python tools/bench_checkpoint.py --out runs/bench_checkpoint              # 125 M, DP 2 and 4

Writes results.json and results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def launch(nproc: int, args: list, env: dict, log: str) -> dict:
    from megatron_asyncmesh.distributed import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "megatron_asyncmesh.train", *args]
    with open(log, "w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                               env=dict(os.environ, OMP_NUM_THREADS="1",
                                        PYTHONWARNINGS="ignore", **env))
    if code:
        raise RuntimeError(f"exit {code}; see {log}")
    run_dir = args[args.index("--run-dir") + 1]
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=os.path.join(REPO, "launch", "configs", "gpt-125m.yaml"))
    p.add_argument("--dp", type=int, nargs="+", default=[2, 4])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", default="runs/bench_checkpoint")
    p.add_argument("extra", nargs="*", help="more training flags (e.g. --data-path P)")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    base = ["--config", a.config, "--bf16", "false", "--micro-batch-size", "1",
            "--seq-length", "128", "--lr-warmup-iters", "0", "--eval-iters", "0",
            "--no-progress", *a.extra]
    rows = []
    for dp in a.dp:
        for rnd in range(a.rounds):
            for checks in ("1", "0"):
                tag = f"dp{dp}_checksums{checks}_r{rnd}"
                ckpt = os.path.join(a.out, tag, "ckpt")
                shutil.rmtree(os.path.join(a.out, tag), ignore_errors=True)
                env = {"ASYNCMESH_CHECKSUMS": checks}
                t0 = time.time()
                gb = ["--global-batch-size", str(dp)]
                saved = launch(dp, [*base, *gb, "--train-iters", "1", "--save", ckpt,
                                    "--run-dir", os.path.join(a.out, tag, "save")], env,
                               os.path.join(a.out, f"{tag}_save.log"))
                loaded = launch(dp, [*base, *gb, "--train-iters", "2", "--load", ckpt,
                                     "--run-dir", os.path.join(a.out, tag, "load")], env,
                                os.path.join(a.out, f"{tag}_load.log"))
                size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(ckpt)
                           for f in fs)
                row = {"dp": dp, "checksums": checks == "1", "round": rnd,
                       "parameters": saved["parameters"], "checkpoint_bytes": size,
                       "save_s": saved["checkpoints"][-1]["checkpoint_save_s"],
                       "load_s": max(loaded["checkpoint_load_s"]),
                       "wall_s": time.time() - t0}
                rows.append(row)
                print(json.dumps(row), flush=True)
                shutil.rmtree(ckpt, ignore_errors=True)      # GBs each
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    lines = ["| DP | checkpoint | save + load with checksums (s) | without (s) | ratio |",
             "|---|---|---|---|---|"]
    for dp in a.dp:
        on = [r for r in rows if r["dp"] == dp and r["checksums"]]
        off = [r for r in rows if r["dp"] == dp and not r["checksums"]]
        t_on = sum(r["save_s"] + r["load_s"] for r in on) / len(on)
        t_off = sum(r["save_s"] + r["load_s"] for r in off) / len(off)
        lines.append(f"| {dp} | {on[0]['checkpoint_bytes'] / 2 ** 30:.2f} GiB | {t_on:.1f} | "
                     f"{t_off:.1f} | {t_on / t_off:.2f} |")
    text = (f"Checkpoint save + verify + load, {os.path.basename(a.config)} "
            f"({rows[0]['parameters'] / 1e6:.0f} M parameters, fp32, AdamW), fresh "
            f"processes, {a.rounds} round(s):\n\n" + "\n".join(lines) + "\n")
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
