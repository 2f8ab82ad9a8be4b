"""A bandwidth-limited network between training ranks on one Linux machine.

``LinkLab(nranks)`` creates one network namespace per rank (``dqt-r0``, ``dqt-r1``, …) and a
bridge namespace (``dqt-br``) that joins them: rank i has a veth ``v0`` with address
10.77.0.(i+1)/24 whose peer ``b{i}`` sits on the bridge. ``shape(rate)`` puts a token-bucket
filter (``tc qdisc … tbf rate R``) on both ends of every link, so each direction of every
rank's link carries at most R; ``shape(None)`` removes it. Everything lives inside namespaces
this lab created — no address or route of the host changes — and ``close()`` (also run on
exceptions and Ctrl-C through the context manager, and for leftovers of a crashed run at
start) deletes the namespaces, which removes their veths and qdiscs with them.

Needs root (``ip netns``): :func:`check_root` says so clearly.

    with LinkLab(2) as lab:
        lab.shape("1gbit")
        procs = lab.launch(cmd, env)        # one process per rank, in its namespace
        tx = lab.tx_bytes(0)                # bytes rank 0's interface sent
"""

from __future__ import annotations

import os
import subprocess
from typing import Sequence

PREFIX = "dqt-"
BRIDGE_NS = PREFIX + "br"
SUBNET = "10.77.0."
IFACE = "v0"


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def check_root() -> str | None:
    """None if network namespaces can be made here, else the reason."""
    if os.geteuid() != 0:
        return "creating network namespaces needs root (run as root, or use --unshaped-only)"
    try:
        subprocess.run(["ip", "-V"], check=True, capture_output=True)
        subprocess.run(["tc", "-V"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        return f"the iproute2 tools `ip` and `tc` are needed: {e}"
    return None


def leftover_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


def _burst(rate_bits: float) -> int:
    """tbf bucket: 4 ms at the rate, at least 256 KB (veth hands the qdisc GSO packets of up to
    64 KB, which must fit the bucket)."""
    return max(256 * 1024, int(rate_bits / 8 * 0.004))


def parse_rate(rate: str) -> float:
    """'100mbit' / '1gbit' / '10gbit' → bits per second."""
    r = rate.lower().strip()
    for unit, mult in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if r.endswith(unit):
            return float(r[: -len(unit)]) * mult
    raise ValueError(f"link rate must look like 100mbit, 1gbit or 10gbit; got {rate!r}")


class LinkLab:
    def __init__(self, nranks: int) -> None:
        if nranks < 2:
            raise ValueError(f"a link needs at least 2 ranks; got {nranks}")
        self.nranks = nranks
        self.namespaces = [f"{PREFIX}r{i}" for i in range(nranks)]
        self.rate: str | None = None

    def addr(self, rank: int) -> str:
        return f"{SUBNET}{rank + 1}"

    # -------------------------------------------------------------- lifecycle
    def open(self) -> "LinkLab":
        reason = check_root()
        if reason:
            raise PermissionError(reason)
        self.close()  # leftovers of a crashed run
        _ip("ip", "netns", "add", BRIDGE_NS)
        _ip("ip", "link", "add", "br0", "type", "bridge", ns=BRIDGE_NS)
        _ip("ip", "link", "set", "br0", "up", ns=BRIDGE_NS)
        for i, ns in enumerate(self.namespaces):
            _ip("ip", "netns", "add", ns)
            _ip("ip", "link", "set", "lo", "up", ns=ns)
            _ip("ip", "link", "add", IFACE, "type", "veth", "peer", "name", f"b{i}", ns=ns)
            _ip("ip", "link", "set", f"b{i}", "netns", BRIDGE_NS, ns=ns)
            _ip("ip", "addr", "add", f"{self.addr(i)}/24", "dev", IFACE, ns=ns)
            _ip("ip", "link", "set", IFACE, "up", ns=ns)
            _ip("ip", "link", "set", f"b{i}", "master", "br0", ns=BRIDGE_NS)
            _ip("ip", "link", "set", f"b{i}", "up", ns=BRIDGE_NS)
        return self

    def close(self) -> None:
        for ns in leftover_namespaces():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def __enter__(self) -> "LinkLab":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------- shaping
    def _links(self):
        for i, ns in enumerate(self.namespaces):
            yield ns, IFACE
            yield BRIDGE_NS, f"b{i}"

    def shape(self, rate: str | None) -> None:
        """Limit both directions of every rank's link to ``rate`` (None: unshaped)."""
        for ns, dev in self._links():
            _ip("tc", "qdisc", "del", "dev", dev, "root", ns=ns, check=False)
            if rate is not None:
                bits = parse_rate(rate)
                _ip("tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst",
                    str(_burst(bits)), "latency", "100ms", ns=ns)
        self.rate = rate

    def qdiscs(self) -> list[str]:
        return [_ip("tc", "qdisc", "show", "dev", dev, ns=ns).stdout.strip()
                for ns, dev in self._links()]

    # -------------------------------------------------------------- running ranks
    def tx_bytes(self, rank: int) -> int:
        out = _ip("cat", f"/sys/class/net/{IFACE}/statistics/tx_bytes", ns=self.namespaces[rank])
        return int(out.stdout)

    def launch(self, cmd: Sequence[str], env: dict[str, str], port: int = 29511,
               log_dir: str | None = None) -> list[subprocess.Popen]:
        """Start rank i of ``cmd`` in namespace i with the torchrun-style environment and
        ``GLOO_SOCKET_IFNAME`` (gloo uses the shaped interface, not loopback)."""
        procs = []
        for i, ns in enumerate(self.namespaces):
            e = dict(env, RANK=str(i), LOCAL_RANK="0", WORLD_SIZE=str(self.nranks),
                     LOCAL_WORLD_SIZE="1", MASTER_ADDR=self.addr(0), MASTER_PORT=str(port),
                     GLOO_SOCKET_IFNAME=IFACE)
            out = open(os.path.join(log_dir, f"rank{i}.out"), "w") if log_dir else subprocess.DEVNULL
            procs.append(subprocess.Popen(["ip", "netns", "exec", ns, *cmd], env=e, stdout=out,
                                          stderr=subprocess.STDOUT))
        return procs
