"""Many short training runs in one launch (launched by torchrun, 4 ranks).

Each job is a list of training flags; every job runs the real entry point's run
(``runner.loop.run`` with the Megatron engine) for a few steps on the same process
group, one after the other. Rank 0 writes, per job, whether it trained, its per-step
losses and the device synchronisations each rank asked for inside training steps (the
CPU layer counts them), or the error that stopped it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import megatron_asyncmesh  # noqa: F401  (CPU layer first)
import torch.distributed as dist


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", required=True, help="JSON: {name: [flags...]}")
    parser.add_argument("--out", required=True)
    parser.add_argument("--run-root", required=True)
    args = parser.parse_args()
    from megatron.core import parallel_state

    from megatron_asyncmesh import distributed as mdist
    from megatron_asyncmesh.config import parse_config
    from megatron_asyncmesh.metrics import read_metrics
    from megatron_asyncmesh.runner import loop
    from megatron_asyncmesh.runner.megatron import MegatronEngine

    # One process group for all jobs: the run's own shutdown would end it.
    def keep_group() -> None:
        parallel_state.destroy_model_parallel()

    mdist.shutdown = keep_group
    loop.mdist.shutdown = keep_group
    mdist.init_distributed()
    results = {}
    for name, flags in json.loads(args.jobs).items():
        run_dir = os.path.join(args.run_root, name)
        try:
            summary = loop.run(parse_config([*flags, "--run-dir", run_dir, "--no-progress"]),
                               MegatronEngine)
            losses = ([r["loss"] for r in read_metrics(run_dir)[0]]
                      if dist.get_rank() == 0 else None)
            results[name] = {"ok": True, "losses": losses,
                             "syncs": [r["device_synchronizations_in_steps"]
                                       for r in summary["per_rank"]],
                             "weight_copies": [
                                 (p.get("weight_versions") or {}).get("peak_weight_copies")
                                 for p in summary["pipeline"]]}
        except Exception as exc:          # recorded; the next job starts clean
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                             "trace": traceback.format_exc()[-1500:]}
            parallel_state.destroy_model_parallel()
            from megatron_asyncmesh.pipeline import install

            install.unpatch()
        dist.barrier()
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
