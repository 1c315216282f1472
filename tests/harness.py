"""CPU multi-process test harness: gloo ranks under a launcher, hard timeout.

Every distributed test goes through :func:`launch`: it starts the launcher in its own
process group on a free port and kills the whole group when the timeout expires, so a
deadlock fails the test instead of hanging the suite. The default launcher is
``tests/fork_launcher.py`` (torchrun's environment, ranks forked from a parent that has
imported torch and Megatron: about 14 s less per 4-rank launch on 2 cores), itself
forked from the session's warm server (``tests/zygote.py``: those imports once per
session instead of once per launch); tests of the launchers themselves name
``torchrun``, ``deepspeed`` or ``mpirun``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import List, Optional, Sequence

from megatron_asyncmesh.distributed import free_port
from megatron_asyncmesh.metrics import read_metrics  # noqa: F401  (re-exported for tests)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
TINY = os.path.join(REPO, "launch", "configs", "tiny.yaml")
# tests/zygote.py's client: forked from the session's warm server (cold without one).
ZYGOTE_CLIENT = [sys.executable, os.path.join(REPO, "tests", "zygote.py"), "client"]


def _zygote_client() -> List[str]:
    """The client's command, once the session's server (started in the background) is
    ready: the wait happens here, not inside a launch's timeout."""
    from tests.zygote import wait_for_server

    wait_for_server()
    return ZYGOTE_CLIENT


def python_cmd(script: str, *args: str) -> List[str]:
    """``python script args...`` as a child of the warm server (see tests/zygote.py)."""
    return [*_zygote_client(), "script", script, *args]


def env_for_ranks(extra: Optional[dict] = None) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=REPO,
               ASYNCMESH_DIST_TIMEOUT="120", DS_ACCELERATOR="cpu",
               PATH=BIN + os.pathsep + env.get("PATH", ""))
    env.update(extra or {})
    return env


def launcher_cmd(launcher: str, nproc: int, target: Sequence[str]) -> List[str]:
    """``target`` is ``["-m", module, args...]`` or ``[script.py, args...]``."""
    port = str(free_port())
    if launcher == "fork":
        return [*_zygote_client(), "launch", "--nproc", str(nproc), "--master-port", port,
                *target]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", port, *target]
    if launcher == "deepspeed":
        ds_target = (["--module", target[1], *target[2:]] if target[0] == "-m" else list(target))
        return [os.path.join(BIN, "deepspeed"), "--num_gpus", str(nproc),
                "--master_port", port, *ds_target]
    if launcher == "mpirun":
        return [os.path.join(BIN, "mpirun"), "--allow-run-as-root", "--oversubscribe",
                "-np", str(nproc), "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS",
                "-x", "MASTER_ADDR=127.0.0.1", "-x", f"MASTER_PORT={port}",
                sys.executable, *target]
    if launcher == "python":
        return [sys.executable, *target]
    raise ValueError(launcher)


class LaunchResult:
    def __init__(self, returncode: int, output: str, seconds: float, timed_out: bool):
        self.returncode = returncode
        self.output = output
        self.seconds = seconds
        self.timed_out = timed_out

    def tail(self, n: int = 60) -> str:
        """The last ``n`` lines, preceded by the workers' own error lines (a
        launcher's failure report alone can fill the tail)."""
        lines = self.output.splitlines()
        marks = ("Error", "Traceback", "terminate called", "what():", "Aborted")
        errors = [ln for ln in lines[:-n] if any(m in ln for m in marks)][:20]
        head = ["--- error lines before the tail ---", *errors, "---"] if errors else []
        return "\n".join(head + lines[-n:])


def launch(target: Sequence[str], nproc: int = 1, launcher: str = "fork",
           timeout: float = 240, env: Optional[dict] = None, check: bool = True,
           cwd: Optional[str] = None) -> LaunchResult:
    cmd = launcher_cmd(launcher, nproc, target)
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env_for_ranks(env), cwd=cwd or REPO, start_new_session=True)
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    result = LaunchResult(proc.returncode, out, time.time() - t0, timed_out)
    if check and (timed_out or proc.returncode != 0):
        raise AssertionError(
            f"{' '.join(cmd)}\n{'TIMED OUT after %.0f s' % timeout if timed_out else 'exit %d' % proc.returncode}"
            f"\n--- output tail ---\n{result.tail()}")
    return result


def train(run_dir: str, nproc: int = 1, args: Sequence[str] = (), launcher: str = "fork",
          timeout: float = 240, check: bool = True, config: str = TINY) -> LaunchResult:
    """Run the training entry point (pass the data flags in ``args``)."""
    target = ["-m", "megatron_asyncmesh.train", "--config", config, "--run-dir", run_dir,
              "--no-progress", *args]
    return launch(target, nproc=nproc, launcher=launcher, timeout=timeout, check=check)


def read_summary(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


def tool(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``tools/<name>``; raise with its output unless it succeeded (``check``)."""
    proc = subprocess.run(python_cmd(os.path.join(REPO, "tools", name), *args),
                          capture_output=True, text=True, env=env_for_ranks(), cwd=REPO,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} {' '.join(args)}: exit {proc.returncode}\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def evaluate(*args) -> dict:
    """tools/evaluate.py's JSON result."""
    return json.loads(tool("evaluate.py", *args).stdout.strip().splitlines()[-1])
