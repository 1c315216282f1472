"""Many short training runs in one launch (launched by torchrun, 4 ranks).

Each job is a list of training flags; every job runs the real entry point's run
(``runner.loop.run`` with the Megatron engine) for a few steps on the same process
group, one after the other. Rank 0 writes, per job, whether it trained, its per-step
losses and the device synchronisations each rank asked for inside training steps (the
CPU layer counts them), or the error that stopped it; and, after each job, its wall
time, this rank's OS threads, process groups and resident memory, so the test sees a
process that piles up resources across runs (``COMBO_VERBOSE=1`` prints them per job).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import megatron_asyncmesh  # noqa: F401  (CPU layer first)
import torch.distributed as dist


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", required=True, help="JSON: {name: [flags...]}")
    parser.add_argument("--out", required=True)
    parser.add_argument("--run-root", required=True)
    args = parser.parse_args()
    from megatron_asyncmesh import distributed as mdist
    from megatron_asyncmesh.config import parse_config
    from megatron_asyncmesh.metrics import read_metrics
    from megatron_asyncmesh.runner import loop
    from megatron_asyncmesh.runner.megatron import MegatronEngine

    # One default group for all jobs: each run's own shutdown would end it. Every job's
    # subgroups are destroyed, as a real run's end would.
    def keep_group() -> None:
        shutdown(keep_default_group=True)

    shutdown = mdist.shutdown
    mdist.shutdown = keep_group
    mdist.init_distributed()
    results = {}
    for name, flags in json.loads(args.jobs).items():
        run_dir = os.path.join(args.run_root, name)
        start = time.perf_counter()
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
            keep_group()
            from megatron_asyncmesh.pipeline import install

            install.unpatch()
        results[name].update(
            wall_s=round(time.perf_counter() - start, 2), os_threads=_proc_status("Threads"),
            process_groups=len(dist.distributed_c10d._world.pg_map),
            rss_mb=round(_proc_status("VmRSS") / 1024, 1))
        if os.environ.get("COMBO_VERBOSE") and dist.get_rank() == 0:
            print(name, {k: results[name][k] for k in ("ok", "wall_s", "os_threads",
                                                        "process_groups", "rss_mb")}, flush=True)
        dist.barrier()
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
