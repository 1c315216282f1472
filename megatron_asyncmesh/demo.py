"""The default demo (``asyncmesh-demo``; ``bash launch/demo.sh`` sets up and runs it).

1. Prepares the bundled corpus (the interpreter's standard library) if it is
   not cached yet: SentencePiece tokenizer + Megatron ``.bin/.idx``.
2. Trains ``launch/configs/demo.yaml`` (a 4-layer GPT) on CPU with pipeline
   and data parallelism, PP = 2 x DP = 2, four ranks started by ``torchrun``.
3. Prints the final table; the run directory holds ``metrics.jsonl``,
   ``summary.json``, ``loss.png`` and ``tensorboard/``.

Extra arguments are passed to the trainer, e.g. ``--train-iters 50``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="asyncmesh-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=4, help="ranks to start (PP x DP)")
    parser.add_argument("--config", default=os.path.join(REPO, "launch", "configs", "demo.yaml"))
    parser.add_argument("--run-dir", default=None,
                        help="default: runs/demo-<date>-<time> in the current directory")
    args, train_args = parser.parse_known_args(argv)

    from megatron_asyncmesh.data.preprocess import ensure_bundled, tokenizer_path_for
    from megatron_asyncmesh.distributed import free_port

    t0 = time.time()
    prefix = ensure_bundled(log=lambda msg: print(f"[demo] {msg}", flush=True))
    run_dir = args.run_dir or os.path.join("runs", time.strftime("demo-%Y%m%d-%H%M%S"))

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "megatron_asyncmesh.train", "--config", args.config,
           "--data-path", prefix, "--tokenizer-model", tokenizer_path_for(prefix),
           "--run-dir", run_dir, *train_args]
    print(f"[demo] corpus ready in {time.time() - t0:.0f} s: {prefix}", flush=True)
    print(f"[demo] launching {args.nproc} CPU ranks: {' '.join(cmd[1:])}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    code = subprocess.call(cmd, env=env)
    if code != 0:
        print(f"[demo] training failed with exit code {code}", file=sys.stderr)
        return code
    print(f"[demo] done in {time.time() - t0:.0f} s; outputs in {os.path.abspath(run_dir)}: "
          f"metrics.jsonl, summary.json, loss.png, tensorboard/", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
