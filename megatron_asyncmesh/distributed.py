"""Process-group set-up for every launcher, Megatron's parallel state and the layout's
options (:class:`ParallelConfig`).

Launchers and how a rank learns its place:

- ``torchrun`` and ``deepspeed`` set ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
  ``MASTER_ADDR``/``MASTER_PORT``: the env:// rendezvous is used directly.
- ``mpirun`` sets ``OMPI_COMM_WORLD_*`` (or ``PMI_*``): ranks are discovered
  through ``deepspeed.init_distributed(auto_mpi_discovery=True)`` (mpi4py).
- ``srun`` (one task per rank) sets ``SLURM_PROCID``/``SLURM_NTASKS``; with
  ``MASTER_ADDR`` exported by the batch script they become the env:// variables.
- a plain ``asyncmesh-train`` (no launcher) is a world of one.

gloo is the backend on CPU, NCCL on GPU. Collectives time out (default
300 s, ``ASYNCMESH_DIST_TIMEOUT``) so a rank that dies cannot hang the rest
forever; the launchers also kill the surviving ranks when one fails.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_asyncmesh.options import ConfigError, check_positive, option

@dataclass
class ParallelConfig:
    pipeline_model_parallel_size: int = option(1, "pipeline stages (PP)", "parallel")
    data_parallel_size: Optional[int] = option(
        None, "data-parallel replicas (DP); default world_size / PP", "parallel")
    tensor_model_parallel_size: int = option(
        1, "tensor parallel size (TP): Megatron's column / row-parallel layers split each "
        "wide matrix over TP ranks of a stage", "parallel")
    use_distributed_optimizer: bool = option(False, "shard optimizer state over DP (ZeRO-1)",
                                             "parallel")
    distributed_timeout_minutes: Optional[float] = option(
        None, "timeout of every collective, so a lost rank ends the job (default: "
        "$ASYNCMESH_DIST_TIMEOUT seconds, else 5 minutes; raise it for large checkpoints)",
        "parallel")

    def validate_parallel(self) -> None:
        check_positive(self, ("pipeline_model_parallel_size", "tensor_model_parallel_size"))
        if self.distributed_timeout_minutes is not None and \
                not self.distributed_timeout_minutes > 0:
            raise ConfigError(f"--distributed-timeout-minutes must be > 0, got "
                              f"{self.distributed_timeout_minutes}.")


_MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect_launcher() -> str:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "env"
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ and \
            "MASTER_ADDR" in os.environ:
        return "slurm"
    if any(v in os.environ for v in _MPI_VARS):
        return "mpi"
    return "single"


def init_distributed(timeout_minutes: Optional[float] = None) -> str:
    """Create the default process group; returns the launcher kind seen.
    ``timeout_minutes`` (``--distributed-timeout-minutes``) bounds every collective."""
    if dist.is_initialized():
        return "existing"
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    seconds = (60.0 * timeout_minutes if timeout_minutes is not None
               else float(os.environ.get("ASYNCMESH_DIST_TIMEOUT", 300)))
    timeout = datetime.timedelta(seconds=seconds)
    kind = detect_launcher()
    if kind == "mpi":
        import deepspeed

        # DeepSpeed reads rank/size/master from mpi4py, exports them as env vars
        # and creates the torch.distributed default group.
        with stale_build_lock_watchdog():
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=True,
                                       timeout=timeout)
        release_cpu_shm()
    else:
        if kind == "slurm":
            # One task per rank (`srun asyncmesh-train ...`); the
            # batch script exports MASTER_ADDR/MASTER_PORT (launch/slurm.sbatch).
            os.environ.update(RANK=os.environ["SLURM_PROCID"],
                              WORLD_SIZE=os.environ["SLURM_NTASKS"],
                              LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))
            os.environ.setdefault("MASTER_PORT", "29500")
        if kind == "single":
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return kind


def init_deepspeed_comm() -> None:
    """``deepspeed.comm`` over the existing default group (idempotent), without the
    shared-memory files its CPU all-reduce leaves behind."""
    import deepspeed.comm as dscomm

    if not dscomm.is_initialized():
        with stale_build_lock_watchdog():
            dscomm.init_distributed(dist_backend=dist.get_backend(), verbose=False)
    release_cpu_shm()


# DeepSpeed compiles its CPU all-reduce (``deepspeed_shm_comm``) with torch's JIT
# extension builder at its initialisation; the builder holds a ``lock`` file in the
# build directory and every other process waits, without limit, for it to go. A run
# killed while compiling (Ctrl-C during a first run's start-up) leaves the file
# behind, and every later run then waited forever at start-up, silently.
SHM_EXTENSION = "deepspeed_shm_comm"
STALE_LOCK_SECONDS = 300.0


def clear_stale_build_lock(build_dir: str, stale_after: Optional[float] = None) -> bool:
    """Remove ``build_dir/lock`` when neither it nor anything else in ``build_dir`` has
    changed for ``stale_after`` seconds (default STALE_LOCK_SECONDS): a compile in
    progress writes its outputs, a dead one does not. Returns True when it removed it.

    The lock is looked at first: a lock taken after that look is not judged by the
    older files around it (the holder would then fail to release it)."""
    stale_after = STALE_LOCK_SECONDS if stale_after is None else stale_after
    lock = os.path.join(build_dir, "lock")
    try:
        newest = os.stat(lock).st_mtime
        for name in os.listdir(build_dir):
            newest = max(newest, os.path.getmtime(os.path.join(build_dir, name)))
        if time.time() - newest < stale_after:
            return False
        os.remove(lock)
    except OSError:                        # no lock, or it went meanwhile
        return False
    print(f"warning: removed {lock}, a stale lock of torch's extension builder (unchanged "
          f"for {stale_after:.0f} s: a run was killed while DeepSpeed compiled its CPU "
          f"all-reduce); compiling again.", file=sys.stderr, flush=True)
    return True


def local_rank() -> int:
    """This rank's index on its machine, from whichever launcher started it (0 when none
    says)."""
    for var in ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID",
                "SLURM_LOCALID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


@contextlib.contextmanager
def stale_build_lock_watchdog(interval: float = 5.0):
    """While DeepSpeed's communication initialises on CPU, clear a stale lock of its
    extension build (:func:`clear_stale_build_lock`) so the wait ends. Only the first
    rank of each machine watches: two watchers could both judge one dead lock, and the
    second would remove the live lock a waiting rank took after the first removed it."""
    try:
        from torch.utils.cpp_extension import _get_build_directory
    except ImportError:                    # a torch without it: nothing to watch
        _get_build_directory = None
    if torch.cuda.is_available() or _get_build_directory is None or local_rank() != 0:
        yield
        return
    build_dir = _get_build_directory(SHM_EXTENSION, verbose=False)
    done = threading.Event()

    def watch():
        while not done.wait(interval):
            clear_stale_build_lock(build_dir)

    clear_stale_build_lock(build_dir)
    thread = threading.Thread(target=watch, name="stale-build-lock", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


_SHM_RELEASED = []


def release_cpu_shm() -> None:
    """On CPU, DeepSpeed's all-reduce (ops/csrc/cpu/comm/shm.cpp) maps one
    ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`` per rank (69 MB)
    and never unlinks it: every run left its files behind (runs whose launcher sets
    ``LOCAL_SIZE``, as the ``deepspeed`` launcher does). Once every rank has mapped
    its peers' files (they all did at their initialisation, before this barrier), each
    unlinks its own: the mappings stay valid, and nothing is left even if the run is
    killed later."""
    from deepspeed.comm import comm as dscomm_impl       # the live backend, not the
                                                         # package's import-time None
    backend = getattr(dscomm_impl, "cdb", None)
    if torch.cuda.is_available() or getattr(backend, "shm_comm_op", None) is None or \
            _SHM_RELEASED:
        return
    _SHM_RELEASED.append(True)
    dist.barrier()
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_"
            f"{os.environ.get('MASTER_ADDR')}_{os.environ.get('MASTER_PORT')}_{dist.get_rank()}")
    try:
        os.unlink(name)
    except FileNotFoundError:
        pass


def local_world_size() -> int:
    for var in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS",
                "SLURM_NTASKS_PER_NODE"):
        if var in os.environ:
            # Slurm may write "8(x2)" (8 tasks on each of 2 nodes): take the count.
            return int(os.environ[var].split("(")[0].split(",")[0])
    return dist.get_world_size() if dist.is_initialized() else 1


def set_cpu_threads(cfg) -> int:
    """Share the cores among the ranks on this machine (oversubscription is slow)."""
    if torch.cuda.is_available():
        return torch.get_num_threads()
    threads = cfg.num_threads or max(1, (os.cpu_count() or 1) // max(1, local_world_size()))
    torch.set_num_threads(threads)
    return threads


def init_model_parallel(cfg) -> int:
    """Megatron parallel state for cfg's TP and PP; returns DP. Sparse runs place
    ranks replica-major (:func:`rank_order`)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    dp = cfg.validate_world(dist.get_world_size())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        order=rank_order(cfg.dp_averaging == "sparse"))
    torch.manual_seed(cfg.seed)
    model_parallel_cuda_manual_seed(cfg.seed)
    return dp


MEGATRON_ORDER = "tp-cp-ep-dp-pp"       # Megatron's default: a stage's DP ranks adjacent
REPLICA_MAJOR_ORDER = "tp-cp-ep-pp-dp"  # one replica's ranks (all its stages) adjacent


def rank_order(sparse: bool) -> str:
    """Megatron's rank order for a run. Sparse runs are replica-major: the ranks of one
    replica, all its pipeline stages included, are consecutive, so a launcher that fills
    node after node puts a replica on a node and only the averaging leaves it."""
    return REPLICA_MAJOR_ORDER if sparse else MEGATRON_ORDER


_ON_SHUTDOWN: list = []


def on_shutdown(forget) -> None:
    """Register ``forget()``: drops process groups cached by a component before the
    default group they belong to is destroyed."""
    if forget not in _ON_SHUTDOWN:
        _ON_SHUTDOWN.append(forget)


def shutdown(keep_default_group: bool = False) -> None:
    """End the run's process groups: the components' cached groups, Megatron's parallel
    state, then the default group (which takes every subgroup with it).

    ``keep_default_group`` (a process that trains several runs on one world, such as the
    test suite's combination launch) destroys every subgroup but keeps the default one,
    and collects the finished run's objects: the model, DDP and optimizer form reference
    cycles that hold their groups, and each gloo group keeps three threads and its
    connections until it is freed. Left to accumulate (Megatron's ``destroy_model_parallel``
    only forgets its groups), a process that had trained 38 runs held about 2300 idle
    threads per rank and its steps ran up to ten times slower."""
    from megatron.core import parallel_state

    for forget in _ON_SHUTDOWN:
        forget()
    if not dist.is_initialized():
        return
    parallel_state.destroy_model_parallel()
    if not keep_default_group:
        dist.destroy_process_group()
        return
    default = dist.distributed_c10d._get_default_group()
    for group in list(dist.distributed_c10d._world.pg_map):
        if group is not default:
            dist.destroy_process_group(group)
    gc.collect()
