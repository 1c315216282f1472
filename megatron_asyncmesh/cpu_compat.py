"""CPU compatibility layer for Megatron-core (and anything else written for CUDA).

Megatron-core 0.19 assumes a GPU: it allocates with ``device='cuda'`` or
``device=torch.cuda.current_device()``, moves modules with ``.cuda()``, keeps
a CUDA RNG state per tensor-parallel rank, synchronises CUDA streams and
events, and checks ``param.type() == 'torch.cuda.FloatTensor'`` before
building its optimizers.  None of that is needed to run the *algorithms* on a
CPU with gloo, so this module redirects those calls to the CPU:

==========================================  ==========================================
what Megatron calls                         what it gets here
==========================================  ==========================================
factory ``device='cuda'``/int/``cuda:N``    the same call with ``device='cpu'``
``Tensor.cuda()``, ``Tensor.to('cuda')``    no move (CPU tensor), dtype changes kept
``Module.cuda()``                           the module, unchanged
``torch.cuda.current_device()``             ``0`` (like a real single-GPU process)
``synchronize``, ``set_device``, nvtx,      no-ops; ``Stream``/``Event`` are inert
``empty_cache``, streams, events            objects with the same methods
``torch.cuda`` RNG (``get_rng_state`` ...)  a dedicated CPU ``torch.Generator``, so
                                            Megatron's RNG tracker can save, fork
                                            and restore states as on a GPU
``Tensor.type()`` *called from megatron.*   ``'torch.cuda.FloatTensor'`` etc., so
                                            Megatron's dtype checks pass; every
                                            other caller sees the true CPU name
memory statistics                           zeros
==========================================  ==========================================

The layer switches itself on only when ``torch.cuda.is_available()`` is
False: on a GPU machine :func:`activate` returns ``False`` and touches
nothing.  It must run before Megatron-core is imported (importing
``megatron_asyncmesh`` does that), because a few Megatron modules bind CUDA
helpers at import time (``from torch.cuda import _lazy_call``).

The factory redirect is done by wrapping the module-level functions (not by
a ``TorchFunctionMode``), so it holds in every thread and costs nothing on
ordinary ops. The list of what is patched, and the versions it was verified
against, is in ``patches/README.md``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from typing import Any, Callable, Dict, List, Tuple

import torch

from megatron_asyncmesh import patching

__all__ = ["activate", "is_active", "patched_names"]

_ACTIVE = False
_PATCHED: List[str] = []
# The generator that stands in for the GPU's default generator.
_FAKE_CUDA_GENERATOR: torch.Generator | None = None

# Factory functions that take a ``device`` keyword.
_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "as_tensor", "arange", "range",
    "linspace", "logspace", "eye", "rand", "randn", "randint", "randperm",
    "empty_strided", "zeros_like", "ones_like", "empty_like", "full_like",
    "rand_like", "randn_like", "randint_like", "scalar_tensor",
)
_TENSOR_NEW = ("new_empty", "new_zeros", "new_ones", "new_full", "new_tensor")
_CPU = torch.device("cpu")


def is_active() -> bool:
    """True once :func:`activate` has redirected CUDA calls to the CPU."""
    return _ACTIVE


def patched_names() -> Tuple[str, ...]:
    """The dotted names this layer replaced (empty when inactive)."""
    return tuple(_PATCHED)


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    # A bare int means a CUDA ordinal to torch's factories and ``.to``.
    return isinstance(device, int) and not isinstance(device, bool)


def _redirect(device: Any) -> Any:
    return _CPU if _is_cuda_device(device) else device


_WHEN = "importing `megatron_asyncmesh` without CUDA (`ASYNCMESH_CPU_COMPAT=0` disables)"
CUDA_PATCH = patching.declare(
    "cpu-torch-cuda", package="torch",
    target="`torch.cuda.current_device/set_device/synchronize/empty_cache`, `Stream`, `Event`, "
           "`stream`, `current_stream`, `default_stream`, `set_stream`, `nvtx.*`; the "
           "`torch.cuda` RNG (`get_rng_state`, `set_rng_state`, `manual_seed[_all]`, "
           "`default_generators`, ...); `torch.cuda.memory_*`",
    replacement="inert stand-ins (`current_device()` is 0); one dedicated CPU "
                "`torch.Generator` for the RNG; zeros for memory statistics",
    why="stream/event bookkeeping in the schedules and DDP; Megatron's "
        "`CudaRNGStatesTracker` saves, forks and restores CUDA RNG states",
    when=_WHEN)
DEVICE_PATCH = patching.declare(
    "cpu-device-redirect", package="torch",
    target="`torch.{empty,zeros,ones,full,tensor,arange,...}`, `Tensor.new_*`, `Tensor.to`, "
           "`Tensor.cuda`, `Module.cuda`, `Tensor.type` (no arguments, called from a "
           "`megatron.*` module)",
    replacement="the same functions with a CUDA `device=` made CPU; `.cuda()` a no-op; "
                "`'torch.cuda.FloatTensor'` etc. for Megatron's type checks",
    why="`device='cuda'` in DDP buffers, optimizers, schedules; `DistributedOptimizer` and "
        "`Float16Optimizer` refuse other type names. torch's cached set of constructors is "
        "filled first, so `with torch.device(...)` contexts keep applying",
    when=_WHEN)
ALL_GATHER_PATCH = patching.declare(
    "cpu-uneven-all-gather", package="torch",
    target="`torch.distributed.all_gather`",
    replacement="padded to the largest size and cut back when the sizes differ",
    why="gloo's allgather needs equal sizes; NCCL's (and Megatron's layer-wise optimizer, "
        "which gathers each rank's whole tensors) does not",
    when=_WHEN)
LAZY_CALL_PATCH = patching.declare(
    "cpu-megatron-lazy-call", package="megatron-core",
    target="`megatron.core.tensor_parallel.random._lazy_call`, `._lazy_init` (imported by "
           "name before the layer was active)",
    replacement="the patched `torch.cuda` ones",
    why="Megatron binds them at import time",
    when=_WHEN)


def _set(owner: Any, name: str, value: Any, label: str, patch: str) -> None:
    patching.replace(owner, name, value, patch=patch, label=label)
    _PATCHED.append(label)


def _wrap_factory(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs["device"] = _CPU
        return fn(*args, **kwargs)

    wrapper.__asyncmesh_wrapped__ = fn
    return wrapper


def _tensor_to(original: Callable) -> Callable:
    @functools.wraps(original)
    def to(self, *args, **kwargs):
        if args and _is_cuda_device(args[0]):
            args = (_CPU,) + args[1:]
        if "device" in kwargs:
            kwargs["device"] = _redirect(kwargs["device"])
        return original(self, *args, **kwargs)

    return to


def _tensor_type(original: Callable) -> Callable:
    @functools.wraps(original)
    def type_(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        # Only Megatron's own modules get the CUDA spelling of the type name:
        # they compare it against 'torch.cuda.FloatTensor' before building the
        # optimizer. Everybody else (torch itself, our code, tests) sees truth.
        if not args and not kwargs and self.device.type == "cpu":
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("megatron."):
                return result.replace("torch.", "torch.cuda.", 1)
        return result

    return type_


_SYNCS = [0]     # device synchronisations asked for (torch.cuda / stream / event)


def device_synchronizations():
    """How many device synchronisations (``torch.cuda.synchronize``, a stream's or an
    event's ``synchronize``) the code asked for so far, or None where this layer is
    inactive (on a GPU they are real). A no-op here, but on a GPU each one waits for the
    device, every stream included: the count shows what a run would block on there."""
    return _SYNCS[0] if _ACTIVE else None


def _count_sync(*args, **kwargs):
    _SYNCS[0] += 1


class _InertEvent:
    """Stands in for ``torch.cuda.Event``: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        return None

    def wait(self, stream=None):
        return None

    def synchronize(self):
        _count_sync()

    def query(self):
        return True

    def elapsed_time(self, end_event):
        return 0.0


class _InertStream:
    """Stands in for ``torch.cuda.Stream``: one CPU stream, always idle."""

    def __init__(self, *args, **kwargs):
        self.device = _CPU

    def wait_stream(self, stream):
        return None

    def wait_event(self, event):
        return None

    def record_event(self, event=None):
        return event if event is not None else _InertEvent()

    def synchronize(self):
        _count_sync()

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _AnyIndex(tuple):
    """``torch.cuda.default_generators``: every index names the one generator.

    Megatron indexes it with ``torch.cuda.current_device()`` or a device's
    ``.index``; on the CPU there is a single stand-in generator.
    """

    def __getitem__(self, key):
        return tuple.__getitem__(self, 0)


def _noop_named(name: str) -> Callable:
    """A fresh do-nothing function per patched name.

    torch._dynamo keys its trace rules by function object and refuses one
    object registered under two torch names, so no two patches may share one.
    """

    def noop(*args, **kwargs):
        return None

    noop.__name__ = noop.__qualname__ = name
    return noop


def _counting_synchronize(device=None) -> None:
    _count_sync()


def _patch_torch_cuda() -> None:
    global _FAKE_CUDA_GENERATOR
    cuda = torch.cuda
    gen = torch.Generator(device="cpu")
    gen.manual_seed(torch.initial_seed())
    _FAKE_CUDA_GENERATOR = gen

    def get_rng_state(device: Any = "cuda") -> torch.Tensor:
        return gen.get_state()

    def set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
        gen.set_state(new_state.clone())

    def manual_seed(seed: int) -> None:
        gen.manual_seed(int(seed))

    def seed() -> None:
        gen.seed()

    def initial_seed() -> int:
        return gen.initial_seed()

    simple: Dict[str, Any] = {
        "current_device": lambda: 0,
        "set_device": _noop_named("set_device"),
        "synchronize": _counting_synchronize,
        "empty_cache": _noop_named("empty_cache"),
        "Stream": _InertStream,
        "Event": _InertEvent,
        "current_stream": lambda device=None: _InertStream(),
        "default_stream": lambda device=None: _InertStream(),
        "set_stream": _noop_named("set_stream"),
        "stream": lambda stream=None: contextlib.nullcontext(stream),
        "get_rng_state": get_rng_state,
        "set_rng_state": set_rng_state,
        "get_rng_state_all": lambda: [gen.get_state()],
        "set_rng_state_all": lambda states: gen.set_state(states[0].clone()),
        "manual_seed": manual_seed,
        "manual_seed_all": lambda seed: manual_seed(seed),
        "seed": seed,
        "seed_all": lambda: seed(),
        "initial_seed": initial_seed,
        "default_generators": _AnyIndex((gen,)),
        # torch.cuda._lazy_call queues callbacks until CUDA initialises, which
        # never happens here: run them at once (Megatron sets RNG states so).
        "_lazy_call": lambda callable_, **kw: callable_(),
        "_lazy_init": _noop_named("_lazy_init"),
        "memory_allocated": lambda device=None: 0,
        "max_memory_allocated": lambda device=None: 0,
        "memory_reserved": lambda device=None: 0,
        "max_memory_reserved": lambda device=None: 0,
        "memory_stats": lambda device=None: {},
        "reset_peak_memory_stats": _noop_named("reset_peak_memory_stats"),
        "reset_max_memory_allocated": _noop_named("reset_max_memory_allocated"),
    }
    for name, value in simple.items():
        _set(cuda, name, value, f"torch.cuda.{name}", CUDA_PATCH)
    for name in ("get_rng_state", "set_rng_state", "manual_seed", "manual_seed_all",
                 "seed", "seed_all", "initial_seed", "get_rng_state_all",
                 "set_rng_state_all"):
        _set(cuda.random, name, simple[name], f"torch.cuda.random.{name}", CUDA_PATCH)
    _set(cuda.nvtx, "range_push", _noop_named("range_push"), "torch.cuda.nvtx.range_push",
         CUDA_PATCH)
    _set(cuda.nvtx, "range_pop", _noop_named("range_pop"), "torch.cuda.nvtx.range_pop", CUDA_PATCH)
    _set(cuda.nvtx, "range", lambda *a, **k: contextlib.nullcontext(),
         "torch.cuda.nvtx.range", CUDA_PATCH)


def _patch_tensors_and_modules() -> None:
    # ``with torch.device(...)`` recognises factory calls by looking them up in a cached
    # set of torch's constructors: fill that cache with the originals first (the
    # wrappers call them), or device contexts such as transformers' meta-device model
    # construction would silently allocate on the CPU.
    import torch.utils._device

    torch.utils._device._device_constructors()
    for name in _FACTORIES:
        fn = getattr(torch, name, None)
        if fn is not None and not hasattr(fn, "__asyncmesh_wrapped__"):
            _set(torch, name, _wrap_factory(fn), f"torch.{name}", patch=DEVICE_PATCH)
    for name in _TENSOR_NEW:
        _set(torch.Tensor, name, _wrap_factory(getattr(torch.Tensor, name)),
             f"torch.Tensor.{name}", patch=DEVICE_PATCH)
    for owner, name, value in (
            (torch.Tensor, "to", _tensor_to(torch.Tensor.to)),
            (torch.Tensor, "type", _tensor_type(torch.Tensor.type)),
            (torch.Tensor, "cuda", lambda self, *a, **k: self),
            (torch.nn.Module, "cuda", lambda self, *a, **k: self)):
        label = "torch.nn.Module" if owner is torch.nn.Module else "torch.Tensor"
        _set(owner, name, value, f"{label}.{name}", patch=DEVICE_PATCH)


def _uneven_all_gather(original: Callable) -> Callable:
    """gloo's allgather needs equal sizes; NCCL's (and Megatron's layer-wise optimizer,
    which gathers each rank's whole tensors) does not. Uneven lists are gathered
    padded to the largest and cut back; everything else goes to torch unchanged."""

    @functools.wraps(original)
    def all_gather(tensor_list, tensor, group=None, async_op=False):
        sizes = {t.numel() for t in tensor_list}
        if len(sizes) <= 1 or async_op:
            return original(tensor_list, tensor, group=group, async_op=async_op)
        n = max(sizes)
        padded = [torch.empty(n, dtype=tensor.dtype) for _ in tensor_list]
        src = torch.zeros(n, dtype=tensor.dtype)
        src[:tensor.numel()] = tensor.reshape(-1)
        original(padded, src, group=group)
        for out, got in zip(tensor_list, padded):
            out.copy_(got[:out.numel()].view_as(out))
        return None

    all_gather.__asyncmesh_wrapped__ = True
    return all_gather


def _patch_distributed() -> None:
    import torch.distributed as dist

    if not hasattr(dist.all_gather, "__asyncmesh_wrapped__"):
        _set(dist, "all_gather", _uneven_all_gather(dist.all_gather),
             "torch.distributed.all_gather (uneven sizes on gloo)", ALL_GATHER_PATCH)


def _patch_imported_megatron() -> None:
    """Rebind CUDA helpers that Megatron modules imported by name already."""
    random_mod = sys.modules.get("megatron.core.tensor_parallel.random")
    if random_mod is not None:
        _set(random_mod, "_lazy_call", torch.cuda._lazy_call,
             "megatron.core.tensor_parallel.random._lazy_call", LAZY_CALL_PATCH)
        _set(random_mod, "_lazy_init", torch.cuda._lazy_init,
             "megatron.core.tensor_parallel.random._lazy_init", LAZY_CALL_PATCH)


def activate() -> bool:
    """Redirect CUDA-only calls to the CPU when no GPU is present.

    Returns True when the layer is (now) active, False on a machine with a
    GPU (nothing is changed there) or when ``ASYNCMESH_CPU_COMPAT=0``.
    Idempotent.
    """
    global _ACTIVE
    if _ACTIVE:
        return True
    if os.environ.get("ASYNCMESH_CPU_COMPAT", "1") == "0" or torch.cuda.is_available():
        return False
    import warnings

    # Expected on a CPU: Megatron falls back to torch optimizers and kernels.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    _patch_torch_cuda()
    _patch_tensors_and_modules()
    _patch_distributed()
    _patch_imported_megatron()
    _ACTIVE = True
    return True


def fake_cuda_generator() -> torch.Generator | None:
    """The CPU generator standing in for the GPU's (None when inactive)."""
    return _FAKE_CUDA_GENERATOR
