"""Contention bench: one variant measured quiet, then against a CPU hog on its core. Prints ONE JSON object.

    python benches/contention.py [--size 1024] [--min-seconds 2] [--hog-seconds 60]

The variant is a one-op FULLY_CONNECTED model of ``--size`` x ``--size`` float32 weights (built with
flatbuffers, no TensorFlow; the tests' builder). This process pins itself, hence the benchmark child it
spawns, to one core; the agent's own benchmark (:func:`agent.bench.benchmark_variant`, default
``[bench]`` settings unless overridden) runs twice:

* ``quiet``: nothing of ours on that core (other processes of the machine may still be: the figures say
  how much, and the flag says whether that was past the threshold);
* ``hog``: a busy-loop process pinned to the same core, started first and killed after the run (it also
  ends by itself after ``--hog-seconds``).

Each run reports p50/p95, ``contended``, the retry count and the contention figures of the window kept
(``other_share``, involuntary switches/s, frequency, throttling) and of every window tried.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# this file is benches/contention.py: drop its directory from sys.path so `import agent` finds the package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
_TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.append(str(_TESTS))  # the flatbuffers model builder and variant() of the tests


def _run(model: Path, variant: Any, cfg: Any, label: str) -> dict[str, Any]:
    from agent.bench import benchmark_variant

    t0 = time.monotonic()
    result = benchmark_variant(variant, model, None, cfg, board="bench")
    wall = time.monotonic() - t0
    lat = result.latency_ms
    out: dict[str, Any] = {
        "ok": result.ok,
        "error": result.error.value if result.error else None,
        "p50_ms": round(lat.p50, 4) if lat else None,
        "p95_ms": round(lat.p95, 4) if lat else None,
        "mean_ms": round(lat.mean, 4) if lat else None,
        "p99_ms": round(lat.p99, 4) if lat else None,
        "runs": lat.count if lat else None,
        "window_s": round(result.duration_s or 0.0, 3),
        "wall_s": round(wall, 2),
        "contended": result.contended,
        "retries": result.contention.retries if result.contention else None,
        "contention": result.contention.model_dump(mode="json") if result.contention else None,
    }
    print(
        f"[{label}] p50 {out['p50_ms']} ms contended={out['contended']} retries={out['retries']}",
        file=sys.stderr,
    )
    return out


def main() -> int:
    from agent.argparsing import StrictParser

    parser = StrictParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size", type=int, default=1024, help="FC weights are size x size float32")
    parser.add_argument("--min-seconds", type=float, default=None, help="[bench] min_seconds (default 2)")
    parser.add_argument("--min-runs", type=int, default=None, help="[bench] min_runs (default 100)")
    parser.add_argument("--max-retries", type=int, default=None, help="[bench] max_retries (default 2)")
    parser.add_argument("--hog-seconds", type=float, default=60.0, help="the hog ends by itself after this")
    args = parser.parse_args()

    import numpy as np
    from agent_helpers import build_fc_model
    from test_agent_bench import variant

    from agent.config import BenchConfig

    def produce() -> dict[str, Any]:
        overrides = {
            k: v
            for k, v in (
                ("min_seconds", args.min_seconds),
                ("min_runs", args.min_runs),
                ("max_retries", args.max_retries),
            )
            if v is not None
        }
        cfg = BenchConfig(**overrides)
        with tempfile.TemporaryDirectory(prefix="edgefleet-contention-") as tmp:
            model = Path(tmp) / "fc.tflite"
            rng = np.random.default_rng(0)
            n = args.size
            model.write_bytes(build_fc_model(rng.standard_normal((n, n)).astype(np.float32), np.zeros(n)))
            v = variant(model)
            saved = os.sched_getaffinity(0)
            core = min(saved)
            os.sched_setaffinity(0, {core})  # the child and the hog inherit it
            try:
                quiet = _run(model, v, cfg, "quiet")
                hog = subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        f"import time\nt=time.time()+{args.hog_seconds}\nwhile time.time()<t: pass",
                    ]
                )
                try:
                    time.sleep(0.2)
                    hogged = _run(model, v, cfg, "hog")
                finally:
                    hog.kill()
                    hog.wait(timeout=10)
            finally:
                os.sched_setaffinity(0, saved)
        return {
            "bench": "contention",
            "model": f"FULLY_CONNECTED {n}x{n} float32, threads=1",
            "core": core,
            "config": {
                "min_seconds": cfg.min_seconds,
                "min_runs": cfg.min_runs,
                "max_retries": cfg.max_retries,
                "max_other_share": cfg.max_other_share,
                "max_involuntary_per_s": cfg.max_involuntary_per_s,
            },
            "quiet": quiet,
            "hog": hogged,
            "p50_ratio_hog_over_quiet": round(hogged["p50_ms"] / quiet["p50_ms"], 3)
            if hogged["p50_ms"] and quiet["p50_ms"]
            else None,
            "loadavg_at_end": os.getloadavg(),
        }

    print(json.dumps(produce(), indent=2))  # progress went to stderr; the child's output to its pipes
    return 0


if __name__ == "__main__":
    sys.exit(main())
