"""The asynchronous pipeline: the schedules as data (``schedule``), their checking and
simulation (``simulate``, ``reference``), the executor that runs a stage's actions on
Megatron-core (``executor``), its weight versions (``versions``) and timeline
(``timeline``), its one-call installation into Megatron (``install``) and its options
(``config``)."""

from megatron_asyncmesh.pipeline.schedule import (  # noqa: F401
    ASYNC_MODES, MODES, Action, ScheduleError, build_schedule, gradient_delay, weight_version)
