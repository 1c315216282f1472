"""A warm parent for the suite's Python processes: torch, Megatron-core and DeepSpeed
imported once per pytest session instead of once per launch.

``tests/fork_launcher.py`` already imports those modules once per launch and forks the
ranks; that still costs about 7 s of CPU per launch, and the suite launches well over
a hundred processes (trainings, converters, evaluators). This server does the imports
once, then serves requests over a Unix socket: each request carries the client's
arguments, environment, working directory and its stdin / stdout / stderr, and the
server forks a child that runs in a session of its own with exactly those:

- ``launch``: :func:`tests.fork_launcher.main` (ranks with torchrun's environment);
- ``script``: a Python script (a tool) as ``__main__``, one process.

The client (``python tests/zygote.py client MODE ARGS...``, stdlib only, started in
a few tens of milliseconds) waits for the child's exit status and exits with it, so
callers keep what a subprocess gives them: output on their pipes, an exit code, and a
process to kill. When the client goes away before its child ends (a test's timeout
kills it), the server SIGKILLs the child's whole process group: the launcher, its
ranks and what they started. Without a server (``ASYNCMESH_TEST_ZYGOTE`` unset or its
socket gone) the client runs the same thing itself, cold.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import struct
import sys
import time
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = "ASYNCMESH_TEST_ZYGOTE"
ENV_PID = "ASYNCMESH_TEST_ZYGOTE_PID"       # the server, while it is starting
START_SECONDS = 120.0


def wait_for_server(path: Optional[str] = None) -> None:
    """The server starts in the background (tests/conftest.py): wait for its socket
    (``path``, default the session's) while its process lives, up to START_SECONDS; then
    run cold. The harness calls it while it builds a command, before a timeout starts."""
    path = path or os.environ.get(ENV)
    if not path:
        return
    try:
        pid = int(os.environ.get(ENV_PID, ""))
    except ValueError:
        return
    deadline = time.time() + START_SECONDS
    while not os.path.exists(path) and time.time() < deadline and alive(pid):
        time.sleep(0.05)


def alive(pid: int) -> bool:
    """``pid`` runs: it exists and is not a zombie (a dead child stays one until its
    parent reaps it, as the server does until pytest's session ends)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ---------------------------------------------------------------------------- client
def client(mode: str, argv: list) -> int:
    path = os.environ.get(ENV)
    sock = None
    if path and os.path.exists(path):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError:
            sock = None
    if sock is None:                      # cold: run it here
        cmd = ([sys.executable, os.path.join(HERE, "fork_launcher.py"), *argv]
               if mode == "launch" else [sys.executable, *argv])
        os.execv(sys.executable, cmd)
    header = json.dumps({"mode": mode, "argv": argv, "env": dict(os.environ),
                         "cwd": os.getcwd()}).encode()
    socket.send_fds(sock, [struct.pack("!Q", len(header)) + header], [0, 1, 2])
    reply = b""
    while len(reply) < 4:
        chunk = sock.recv(4 - len(reply))
        if not chunk:
            print("zygote: the server went away", file=sys.stderr)
            return 1
        reply += chunk
    return struct.unpack("!i", reply)[0]


# ---------------------------------------------------------------------------- server
def _child(request: dict, fds: list) -> None:
    """In the forked child: become the client's process, run the request, exit."""
    os.setsid()                                  # its own session and process group
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    code = 1
    try:
        if request["mode"] == "launch":
            import fork_launcher

            code = fork_launcher.main(request["argv"])
        else:
            import fork_launcher

            code = fork_launcher.run_target(request["argv"])
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve(path: str) -> None:
    sys.path.insert(0, HERE)
    import fork_launcher

    fork_launcher.warm_imports()
    sys.stdout.flush()
    sys.stderr.flush()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(path):
        os.unlink(path)
    listener.bind(path + ".tmp")
    listener.listen(64)
    os.rename(path + ".tmp", path)              # appears only once it accepts
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    running = {}                                # pid -> connection
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    while not stop:
        for key, _ in sel.select(timeout=0.1):
            if key.fileobj is listener:
                conn, _ = listener.accept()
                request, fds = _receive(conn)
                pid = os.fork()
                if pid == 0:
                    listener.close()
                    for c in running.values():
                        c.close()
                    _child(request, fds)
                for fd in fds:
                    os.close(fd)
                running[pid] = conn
                sel.register(conn, selectors.EVENT_READ, pid)
            else:                                # a client spoke or went away
                pid = key.data
                if not key.fileobj.recv(1):
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    sel.unregister(key.fileobj)
        while running:
            try:
                pid, raw = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = running.pop(pid, None)
            if conn is None:
                continue
            code = os.waitstatus_to_exitcode(raw)
            try:
                conn.sendall(struct.pack("!i", code if code >= 0 else 128 - code))
            except OSError:
                pass
            try:
                sel.unregister(conn)
            except (KeyError, ValueError):
                pass
            conn.close()
    for pid in running:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    listener.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    os._exit(0)               # no interpreter teardown of torch / DeepSpeed: seconds saved


def _receive(conn) -> tuple:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    size = struct.unpack("!Q", data[:8])[0]
    data = data[8:]
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return json.loads(data), list(fds)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    elif sys.argv[1] == "client":
        sys.exit(client(sys.argv[2], sys.argv[3:]))
    else:
        sys.exit(f"usage: {sys.argv[0]} serve SOCKET | client (launch|script) ARGS...")
