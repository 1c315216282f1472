"""The same GPT and data on a DeepSpeed engine: ZeRO baselines and AsyncMesh for DeepSpeed.

The model is the Megatron-core ``GPTModel`` of ``megatron_asyncmesh.train``
(PP = 1, same layout-independent initialisation), the data the same
``GPTDataset`` samples in the same order, the optimizer torch's AdamW with
Megatron's parameter groups (no weight decay on biases and norms) and
Megatron's warm-up + cosine schedule. ``deepspeed.initialize`` builds the
engine; ZeRO is DeepSpeed's own::

    deepspeed --num_gpus 2 --module megatron_asyncmesh.train_deepspeed \\
        --config launch/configs/tiny.yaml --zero-stage 1            # ZeRO-1 baseline
    deepspeed --num_gpus 2 --module megatron_asyncmesh.train_deepspeed \\
        --config launch/configs/tiny.yaml --zero-stage 1 --dp-averaging sparse

With ``--dp-averaging sparse`` the engine gets ``mpu=ReplicaMPU()`` and
:func:`attach_sparse_averaging` (ZeRO stage 0 or 1). Every collective
DeepSpeed issues goes through ``deepspeed.comm``, whose comms logger counts
the bytes; ``summary.json`` reports them per step. ``--save`` / ``--load`` use
DeepSpeed's own checkpoints (``checkpoint/deepspeed.py``). The engine is
``runner/deepspeed.py``; the run around it is the Megatron entry point's
(``runner/loop.py``), so both write the same metrics and summary.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import megatron_asyncmesh  # noqa: F401  (CPU compatibility layer first)
from megatron_asyncmesh.config import TrainConfig, parse_config
from megatron_asyncmesh.dataparallel.averaging import AveragingError
from megatron_asyncmesh.runner.deepspeed import DeepSpeedEngineRun, check_options
from megatron_asyncmesh.runner.loop import run as run_with, run_reporting_errors


def run(cfg: TrainConfig, zero_stage: int) -> dict:
    """Train ``cfg`` on a DeepSpeed engine with ZeRO ``zero_stage``."""
    check_options(cfg, zero_stage)
    return run_with(cfg, DeepSpeedEngineRun, zero_stage=zero_stage)


def main(argv: Optional[Sequence[str]] = None) -> int:
    front = argparse.ArgumentParser(add_help=False)
    front.add_argument("--zero-stage", type=int, default=0,
                       help="DeepSpeed ZeRO stage 0-3 (sparse averaging: 0 or 1)")
    known, rest = front.parse_known_args(argv)
    return run_reporting_errors(lambda: run(parse_config(rest), known.zero_stage),
                                (AveragingError,))


if __name__ == "__main__":
    sys.exit(main())
