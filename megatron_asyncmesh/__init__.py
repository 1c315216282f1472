"""megatron-asyncmesh: asynchronous pipeline and data parallelism for Megatron-core.

Importing the package switches on the CPU compatibility layer when no GPU is
present (see :mod:`megatron_asyncmesh.cpu_compat`); it must therefore be
imported before ``megatron.core``.
"""

import sys

if sys.version_info[:2] != (3, 12):  # pragma: no cover - exercised by a subprocess test
    raise RuntimeError(
        f"megatron-asyncmesh needs Python 3.12 (megatron-core 0.19 and emerging-optimizers "
        f"require it); this is Python {sys.version_info.major}.{sys.version_info.minor} at "
        f"{sys.executable}. Install 3.12 (e.g. `pyenv install 3.12`) and run "
        f"`bash tools/setup_env.sh`, which builds the virtual environment with it."
    )

from megatron_asyncmesh import cpu_compat  # noqa: E402

cpu_compat.activate()

__version__ = "0.1.0"


def patch(mode: str, **kwargs):
    """Make ``megatron.core.pipeline_parallel.get_forward_backward_func()`` return
    the asynchronous ``mode`` schedule ("2bw", "stash" or "flush"); see
    :func:`megatron_asyncmesh.pipeline.install.patch`."""
    from megatron_asyncmesh.pipeline.install import patch as _patch

    return _patch(mode, **kwargs)


def make_optimizer_stage_local(optimizer) -> None:
    """Keep the optimizer's gradient statistics inside the pipeline stage; see
    :func:`megatron_asyncmesh.optim.stage_local.make_optimizer_stage_local`."""
    from megatron_asyncmesh.optim.stage_local import make_optimizer_stage_local as _local

    _local(optimizer)
