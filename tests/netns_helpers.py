"""A bad link made of a real kernel link: two throwaway network namespaces joined by a veth pair, shaped
with ``tc`` on both ends, for the chaos tests' "bad link" (issue 14).

Layout: namespace A holds the broker, namespace B the agent; A's end of the veth pair is
``169.254.77.1/30``, B's ``169.254.77.2/30``. Each namespace has its own ``lo`` (brought up), so the test
reaches the broker on A's 127.0.0.1 without crossing the link, and only the agent's traffic is shaped.

Why link-local addresses on the veth, given the rule "only loopback addresses are ever a network target":
a veth pair cannot carry 127.0.0.0/8 (the kernel drops martian loopback packets that arrive on a
non-loopback device unless ``route_localnet`` is switched on, which would weaken the host for every
process). What the rule protects is "no test traffic can leave the machine or reach a service on it",
and this layout gives that same guarantee: both veth ends live only inside two namespaces created here
and deleted after the test, they hold no other interface, no route but their own /30 and no default
route, and the root namespace (the only one with a way out) is never joined to them. The addresses are
169.254/16 (RFC 3927 link-local: never forwarded by a router) so that even a misconfiguration could not
make them a target beyond the pair. Nothing in the root namespace changes: the interfaces are created
directly inside the namespaces (``ip link add ... netns A ... peer ... netns B``), the only names left
in the root namespace are the two ``/run/netns`` entries, removed by :meth:`NetnsLink.close` (and a run
killed before that leaves names with its pid in them, swept by the next run once that pid is gone).

Shaping, decided at run time on the real device, best first:
- rate: ``tbf`` on both veth ends (the kernel), always;
- delay: ``netem delay`` as the root qdisc with the tbf under it, when the kernel has ``sch_netem``;
  otherwise a user-space delay proxy (the test's ``SlowLink`` with no throttle and no loss) listening on
  B's loopback in front of the agent: the 200 ms then sit outside the kernel's TCP, whose own round trip
  stays short (said in :attr:`NetnsLink.mode`);
- loss: ``netem loss`` when netem is there; else nftables ``numgen random`` drops on the ingress of both
  veth ends (real dropped packets that the kernel's TCP must retransmit); else iptables
  ``-m statistic --mode random`` in both namespaces' INPUT; else the proxy's hold-back model.
So on a host with ``sch_netem`` the whole link is in the kernel and no proxy runs.

The test process enters a namespace by ``setns(2)`` on its *calling thread only* (:meth:`NetnsLink.inside`),
which is what ``ip netns exec`` does before it execs: a process started there (broker, agent) is born
in that namespace and is still our direct child, stopped by its PID; a socket created there stays in
it; threads started there (paho's loop, the proxy) stay in it. The thread is always switched back.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

NETNS_DIR = Path("/run/netns")
ADDR_A = "169.254.77.1"  # the broker's end
ADDR_B = "169.254.77.2"  # the agent's end
_PREFIX = "edgefleet-"  # namespaces are named edgefleet-<pid>-<n>-a|b
_CLONE_NEWNET = 0x40000000
_TIMEOUT_S = 10.0  # every ip/tc/nft call answers in milliseconds; a hang is a failure
_serial = itertools.count()

Side = Literal["a", "b"]
SIDES: tuple[Side, Side] = ("a", "b")
Loss = Literal["netem", "nft", "iptables", "proxy", "none"]
_LOSS_MEANS: dict[Loss, str] = {
    "netem": "netem",
    "nft": "nftables random drops on both veth ingresses",
    "iptables": "iptables statistic drops in both INPUT chains",
    "proxy": "the delay proxy holding a segment back 1 s (what TCP makes of a loss)",
    "none": "nothing (none asked)",
}


class LinkError(RuntimeError):
    """A step of building the link failed (the message holds the command and its stderr)."""


def _run(
    args: list[str], ns: str | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command, in namespace ``ns`` if given (``ip -n``/``tc -n``, else ``ip netns exec``)."""
    cmd = args
    if ns is not None:
        cmd = (
            [args[0], "-n", ns, *args[1:]] if args[0] in ("ip", "tc") else ["ip", "netns", "exec", ns, *args]
        )
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False)


def _must(args: list[str], ns: str | None = None, stdin: str | None = None) -> str:
    done = _run(args, ns, stdin)
    if done.returncode != 0:
        where = f" (in {ns})" if ns else ""
        raise LinkError(f"`{' '.join(args)}`{where} failed: {(done.stderr or done.stdout).strip()}")
    return done.stdout


def _setns(fd: int) -> None:
    """setns(fd, CLONE_NEWNET) for the calling thread (os.setns exists only from Python 3.12)."""
    native = getattr(os, "setns", None)
    if native is not None:
        native(fd, _CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def sweep_stale() -> list[str]:
    """Delete namespaces that a killed earlier run of these helpers left (its pid is in the name and is
    gone); namespaces of a run still alive, and any other namespace, are left alone."""
    gone = []
    for path in sorted(NETNS_DIR.glob(f"{_PREFIX}*")) if NETNS_DIR.is_dir() else []:
        m = re.fullmatch(rf"{_PREFIX}(\d+)-\d+-[ab]", path.name)
        stale = m is not None and not Path(f"/proc/{m.group(1)}").exists()
        if stale and _run(["ip", "netns", "del", path.name]).returncode == 0:
            gone.append(path.name)
    return gone


def ours() -> list[str]:
    """The namespaces this process made and has not deleted (none, once every link is closed)."""
    return sorted(p.name for p in NETNS_DIR.glob(f"{_PREFIX}{os.getpid()}-*")) if NETNS_DIR.is_dir() else []


def netns_unavailable() -> str | None:
    """Why a namespace link cannot be built here (None: it can). Probes for real: two namespaces, a veth
    pair between them and a tbf qdisc, all deleted again (≈ 0.1 s)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth and tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    try:
        with NetnsLink(LinkShape(delay_s=0.0, rate_bps=1e6, loss=0.0), probe=True):
            return None
    except (LinkError, OSError, subprocess.TimeoutExpired) as err:
        return f"a namespace link cannot be built here: {err}"


@dataclass(frozen=True)
class LinkShape:
    delay_s: float = 0.2  # one way, each direction
    rate_bps: float = 1e6  # each direction
    loss: float = 0.02  # per packet, each direction


class NetnsLink:
    """Namespaces A (broker) and B (agent) joined by a shaped veth pair; a context manager that deletes
    everything on exit, also when building it failed half-way.

    After :meth:`open`: :attr:`delay_by` is ``"netem"``, or ``"proxy"`` (the caller must then put a delay
    proxy in front of the agent, see the module docstring); :attr:`loss_by` is ``"netem"``, ``"nft"``,
    ``"iptables"``, ``"proxy"`` (the caller's proxy must then also model the loss) or ``"none"``;
    :attr:`mode` names it all, e.g. ``netns+tbf+nft-loss+proxy-delay``.
    """

    def __init__(self, shape: LinkShape, *, probe: bool = False) -> None:
        self.shape = shape
        self.probe = probe  # only check that namespaces, veth and tbf work: no netem/loss detection
        base = f"{_PREFIX}{os.getpid()}-{next(_serial)}"
        self.ns: dict[Side, str] = {"a": f"{base}-a", "b": f"{base}-b"}
        self.dev: dict[Side, str] = {"a": "efa0", "b": "efb0"}  # exist only inside their namespace
        self.addr: dict[Side, str] = {"a": ADDR_A, "b": ADDR_B}
        self.delay_by: Literal["netem", "proxy"] = "proxy"
        self.loss_by: Loss = "none"
        self.notes: list[str] = []  # why a kernel means was not used
        self._made: list[str] = []

    @property
    def mode(self) -> str:
        parts = ["netns", "tbf"]
        if self.delay_by == "netem":
            parts.append("netem-delay")
        if self.loss_by not in ("proxy", "none"):
            parts.append(f"{self.loss_by}-loss")
        if self.delay_by == "proxy":
            parts.append("proxy-delay")
        if self.loss_by == "proxy":
            parts.append("proxy-holdback")
        return "+".join(parts)

    def describe(self) -> str:
        s = self.shape
        delay = "netem" if self.delay_by == "netem" else "a delay proxy in B"
        return (
            f"veth between namespaces A (broker, {ADDR_A}) and B (agent, {ADDR_B}): "
            f"{s.rate_bps / 1e6:g} Mbit/s by tbf, {s.delay_s * 1000:g} ms one way by {delay}, "
            f"{s.loss * 100:g} % loss by {_LOSS_MEANS[self.loss_by]}"
        )

    # ---------------------------------------------------------------------------------------- building

    def open(self) -> Self:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        if not self.probe:
            sweep_stale()
        for side in SIDES:
            _must(["ip", "netns", "add", self.ns[side]])
            self._made.append(self.ns[side])
        # made inside the namespaces: no interface ever appears in the root namespace
        a, b = self.ns["a"], self.ns["b"]
        peer = ["peer", "name", self.dev["b"], "netns", b]
        _must(["ip", "link", "add", self.dev["a"], "netns", a, "type", "veth", *peer])
        for side in SIDES:
            ns, dev = self.ns[side], self.dev[side]
            _must(["ip", "addr", "add", f"{self.addr[side]}/30", "dev", dev], ns)
            _must(["ip", "link", "set", "lo", "up"], ns)
            # wire-sized packets, as on a real link: otherwise veth passes 64 KiB GSO aggregates and a
            # "lost packet" would be 45 segments at once
            small = ["ip", "link", "set", dev, "gso_max_size", "1500"]
            if _run([*small, "gro_max_size", "1500"], ns).returncode and _run(small, ns).returncode:
                self.notes.append("could not limit GSO: shaping acts on aggregated packets")
            _must(["ip", "link", "set", dev, "up"], ns)
        if self.probe:
            _must(self._tbf("a", "root"), a)
            return
        self.delay_by = "netem" if self._try_netem() else "proxy"
        for side in SIDES:
            _must(
                self._tbf(side, "parent 1:1 handle 10:" if self.delay_by == "netem" else "root"),
                self.ns[side],
            )
        if self.shape.loss == 0:
            self.loss_by = "none"
        elif self.delay_by == "netem":
            self.loss_by = "netem"
        else:
            self.loss_by = self._kernel_loss()

    def _tbf(self, side: Side, where: str) -> list[str]:
        rate = self.shape.rate_bps
        burst = max(4096, int(rate / 8 / 100))  # 10 ms of traffic, and at least a few full frames
        tbf = ["tbf", "rate", f"{int(rate)}bit", "burst", str(burst), "latency", "400ms"]
        return ["tc", "qdisc", "add", "dev", self.dev[side], *where.split(), *tbf]

    def _try_netem(self) -> bool:
        """netem as the root qdisc of both ends, the tbf under it (the netem wiki's "rate control"
        layout), when the kernel has sch_netem; False (and nothing left behind) when it does not."""
        args = ["delay", f"{self.shape.delay_s * 1000:g}ms"]
        if self.shape.loss > 0:
            args += ["loss", f"{self.shape.loss * 100:g}%"]
        for side in SIDES:
            add = ["tc", "qdisc", "add", "dev", self.dev[side], "root", "handle", "1:", "netem", *args]
            done = _run(add, self.ns[side])
            if done.returncode != 0:
                self.notes.append(f"netem: {done.stderr.strip()}")
                _run(["tc", "qdisc", "del", "dev", self.dev["a"], "root"], self.ns["a"])
                return False
        return True

    def _kernel_loss(self) -> Loss:
        """Random drops on what arrives over the link at each end: real lost packets that the sending
        kernel only learns of the way it would on a wire (no ACK), and retransmits."""
        per_10k = round(self.shape.loss * 10_000)
        if shutil.which("nft"):
            try:
                for side in SIDES:
                    rules = (
                        "table netdev edgefleet_link {\n"
                        "  chain lossy {\n"
                        f'    type filter hook ingress device "{self.dev[side]}" priority 0;\n'
                        "    counter\n"  # every packet that came over the link
                        f"    numgen random mod 10000 < {per_10k} counter drop\n"
                        "  }\n"
                        "}\n"
                    )
                    _must(["nft", "-f", "-"], self.ns[side], stdin=rules)
                return "nft"
            except LinkError as err:
                self.notes.append(str(err))
        if shutil.which("iptables"):
            try:
                for side in SIDES:
                    match = ["-m", "statistic", "--mode", "random", "--probability", f"{self.shape.loss:g}"]
                    _must(
                        ["iptables", "-A", "INPUT", "-i", self.dev[side], *match, "-j", "DROP"], self.ns[side]
                    )
                return "iptables"
            except LinkError as err:
                self.notes.append(str(err))
        if not shutil.which("nft") and not shutil.which("iptables"):
            self.notes.append("neither nft nor iptables is installed")
        return "proxy"

    # ------------------------------------------------------------------------------------------- using

    @contextlib.contextmanager
    def inside(self, side: Side) -> Iterator[None]:
        """Run the block with the calling thread in namespace ``side`` (see the module docstring)."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(NETNS_DIR / self.ns[side], os.O_RDONLY)
            try:
                _setns(target)
                try:
                    yield
                finally:
                    _setns(home)
            finally:
                os.close(target)
        finally:
            os.close(home)

    def counters(self) -> dict[str, int]:
        """What the kernel counted: bytes and packets each way over the veth, tbf drops (its queue
        overflowing), and the random drops of the loss rule, per direction."""
        out: dict[str, int] = {}
        into: dict[Side, str] = {"a": "agent_to_broker", "b": "broker_to_agent"}  # what arrives at a side
        for side in SIDES:
            ns, dev, way = self.ns[side], self.dev[side], into["b" if side == "a" else "a"]
            (link,) = json.loads(_must(["ip", "-j", "-s", "link", "show", "dev", dev], ns))
            out[f"wire_bytes_{way}"] = int(link["stats64"]["tx"]["bytes"])
            out[f"wire_packets_{way}"] = int(link["stats64"]["tx"]["packets"])
            qdiscs = json.loads(_must(["tc", "-j", "-s", "qdisc", "show", "dev", dev], ns))
            out[f"tbf_dropped_{way}"] = sum(int(q.get("drops", 0)) for q in qdiscs if q.get("kind") == "tbf")
            if self.loss_by == "netem":  # netem drops on the sending end
                out[f"lost_{way}"] = sum(int(q.get("drops", 0)) for q in qdiscs if q.get("kind") == "netem")
        for side in SIDES:  # the rules sit on the receiving end
            if self.loss_by == "nft":
                counts = re.findall(
                    r"counter packets (\d+)", _must(["nft", "list", "ruleset"], self.ns[side])
                )
                out[f"lost_{into[side]}"] = int(counts[1])
            elif self.loss_by == "iptables":
                rows = _must(["iptables", "-nvxL", "INPUT"], self.ns[side]).splitlines()[2:]
                out[f"lost_{into[side]}"] = sum(int(r.split()[0]) for r in rows if "DROP" in r)
        return out

    def close(self) -> None:
        """Delete both namespaces (the veth pair and every qdisc and rule in them go with them). A
        process still in one keeps it alive until it exits: the caller stops its processes first."""
        errors = []
        for ns in reversed(self._made):
            done = _run(["ip", "netns", "del", ns])
            if done.returncode != 0 and (NETNS_DIR / ns).exists():
                errors.append(f"{ns}: {done.stderr.strip()}")
        self._made.clear()
        if errors:
            raise LinkError(f"could not delete namespace(s): {errors}")

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
