"""The harness itself: launches forked from the warm server (tests/zygote.py) give their
output, their exit status and, on a timeout, leave no process behind."""

import os
import subprocess
import textwrap
import time

from tests.harness import env_for_ranks, launch, python_cmd
from tests.zygote import alive, wait_for_server

SCRIPT = textwrap.dedent("""
    import os, sys, time
    out, mode = sys.argv[1], sys.argv[2]
    rank = os.environ.get("RANK", "-")
    with open(os.path.join(out, f"pid.{rank}"), "w") as f:
        f.write(str(os.getpid()))
    print(f"rank {rank} of {os.environ.get('WORLD_SIZE', '-')}: {mode}", flush=True)
    if mode == "hang":
        time.sleep(600)
    sys.exit(3 if mode == "fail" and rank in ("1", "-") else 0)
""")


def _script(tmp_path):
    path = tmp_path / "target.py"
    path.write_text(SCRIPT)
    return str(path)


def test_launch_output_and_exit_status(tmp_path, warm_server):
    wait_for_server(warm_server)                 # it starts in the background
    assert os.path.exists(warm_server)          # the launches below are forked from it
    script = _script(tmp_path)
    ok = launch([script, str(tmp_path), "ok"], nproc=2, timeout=60)
    assert "rank 0 of 2: ok" in ok.output and "rank 1 of 2: ok" in ok.output
    failed = launch([script, str(tmp_path), "fail"], nproc=2, timeout=60, check=False)
    assert failed.returncode == 3 and not failed.timed_out
    tool = subprocess.run(python_cmd(script, str(tmp_path), "fail"), capture_output=True,
                          text=True, env=env_for_ranks(), timeout=60)
    assert tool.returncode == 3 and "rank - of -: fail" in tool.stdout


def test_a_timeout_leaves_no_process(tmp_path):
    script = _script(tmp_path)
    t0 = time.time()
    res = launch([script, str(tmp_path), "hang"], nproc=2, timeout=15, check=False)
    assert res.timed_out and time.time() - t0 < 60
    pids = [int((tmp_path / f"pid.{r}").read_text()) for r in range(2)]
    deadline = time.time() + 10
    while any(alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(alive(p) for p in pids), pids
