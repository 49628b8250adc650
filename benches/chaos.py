"""Chaos at scale against the real agent and real mosquittos. Prints ONE JSON object.

    python benches/chaos.py [--kills 100] [--messages 10000] [--link-mib 2] [--link auto|netns|proxy]
                            [--disk-mib 2] [--seed 1]
                            [--only kills,messages,link,disk]

The scenarios are the functions the CI tests run small (tests/test_agent_chaos.py), here at full size:

* ``kills``: ``--kills`` SIGKILLs of ``python -m agent`` aimed in turn at fetch/verify/benchmark,
  the benchmark, report/activation, probation, and seeded-random moments, across rounds of new manifests
  and assignments; after each kill the active model is a complete verified blob or none, its metadata
  names it, no chunk is torn; each restart ends the benchmark children the killed agent left; the last
  restart converges on the last assignment (committed), with no temp file and no stray generation.
* ``messages``: ``--messages`` seeded hostile messages (random bytes, truncated and oversized JSON, wrong
  schema versions, hostile values, signatures from unknown keys, replayed assignments and commands) on
  every topic the agent subscribes to while it fetches: no crash, one ``rejected`` event per refusal,
  ping answered after, nothing changed.
* ``link``: a ``--link-mib`` variant fetched over a bad link (200 ms one way, 1 Mbit/s, 2 % loss), with
  the broker restarted a third of the way: fetched and verified, with the time, chunks and rates. As
  root with a usable ``ip netns`` it is a real kernel link (tests/netns_helpers.py): the broker in one
  network namespace, the agent in another, a veth pair between them throttled by tbf on both ends;
  delay and loss by netem when the kernel has ``sch_netem``, else loss by nftables (or iptables)
  random drops and the delay by a user-space proxy in the agent's namespace; the kernel's byte and
  drop counters are in the figures. Otherwise a loopback TCP proxy does all of it (2 % of segments
  held back 1 s; ``--link proxy`` forces it). ``link_mode`` says which ran, e.g.
  ``netns+tbf+nft-loss+proxy-delay``.
* ``disk``: the store on a small tmpfs (needs root), a ``--disk-mib`` variant whose chunks arrive after
  a filler file took the free space: DISK_FULL event, active model untouched, fetch completed once the
  filler is removed.

A scenario that fails is reported with its error (``"ok": false``) and the others still run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

# this file is benches/chaos.py: drop its directory from sys.path so `import agent` finds the package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.append(str(Path(__file__).resolve().parent.parent / "tests"))  # the scenarios live there


def tiny_models() -> Path:
    """The tests' float32/float16 .tflite pair and sample (built once with TensorFlow, cached)."""
    from test_agent_integration import _GEN, PY

    key = hashlib.sha256(_GEN.encode()).hexdigest()[:12]
    out = Path(tempfile.gettempdir()) / f"edgefleet-agent-test-models-{key}"
    if not (out / "sample.npz").exists():
        tmp = Path(tempfile.mkdtemp(prefix="edgefleet-gen-"))
        subprocess.run([PY, "-c", _GEN, str(tmp)], check=True, capture_output=True, timeout=300)
        if not out.exists():
            tmp.rename(out)
    return out


def _scenario(name: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    print(f"[chaos] {name} ...", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the scenarios print agent logs: stdout is the JSON
            figures = run()
        figures["ok"] = True
    except BaseException as err:  # a failed scenario is a result: the others still run
        if isinstance(err, KeyboardInterrupt):
            raise
        figures = {"ok": False, "error": f"{type(err).__name__}: {err}"[:2000]}
        traceback.print_exc(file=sys.stderr)
    figures["wall_s"] = round(time.monotonic() - t0, 1)
    print(f"[chaos] {name}: ok={figures['ok']} in {figures['wall_s']} s", file=sys.stderr, flush=True)
    return figures


def main() -> int:
    from agent.argparsing import StrictParser

    parser = StrictParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--link-mib", type=float, default=2.0)
    parser.add_argument("--link", choices=("auto", "netns", "proxy"), default="auto", help="bad link kind")
    parser.add_argument("--disk-mib", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", default="kills,messages,link,disk", help="comma-separated scenarios")
    args = parser.parse_args()
    wanted = set(args.only.split(","))

    import pytest  # noqa: F401 - the scenario module's fixtures need it importable
    import test_agent_chaos as chaos

    models = tiny_models()
    out: dict[str, Any] = {"bench": "chaos", "seed": args.seed}
    with tempfile.TemporaryDirectory(prefix="edgefleet-chaos-") as tmp_dir:
        tmp = Path(tmp_dir)

        def sub(name: str) -> Path:
            d = tmp / name
            d.mkdir()
            return d

        if "kills" in wanted:
            out["kills"] = _scenario(
                "kills", lambda: chaos.kill_chaos(models, sub("kills"), kills=args.kills, seed=args.seed)
            )
        if "messages" in wanted:

            def barrage() -> dict[str, Any]:
                with chaos.live_agent(models, sub("messages")) as live:
                    topics = chaos.start_ghost_fetch(live)
                    return chaos.hostile_barrage(live, topics, n=args.messages, seed=args.seed)

            out["messages"] = _scenario("messages", barrage)
        if "link" in wanted:
            size = int(args.link_mib * 2**20)
            out["link"] = _scenario(
                "link",
                lambda: chaos.bad_link_fetch(models, sub("link"), size, 64 * 1024, args.seed, link=args.link),
            )
        if "disk" in wanted:
            size = int(args.disk_mib * 2**20)

            def disk() -> dict[str, Any]:
                import _pytest.outcomes

                try:
                    return chaos.disk_full_fetch(models, sub("disk"), size, 16 * 1024, seed=args.seed)
                except _pytest.outcomes.Skipped as skip:
                    return {"skipped": str(skip)}

            out["disk"] = _scenario("disk", disk)
    out["all_ok"] = all(v.get("ok") for v in out.values() if isinstance(v, dict))
    print(json.dumps(out, indent=2))
    return 0 if out["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
