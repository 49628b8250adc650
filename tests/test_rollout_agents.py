"""A staged rollout over THREE REAL AGENTS: the canary's health check fails, it rolls back on its
own, the controller halts, and the two other agents never see the new assignment.

Three ``python -m agent`` subprocesses (each its own store and config) share one private mosquitto; the
controller is ``edgefleet rollout`` (deploy.control.rollout.RolloutController) in-process. The canary is made
to
fail by configuration only: float16's manifest gives a host sample accuracy of 0.0 and the canary's
``[health] accuracy_tolerance`` is 0, so its post-activation accuracy check cannot pass; the other agents
have a tolerance of 1.0 (they would commit). ``[bench] accuracy_tolerance = 1.0`` everywhere, so the
reports do not mark float16 failed and the policy (highest host accuracy) picks it for every device.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from pathlib import Path

import pytest
from agent_helpers import (
    kill9,
    link_sha,
    model_record,
    publish_many,
    signed_assignment,
    start_agent,
    terminate,
)
from broker_helpers import fleet_source
from test_agent_chaos import chunk_items
from test_agent_integration import CHUNK, MODEL, Bus, tiny_models, variant_for, write_config

from agent.wire import BlobRef, HostMetrics, Manifest, Topics, sign
from deploy import cli
from deploy.broker.client import BrokerOptions
from deploy.broker.spawn import MosquittoBroker, find_mosquitto
from deploy.keys import init_keys, load_signing_key, public_text

__all__ = ["tiny_models"]  # re-exported fixture

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed"),
]

TOPICS = Topics()
DEVICES = ["agent-a", "agent-b", "agent-c"]  # agent-a is the canary (named on the command line)


def test_canary_health_failure_halts_the_rollout_of_real_agents(
    tiny_models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_path = init_keys(tmp_path / "keys").private_path
    key = load_signing_key(key_path)
    pub = public_text(key.public_key())
    f32 = (tiny_models / "float32.tflite").read_bytes()
    f16 = (tiny_models / "float16.tflite").read_bytes()
    sample = (tiny_models / "sample.npz").read_bytes()
    v32 = variant_for("float32", f32, "none")  # no sample: its health check is "loads, finite outputs"
    v32 = v32.model_copy(update={"metrics": HostMetrics(size_bytes=len(f32), accuracy=0.90)})
    v16 = variant_for("float16", f16, "float16", BlobRef.of(sample, CHUNK))
    v16 = v16.model_copy(
        update={"metrics": HostMetrics(size_bytes=len(f16), accuracy=0.95, sample_accuracy=0.0)}
    )
    manifest = sign(
        Manifest(model=MODEL, version=1, created_at=time.time(), baseline="float32", variants=[v32, v16]), key
    )
    procs: dict[str, subprocess.Popen[bytes]] = {}
    with MosquittoBroker() as broker, contextlib.ExitStack() as stack:
        # The rollout plans from the collector's store, as an operator's would.
        options = BrokerOptions(host=broker.host, port=broker.port)
        where, synced = stack.enter_context(fleet_source("store", options, tmp_path / "fleet.db"))
        bus = Bus(broker, TOPICS)
        publish_many(bus.client, [*chunk_items(f32), *chunk_items(f16), *chunk_items(sample)])
        bus.publish(TOPICS.manifest(MODEL), manifest.to_json())
        before: dict[str, bytes] = {}
        stores: dict[str, Path] = {}
        try:
            for dev in DEVICES:
                d = tmp_path / dev
                d.mkdir()
                cfg = write_config(d, broker, pub, d / "store")
                tolerance = "0.0" if dev == "agent-a" else "1.0"
                text = cfg.read_text().replace('id = "pi-test"', f'id = "{dev}"')
                text = text.replace("[health]", f"[health]\naccuracy_tolerance = {tolerance}")
                text = text.replace("[bench]", "[bench]\naccuracy_tolerance = 1.0")
                cfg.write_text(text)
                stores[dev] = d / "store"
                # every device starts on float32, committed (the rollout's "previous model")
                before[dev] = signed_assignment(key, dev, MODEL, "float32", v32.sha256, 1, policy="before")
                bus.publish(TOPICS.assign(dev, MODEL), before[dev])
                procs[dev] = start_agent(cfg, d / "agent.log")
            for dev in DEVICES:
                bus.wait_for(
                    lambda t, o, dev=dev: (
                        t == TOPICS.status(dev)
                        and o.get("models", {}).get(MODEL, {}).get("state") == "committed"
                        and o["models"][MODEL]["active"]["variant"] == "float32"
                    ),
                    timeout=60,
                )
            with bus.cond:
                bus.messages.clear()  # from here on: what the rollout causes

            synced(reports=len(DEVICES), manifests=1)
            args = [
                "--host", broker.host, "--port", str(broker.port), "--key", str(key_path),
                "--state-db", str(tmp_path / "rollouts.db"), *where,
            ]  # fmt: skip
            t0 = time.monotonic()
            # Three agents benchmarking at once on the CI machine's cores disturb each other's timed
            # windows by design: their results come out contended, which the default policy does not
            # rank. This test is about the canary's health check, not measurement quality.
            policy = tmp_path / "policy.toml"
            policy.write_text("[default]\nreject_contended = false\n")
            run = ["rollout", MODEL, "--canary-device", "agent-a", "--policy", str(policy), "--wait"]
            code = cli.main([*run, "--timeout", "60", "--json", *args])
            out = capsys.readouterr()
            print(out.err[-3000:])
            assert code == 2, out.err
            summary = json.loads(out.out)
            print(f"rollout halted after {time.monotonic() - t0:.1f} s")
            assert summary["state"] == "halted", summary
            assert "canary agent-a rolled back" in summary["reason"]
            by = {d["device"]: d for d in summary["devices"]}
            assert by["agent-a"]["role"] == "canary" and by["agent-a"]["variant"] == "float16"
            assert by["agent-a"]["outcome"] == "rolled_back"
            for dev in ("agent-b", "agent-c"):
                assert by[dev]["role"] == "rest" and by[dev]["assigned_at"] is None

            # the canary rolled back on its own (health check), to its previous model
            ev = bus.wait_for(
                lambda t, o: (
                    t == TOPICS.events("agent-a")
                    and o.get("kind") == "rolled_back"
                    and o.get("reason") == "HEALTH_CHECK_FAILED"
                ),
                timeout=5,
            )
            assert ev["variant"] == "float16" and "ACCURACY_MISMATCH" in ev["detail"]
            # the retained assignment was put back byte for byte; the agent settles on float32 again
            deadline = time.monotonic() + 30
            while True:
                rec = model_record(stores["agent-a"], MODEL)
                if (
                    rec
                    and rec["state"] in ("committed", "rolled_back")
                    and rec["active"]["variant"] == "float32"
                ):
                    break
                assert time.monotonic() < deadline, rec
                time.sleep(0.05)
            assert link_sha(stores["agent-a"], MODEL) == v32.sha256

            # non-canaries never received the new assignment: nothing happened to them at all
            time.sleep(1.0)  # room for a stray assignment to show up
            with bus.cond:
                seen = list(bus.messages)
            for dev in ("agent-b", "agent-c"):
                kinds = [json.loads(p).get("kind") for t, p, _ in seen if t == TOPICS.events(dev) and p]
                assert not {"activated", "rolled_back", "rejected"} & set(kinds), (dev, kinds)
                rec = model_record(stores[dev], MODEL)
                assert rec is not None and rec["state"] == "committed"
                assert rec["active"]["variant"] == "float32"
                assert link_sha(stores[dev], MODEL) == v32.sha256
            retained = {}
            sub = Bus(broker, Topics())
            try:
                time.sleep(0.5)
                with sub.cond:
                    retained = {t: p for t, p, r in sub.messages if r and "/assign/" in t}
            finally:
                sub.close()
            for dev in DEVICES:
                assert retained.get(TOPICS.assign(dev, MODEL)) == before[dev], dev
            for dev, proc in procs.items():
                assert proc.poll() is None, dev
                assert terminate(proc) == 0, dev
                assert "Traceback" not in (tmp_path / dev / "agent.log").read_text(errors="replace")
        finally:
            for proc in procs.values():
                kill9(proc)
            bus.close()
