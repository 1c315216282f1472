"""The test suite's launcher: torchrun's environment, ranks forked from one warm parent.

A rank of this project spends about 7 s of CPU importing torch, Megatron-core and
DeepSpeed before it does anything; a 4-rank test on the 2-core CI machine paid about
14 s of wall-clock for that alone, on every launch. This launcher imports those
modules once, then forks one child per rank; each child sets the variables torchrun
sets (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``) and runs the target as ``__main__``, exactly as torchrun would start
it. Nothing distributed exists before the fork: each child creates its own gloo
process group. Like torchrun, the first rank that fails takes the others down (they
and the processes they started are killed), and the launcher exits with that rank's
status. The launcher runs in its own process group (the harness starts it in a new
session).

The launchers users run (torchrun, deepspeed, mpirun, srun) keep their own tests
(``tests/test_launchers.py`` and the tests that name ``launcher=``).

Usage: ``python tests/fork_launcher.py --nproc N --master-port P (-m module | script.py) args...``
"""

from __future__ import annotations

import os
import runpy
import signal
import sys


def _run_rank(rank: int, nproc: int, port: str, target: list) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                      LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", ROLE_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    os._exit(run_target(target))


def run_target(target: list) -> int:
    """Run ``target`` (``["-m", module, args...]``, ``["-c", code, args...]`` or
    ``[script.py, args...]``) as
    ``__main__`` and return the exit status an interpreter would have."""
    code = 0
    try:
        if target[0] == "-m":
            sys.argv = [target[1], *target[2:]]
            runpy.run_module(target[1], run_name="__main__", alter_sys=True)
        elif target[0] == "-c":
            sys.argv = ["-c", *target[2:]]
            exec(compile(target[1], "<string>", "exec"), {"__name__": "__main__"})
        else:
            sys.argv = list(target)
            sys.path.insert(0, os.path.dirname(os.path.abspath(target[0])))
            runpy.run_path(target[0], run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except BaseException:            # noqa: BLE001  (reported like an uncaught error)
        import traceback

        traceback.print_exc()
        code = 1
    # What a normal interpreter exit runs: multiprocessing's handler ends daemonic helpers
    # (Megatron's asynchronous checkpoint writers), which would otherwise keep the
    # launcher's output pipe open after the rank is gone.
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def warm_imports() -> None:
    """The heavy imports every rank needs (OMP_NUM_THREADS is 1, and nothing here starts
    a thread or a process group)."""
    import megatron_asyncmesh  # noqa: F401  (CPU layer first)
    import megatron.core  # noqa: F401
    import megatron_asyncmesh.runner.loop  # noqa: F401
    import megatron_asyncmesh.runner.megatron  # noqa: F401
    import deepspeed.comm  # noqa: F401  (the averager's collectives)


def main(argv: list) -> int:
    nproc = int(argv[argv.index("--nproc") + 1])
    port = argv[argv.index("--master-port") + 1]
    target = argv[argv.index("--master-port") + 2:]
    if os.getpgid(0) != os.getpid():
        os.setpgid(0, 0)      # a group of its own: the launcher, its ranks and theirs
    warm_imports()                       # once, before the ranks are forked

    sys.stdout.flush()
    sys.stderr.flush()
    children = {}
    for rank in range(nproc):
        pid = os.fork()
        if pid == 0:
            _run_rank(rank, nproc, port, target)
        children[pid] = rank
    status = 0
    while children:
        pid, raw = os.wait()
        children.pop(pid, None)
        code = os.waitstatus_to_exitcode(raw)
        if code != 0 and status == 0:
            status = code if code > 0 else 128 - code
            _kill_the_rest()
    return status


def _kill_the_rest() -> None:
    """Like torchrun, one failure ends every rank: SIGKILL to every other process of
    this launcher's process group, the ranks and what they started (Megatron's
    asynchronous checkpoint writers would otherwise keep the output pipe open)."""
    me, group = os.getpid(), os.getpgid(0)
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            if os.getpgid(int(entry)) == group:
                os.kill(int(entry), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
