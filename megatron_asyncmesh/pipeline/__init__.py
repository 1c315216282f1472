"""Pipeline schedules: data (schedule), checking and simulation (simulate),
weight versions (versions), the Megatron-core executor (runtime), and the
one-call installation into Megatron (patch)."""

from megatron_asyncmesh.pipeline.schedule import (  # noqa: F401
    ASYNC_MODES, MODES, Action, ScheduleError, build_schedule, gradient_delay, weight_version)
