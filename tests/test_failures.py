"""Failures end every rank; the wrong interpreter is refused with a clear message."""

import os
import shutil
import signal
import subprocess
import threading
import time

import pytest

from tests.harness import REPO, TINY, env_for_ranks, launcher_cmd
from tests.zygote import alive


def _children(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True).stdout
    return [int(p) for p in out.split()]


def test_killed_rank_ends_the_whole_job(tmp_path, data_args):
    """kill -9 one of four ranks mid-training: the job must exit, not hang."""
    run_dir = tmp_path / "run"
    cmd = launcher_cmd("torchrun", 4, ["-m", "megatron_asyncmesh.train", "--config", TINY,
                                       *data_args, "--run-dir", str(run_dir), "--no-progress",
                                       "--pipeline-model-parallel-size", "2",
                                       "--train-iters", "2000", "--eval-interval", "1000"])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env_for_ranks(), cwd=REPO, start_new_session=True)
    try:
        deadline = time.time() + 150
        metrics = run_dir / "metrics.jsonl"
        while time.time() < deadline:
            if metrics.exists() and metrics.read_text().count('"loss"') >= 3:
                break
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            time.sleep(0.5)
        else:
            pytest.fail("training never started")
        ranks = _children(proc.pid)
        assert len(ranks) == 4, ranks
        os.kill(ranks[-1], signal.SIGKILL)
        t_kill = time.time()
        proc.wait(timeout=90)
        assert proc.returncode != 0
        assert time.time() - t_kill < 90
        for pid in ranks:  # no orphaned rank keeps running
            assert not alive(pid), pid
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _other_python():
    for name in ("python3.11", "python3.10", "python3.13"):
        path = shutil.which(name)
        for cand in [path] + [f"/root/.pyenv/versions/{v}/bin/python"
                              for v in ("3.11.7", "3.10.13", "3.13.0")]:
            if cand and os.path.exists(cand) and subprocess.run(
                    [cand, "-c", "pass"], capture_output=True).returncode == 0:
                return cand
    return None


def test_non_312_python_is_refused():
    other = _other_python()
    if other is None:
        pytest.skip("no non-3.12 interpreter on this machine to try")
    out = subprocess.run([other, "-c", "import megatron_asyncmesh"], capture_output=True,
                         text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode != 0
    assert "megatron-asyncmesh needs Python 3.12" in out.stderr
    setup = subprocess.run(["bash", os.path.join(REPO, "tools", "setup_env.sh")],
                           capture_output=True, text=True,
                           env=dict(os.environ, ASYNCMESH_PYTHON=other))
    assert setup.returncode == 3
    assert "not a working Python 3.12 interpreter" in setup.stderr
    assert "pyenv install 3.12" in setup.stderr


def test_stale_extension_build_lock_does_not_hang_start_up(tmp_path, monkeypatch):
    """A run killed while DeepSpeed compiled its CPU all-reduce leaves torch's build lock
    behind, and torch's FileBaton waits for it without limit: the watchdog around
    deepspeed.comm's initialisation removes a lock nothing has touched for a while (and
    only such a lock), so the wait ends."""
    import torch.utils.cpp_extension as cpp
    from torch.utils.file_baton import FileBaton

    from megatron_asyncmesh import distributed as mdist

    build = tmp_path / "deepspeed_shm_comm"
    build.mkdir()
    lock, output = build / "lock", build / "shm.o"
    lock.touch()
    output.touch()
    assert not mdist.clear_stale_build_lock(str(build), stale_after=60)     # compiling
    old = time.time() - 120
    os.utime(lock, (old, old))
    assert not mdist.clear_stale_build_lock(str(build), stale_after=60)     # output fresh
    os.utime(output, (old, old))
    assert mdist.clear_stale_build_lock(str(build), stale_after=60)
    assert not lock.exists()

    # A rank takes the lock while another looks at the (old) directory: the live lock
    # stays, or its holder's release fails (seen in the suite before the fix).
    # The lock is taken right after the first look at the directory, whichever it is.
    taken = []
    with monkeypatch.context() as patch:
        def then_lock(real):
            def look(*args, **kwargs):
                try:
                    return real(*args, **kwargs)
                finally:
                    if not taken:
                        taken.append(True)
                        open(lock, "w").close()       # a fresh lock, as FileBaton's
            return look
        patch.setattr(mdist.os, "stat", then_lock(os.stat))
        patch.setattr(mdist.os, "listdir", then_lock(os.listdir))
        assert not mdist.clear_stale_build_lock(str(build), stale_after=60)
    assert lock.exists()

    os.utime(lock, (old, old))
    monkeypatch.setattr(cpp, "_get_build_directory", lambda name, verbose: str(build))
    monkeypatch.setattr(mdist, "STALE_LOCK_SECONDS", 60.0)
    monkeypatch.setenv("LOCAL_RANK", "1")              # only each machine's first rank
    with mdist.stale_build_lock_watchdog(interval=0.05):
        time.sleep(0.3)
    assert lock.exists()
    monkeypatch.setenv("LOCAL_RANK", "0")
    with mdist.stale_build_lock_watchdog(interval=0.05):
        # DeepSpeed's wait (torch's FileBaton), in a thread so a failure cannot hang here.
        waiter = threading.Thread(target=FileBaton(str(lock), wait_seconds=0.05).wait,
                                  daemon=True)
        waiter.start()
        waiter.join(10)
        assert not waiter.is_alive(), "still waiting on the stale lock"
    assert not lock.exists()
