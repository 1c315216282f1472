"""Install the asynchronous pipeline executor into Megatron-core with one call.

    import megatron_asyncmesh
    schedule = megatron_asyncmesh.patch("2bw", train_iters=args.train_iters)
    optimizer = get_megatron_optimizer(...)
    megatron_asyncmesh.make_optimizer_stage_local(optimizer)

(``make_optimizer_stage_local`` lives with the optimizers.)
After ``patch``, ``megatron.core.pipeline_parallel.get_forward_backward_func()``
returns the ``AsyncPipelineSchedule`` (it reads the module globals
``forward_backward_pipelining_without_interleaving`` and
``forward_backward_no_pipelining`` at call time, which is what is replaced).
Nothing else in Megatron is modified; ``unpatch()`` restores both. What is
patched and the versions it was verified on: ``patches/README.md``.
"""

from __future__ import annotations

import logging
from typing import Optional

from megatron_asyncmesh import patching
from megatron_asyncmesh.pipeline.executor import AsyncPipelineSchedule

log = logging.getLogger(__name__)

SCHEDULE_PATCH = patching.declare(
    "async-pipeline-schedule", package="megatron-core",
    target="`megatron.core.pipeline_parallel.schedules.forward_backward_pipelining_without_"
           "interleaving` and `...schedules.forward_backward_no_pipelining` (module globals)",
    replacement="one `AsyncPipelineSchedule` (pipeline/executor.py) with the same call "
                "signature",
    why="`get_forward_backward_func()` looks these globals up on every call, so every "
        "existing caller gets the no-flush schedule (and `2bw` keeps its one-step delay at "
        "PP = 1); evaluation (`forward_only`) is delegated to Megatron's original",
    when="`megatron_asyncmesh.patch(mode)` (training with --pipeline-schedule 2bw / stash) "
         "until `unpatch()`; refused on an unverified megatron-core")

VERIFIED_MEGATRON_CORE = ("0.19.2",)
_ORIGINALS: dict = {}
_ACTIVE: Optional[AsyncPipelineSchedule] = None
_NAMES = ("forward_backward_pipelining_without_interleaving", "forward_backward_no_pipelining")


def _check_version(allow_unverified: bool) -> None:
    from importlib.metadata import version

    found = version("megatron-core")
    if found not in VERIFIED_MEGATRON_CORE and not allow_unverified:
        raise RuntimeError(
            f"megatron-core {found} is installed; the asynchronous schedule was verified on "
            f"{', '.join(VERIFIED_MEGATRON_CORE)} (it relies on P2PCommunicator, forward_step, "
            "backward_step and get_forward_backward_func's module lookup). Install "
            "megatron-core==0.19.2 or pass allow_unverified=True and run tests/test_pipeline_*.")


def patch(mode: str, *, train_iters: Optional[int] = None, drain_interval: Optional[int] = None,
          start_step: int = 0, allow_unverified: bool = False) -> AsyncPipelineSchedule:
    """Make Megatron's get_forward_backward_func() return the ``mode`` schedule.

    ``train_iters`` drains the pipeline on the last step; ``drain_interval``
    every so many steps (e.g. the evaluation interval); or call
    ``schedule.request_drain()`` before the step preceding an evaluation or
    checkpoint. Returns the schedule object (for ``stats()`` and drains).
    """
    global _ACTIVE
    from megatron.core.pipeline_parallel import schedules

    _check_version(allow_unverified)
    unpatch()
    schedule = AsyncPipelineSchedule(mode, train_iters=train_iters,
                                     drain_interval=drain_interval, start_step=start_step)
    for name in _NAMES:
        _ORIGINALS[name] = patching.replace(schedules, name, schedule, patch=SCHEDULE_PATCH)
    schedule.megatron_functions = dict(_ORIGINALS)
    _ACTIVE = schedule
    return schedule


def unpatch() -> None:
    global _ACTIVE
    from megatron.core.pipeline_parallel import schedules

    for name, fn in _ORIGINALS.items():
        patching.restore(schedules, name, fn, patch=SCHEDULE_PATCH)
    _ORIGINALS.clear()
    _ACTIVE = None


def megatron_schedule():
    """Megatron's own (synchronous) function for the current pipeline size."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import schedules

    name = _NAMES[0] if parallel_state.get_pipeline_model_parallel_world_size() > 1 else _NAMES[1]
    return _ORIGINALS.get(name, getattr(schedules, name))
