"""Training entry point (``asyncmesh-train``): Megatron-core GPT, PP x DP, CPU or GPU.

Single process (PP = DP = 1)::

    asyncmesh-train --config launch/configs/tiny.yaml

Four CPU ranks, PP = 2 x DP = 2, with each launcher::

    torchrun --nproc_per_node 4 -m megatron_asyncmesh.train --config launch/configs/demo.yaml
    deepspeed --num_gpus 4 --module megatron_asyncmesh.train --config launch/configs/demo.yaml
    mpirun -np 4 python -m megatron_asyncmesh.train --config launch/configs/demo.yaml

Multi-node: see ``launch/README.md``. Flags follow Megatron-LM
(``--num-layers --hidden-size ... --pipeline-model-parallel-size``); with no
``--data-path`` the bundled corpus is prepared (once) and used. Outputs go to
``--run-dir``: ``metrics.jsonl``, ``summary.json``, ``tensorboard/``.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

import megatron_asyncmesh  # noqa: F401  (CPU compatibility layer before Megatron)
from megatron_asyncmesh.config import TrainConfig, parse_config
from megatron_asyncmesh.runner.loop import run as run_with, run_reporting_errors
from megatron_asyncmesh.runner.megatron import MegatronEngine


def run(cfg: TrainConfig) -> dict:
    """Train ``cfg`` on Megatron-core (collective over the launched world)."""
    return run_with(cfg, MegatronEngine)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_reporting_errors(lambda: run(parse_config(argv)))


if __name__ == "__main__":
    sys.exit(main())
