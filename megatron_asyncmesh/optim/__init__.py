"""Optimizers against gradient staleness, inside Megatron-core's optimizer stack.

``builder`` makes a stage's optimizer through Megatron's ``get_megatron_optimizer`` (its
registry, wrappers and parameter groups); ``stage_local`` keeps its gradient statistics
inside the pipeline stage; ``nadamw``, ``soap`` and ``feedback`` are the methods; ``config``
holds the options and which combinations can run.
"""

from megatron_asyncmesh.optim.builder import (  # noqa: F401
    StageOptimizerInfo, build_optimizer, stage_delay, wrap_error_feedback, wrap_scheduler)
from megatron_asyncmesh.optim.stage_local import make_optimizer_stage_local  # noqa: F401
