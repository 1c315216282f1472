"""Ranks on separate emulated hosts joined by shaped links, for the benchmarks.

:class:`StarNetwork` puts each of ``n`` hosts in its own network namespace, with one
interface named :data:`IFNAME` (so ``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` is
the same everywhere) on a bridge in the root namespace. Both directions of every host's
link go through a token bucket (``tc qdisc ... tbf``) at ``rate``: whatever a rank sends
to any other rank, pipeline activations or data-parallel traffic, crosses its own
shaped uplink and the receiver's shaped downlink, as between machines with one NIC
each. Needs root and iproute2; :func:`unavailable` says why not otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from typing import List, Sequence, Tuple

IFNAME = "amlink"


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True)


def unavailable() -> str:
    """'' when namespaces and shaped links can be made here, else the reason."""
    if os.geteuid() != 0:
        return "not root: network namespaces (`ip netns`) need root; run it as root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "`ip` or `tc` (iproute2) is not installed"
    return ""


class StarNetwork:
    """``n`` namespaces ``{prefix}{i}`` at ``{subnet}.{i + 1}``, each linked to the bridge
    ``{prefix}br`` at ``rate`` (a tc rate such as ``100mbit``) in both directions."""

    def __init__(self, n: int, rate: str, prefix: str = "amhost", subnet: str = "10.78.0"):
        self.n, self.rate, self.prefix, self.subnet = n, rate, prefix, subnet
        self.bridge = f"{prefix}br"

    def namespace(self, i: int) -> str:
        return f"{self.prefix}{i}"

    def addr(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    def exec_prefix(self, i: int) -> List[str]:
        """Prefix a command with this to run it on host ``i``."""
        return ["ip", "netns", "exec", self.namespace(i)]

    def _shape(self, *dev: str) -> None:
        _sh(*dev[:-1], "tc", "qdisc", "add", "dev", dev[-1], "root", "tbf", "rate", self.rate,
            "burst", "64kb", "latency", "500ms")

    def up(self) -> "StarNetwork":
        self.down()
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        _sh("ip", "link", "set", self.bridge, "up")
        for i in range(self.n):
            ns, host_side, bridge_side = self.namespace(i), f"{self.prefix}h{i}", f"{self.prefix}p{i}"
            _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", host_side, "type", "veth", "peer", "name", bridge_side)
            _sh("ip", "link", "set", host_side, "netns", ns)
            inside = self.exec_prefix(i)
            _sh(*inside, "ip", "link", "set", host_side, "name", IFNAME)
            _sh(*inside, "ip", "addr", "add", f"{self.addr(i)}/24", "dev", IFNAME)
            _sh(*inside, "ip", "link", "set", IFNAME, "up")
            _sh(*inside, "ip", "link", "set", "lo", "up")
            _sh("ip", "link", "set", bridge_side, "master", self.bridge)
            _sh("ip", "link", "set", bridge_side, "up")
            self._shape(*inside, IFNAME)      # the host's uplink
            self._shape(bridge_side)          # its downlink
        return self

    def down(self) -> None:
        for i in range(self.n):
            _sh("ip", "netns", "del", self.namespace(i), check=False)
        _sh("ip", "link", "del", self.bridge, check=False)

    def run(self, commands: Sequence[Tuple[int, List[str]]], log_dir: str, env: dict,
            timeout: float) -> int:
        """Run each ``(host, argv)`` on its host, with ``GLOO_SOCKET_IFNAME`` /
        ``NCCL_SOCKET_IFNAME`` set to the link, output to ``log_dir/log{i}.txt``. Like a
        launcher, the first failure (or the timeout: status 124) ends the others; returns
        that status, else 0."""
        procs, logs = [], []
        for i, (host, argv) in enumerate(commands):
            cmd = [*self.exec_prefix(host), "env", f"GLOO_SOCKET_IFNAME={IFNAME}",
                   f"NCCL_SOCKET_IFNAME={IFNAME}", *argv]
            logs.append(open(os.path.join(log_dir, f"log{i}.txt"), "w"))
            procs.append(subprocess.Popen(cmd, env=env, stdout=logs[-1],
                                          stderr=subprocess.STDOUT))
        deadline = time.time() + timeout
        status = 0
        try:
            while None in [p.poll() for p in procs]:        # poll every one
                failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
                if failed or time.time() > deadline:
                    status = failed[0] if failed else 124
                    break
                time.sleep(1)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for f in logs:
                f.close()
        return status or max(p.returncode for p in procs)

    def __enter__(self) -> "StarNetwork":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()
