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
