"""The host command line, ``edgefleet``.

::

    edgefleet keys init [--dir DIR] [--force]        create the fleet signing key (prints its id)
    edgefleet keys show [--dir DIR]                  print the public key and its id
    edgefleet publish BUNDLE [--key K]               verify, sign and publish a bundle (chunks, then manifest)
    edgefleet select --model M [--policy P] [--json] show what the policy would choose per device
    edgefleet assign --model M [--policy P] [--device D ...] [--key K] [--dry-run]
                     (both: [--db URL | --from-broker] [--allow-partial], see "Where the fleet is read")
    edgefleet fleet [--model M] [--json] [--db URL]  devices, active variants, state, latency, energy
    edgefleet report DEVICE [--model M] [--json] [--db URL]    every benchmark result of one device
    edgefleet plot MODEL --out FILE.png              latency (p50, log) vs host accuracy per device
    edgefleet rollout MODEL [--canary N | --canary-percent P] [--wait] [--timeout S] [--resume]
    edgefleet rollout status|abort MODEL             staged rollouts (see deploy/control/rollout.py)
    edgefleet controller [--db URL] [--policy P]     assign and roll out by policy, long-running
    edgefleet approve|mode|pause|resume ...          steer the controller (see deploy/control/controller.py)
    edgefleet cmd DEVICE ping|rebenchmark|cancel|rollback [--model M] [--wait S]   signed command
    edgefleet schema --out DIR                       JSON Schemas of every wire message
    edgefleet compress ...                           (provided by the compressor, when installed)
    edgefleet demo ...                               (end-to-end demo)

Broker options (publish/select/assign/fleet/report/plot/rollout/cmd; rollout calls --timeout
--connect-timeout): --config FILE, --host, --port, --username, --password-file, --tls-ca,
--tls-cert, --tls-key, --mqtt v5|v311, --namespace. They come from the host configuration file
(``deploy/hostconfig.py``: ``--config``, else ``$EDGEFLEET_HOST_CONFIG``, else
``~/.config/edgefleet/host.toml``, else ``/etc/edgefleet/host.toml``; ``edgefleet broker-config`` writes
one for the controller); a flag given on the command line overrides its key. The first line on stderr
names the broker and where its settings came from.

Where the fleet is read (select, assign, rollout's plan, fleet, report): ``--db URL``, the collector's
store (a file, ``sqlite:///PATH`` or ``postgresql://USER@HOST:PORT/DB``, see
``deploy/observe/store_sql.py``); else
``$EDGEFLEET_COLLECTOR_DB`` (a URL, or a file when it exists) or ``/var/lib/edgefleet-collector/fleet.db``
when it exists (a stderr line says so); no store there is an error (exit 2) naming what to run.
Only with ``--from-broker`` (lab mode, never implicit) the broker's retained messages are read, a burst
the broker cuts past its queue limit: a burst that looks cut is named on stderr, and
select/assign/rollout then refuse to decide (exit 2) unless ``--allow-partial`` (see
``deploy/observe/state.py``).

Exit codes: 0 success, 1 usage error, 2 an expected failure (message on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agent import wire
from agent.argparsing import StrictParser
from deploy.errors import BrokerError, DeployError

EXIT_OK = 0
EXIT_USAGE = 1
EXIT_FAILED = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C


class _Parser(StrictParser):
    """argparse exits 2 on usage errors; edgefleet keeps 2 for failures and uses 1 for usage."""

    usage_exit = EXIT_USAGE


def _err(message: str) -> None:
    print(f"edgefleet: {message}", file=sys.stderr, flush=True)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------
# Broker options


def _broker_parent(timeout_flag: str = "--timeout") -> _Parser:
    """Broker flags; ``timeout_flag`` renames --timeout for commands that use it for something else."""
    p = _Parser(add_help=False)
    # Defaults are None: a flag left out must not override the host config file (deploy.hostconfig).
    g = p.add_argument_group(
        "broker",
        "default: --config, else $EDGEFLEET_HOST_CONFIG, else ~/.config/edgefleet/host.toml, else "
        "/etc/edgefleet/host.toml, else 127.0.0.1:1883; flags override the file",
    )
    g.add_argument("--config", type=Path, help="host config file (TOML) with the broker connection")
    g.add_argument("--host", help="MQTT broker host (default: 127.0.0.1)")
    g.add_argument("--port", type=int, help="MQTT broker port (default: 8883 with TLS, else 1883)")
    g.add_argument(
        "--broker",
        action="append",
        metavar="HOST:PORT[,...]",
        help="broker endpoint(s) of a cluster, tried in turn on failure (repeat or comma list; "
        "HOST:PORT@TLS-NAME to verify another certificate name); replaces --host/--port",
    )
    g.add_argument("--username", help="MQTT user name")
    g.add_argument("--password-file", type=Path, help="file holding the MQTT password (first line)")
    g.add_argument("--tls-ca", type=Path, help="CA certificate (PEM) to verify the broker; enables TLS")
    g.add_argument("--tls-cert", type=Path, help="client certificate (PEM)")
    g.add_argument("--tls-key", type=Path, help="client certificate's private key (PEM)")
    g.add_argument("--mqtt", choices=["v5", "v311"], help="protocol version (default: v5)")
    g.add_argument("--namespace", help=f"topic namespace (default: {wire.DEFAULT_NAMESPACE})")
    g.add_argument(
        timeout_flag, dest="timeout", type=float, help="connect / ack timeout, seconds (default: 10)"
    )
    return p


def broker_options(args: argparse.Namespace, announce: Callable[[str], None] | None = None) -> Any:
    """BrokerOptions from the host config file and the broker flags given (reads the password file).

    ``announce`` receives one line saying which broker, as whom, and from which file.
    """
    from deploy.hostconfig import resolve_broker

    # A key from the command line with a certificate from the file would pair unrelated files.
    if getattr(args, "tls_key", None) and not getattr(args, "tls_cert", None):
        raise BrokerError("--tls-key needs --tls-cert")
    resolved = resolve_broker(args)
    if announce is not None:
        announce(resolved.describe())
    return resolved.options


def _session(args: argparse.Namespace) -> Any:
    from deploy.broker.client import MqttSession

    options = broker_options(args, announce=_progress)  # the first progress line of every host command
    return MqttSession(options, ack_timeout_s=max(options.connect_timeout_s, 30.0))


# --------------------------------------------------------------------------------------------------------
# Commands


def _cmd_keys_init(args: argparse.Namespace) -> int:
    from deploy.keys import init_keys

    pair = init_keys(args.dir, force=args.force)
    print(f"key id:      {pair.key_id}")
    print(f"private key: {pair.private_path} (mode 0600, keep it on this host)")
    print(f"public key:  {pair.public_path}")
    print(f"             {pair.public_text}")
    return EXIT_OK


def _cmd_keys_show(args: argparse.Namespace) -> int:
    from deploy.keys import PRIVATE_NAME, default_key_dir, load_signing_key, public_text

    key = load_signing_key((args.dir or default_key_dir()) / PRIVATE_NAME)
    print(f"key id:     {wire.key_id_for(key.public_key())}")
    print(f"public key: {public_text(key.public_key())}")
    return EXIT_OK


def _cmd_publish(args: argparse.Namespace) -> int:
    from deploy.control.publish import load_bundle, publish_bundle
    from deploy.keys import load_signing_key
    from deploy.progress import ByteProgress

    bundle = load_bundle(args.bundle)  # before connecting: a broken bundle fails fast
    key = load_signing_key(args.key)
    bar = ByteProgress("publishing", bundle.total_bytes, sys.stderr)  # drawn on a terminal only

    def say(message: str) -> None:
        bar.clear()
        _progress(message)

    with _session(args) as session:
        try:
            result = publish_bundle(
                bundle,
                key,
                session,
                progress=say,
                allow_downgrade=args.allow_downgrade,
                on_bytes=bar.update,
            )
        finally:
            bar.clear()
    print(
        json.dumps(
            {
                "model": result.manifest.model,
                "version": result.manifest.version,
                "topic": result.manifest_topic,
                "key_id": result.manifest.signature.key_id if result.manifest.signature else None,
                "blobs": result.blobs,
                "chunks": result.chunks,
                "bytes": result.bytes,
                "cleared_blobs": result.cleared_blobs,
                "seconds": round(result.seconds, 3),
            },
            sort_keys=True,
        )
    )
    return EXIT_OK


def _plan(args: argparse.Namespace, session: Any) -> Any:
    """Read the fleet (the collector's store, or with --from-broker the broker's retained burst), then select.

    A burst that looks cut is refused unless --allow-partial: deciding on it would silently leave out
    the devices the broker dropped.
    """
    from deploy.control.assign import plan
    from deploy.control.select import load_policy
    from deploy.errors import StateError
    from deploy.observe.state import collect_state, state_from_store

    policy = load_policy(args.policy)
    model = wire.check_id(args.model, "model")
    if args.db is not None:
        state = state_from_store(args.db, model)
        if model not in state.manifests:
            # The collector's ACL may not let it read manifests; the manifests alone are never cut.
            try:
                if session is None:
                    with _session(args) as own:
                        state.manifests.update(_broker_manifests(own))
                else:
                    state.manifests.update(_broker_manifests(session))
            except BrokerError as err:
                raise StateError(
                    f"{state.source} holds no manifest for model {model!r} and the broker could not be read "
                    f"for it: {err}"
                ) from err
    else:
        state = collect_state(session, model)
        if state.cut:
            if not args.allow_partial:
                raise StateError(f"{state.cut_message()}; --allow-partial decides on what arrived")
            _err(f"warning: {state.cut_message()} (--allow-partial: deciding on what arrived)")
    return plan(state, model, policy, args.device or None)


def _broker_manifests(session: Any) -> dict[str, wire.Manifest]:
    """Every manifest the broker holds retained (a few messages: never cut)."""
    from deploy.observe.state import parse_state

    raw = session.collect_retained([session.topics.all_manifests()])
    return dict(parse_state(raw, session.topics).manifests)


def _print_plan(plan: Any, as_json: bool) -> None:
    from deploy.observe.fleet import decisions_table

    if as_json:
        print(json.dumps([d.to_json() for d in plan.decisions], indent=2, sort_keys=True))
        return
    m = plan.manifest
    print(f"model {m.model} v{m.version}: {len(m.variants)} variant(s), baseline {m.baseline}")
    if plan.decisions:
        print(decisions_table(plan.decisions))
    else:
        print("no device has reported on this manifest version yet")
    if plan.devices_without_report:
        print(f"no report for this version from: {', '.join(plan.devices_without_report)}")
    for line in plan.state.skipped:
        _err(f"warning: skipped {line}")


def _cmd_select(args: argparse.Namespace) -> int:
    from deploy.observe.views import chosen_db

    args.db = chosen_db(args)
    if args.db is not None:
        plan = _plan(args, None)  # the store alone: the broker only if it lacks the manifest
    else:
        with _session(args) as session:
            plan = _plan(args, session)
    _print_plan(plan, args.json)
    return EXIT_OK


def _cmd_assign(args: argparse.Namespace) -> int:
    from deploy.control.assign import assign
    from deploy.keys import load_signing_key
    from deploy.observe.views import chosen_db

    key = None if args.dry_run else load_signing_key(args.key)
    args.db = chosen_db(args)
    with _session(args) as session:
        plan = _plan(args, session)
        _print_plan(plan, args.json)
        if key is None:
            return EXIT_OK
        result = assign(plan.decisions, key, session, existing=plan.state, progress=_progress)
    _progress(
        f"assigned {len(result.published)}, unchanged {len(result.unchanged)}, "
        f"kept current {len(result.kept)} (no variant met the policy)"
    )
    return EXIT_OK


def write_schemas(out: Path) -> list[Path]:
    """Write one pretty JSON Schema file per wire message into ``out``."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name, schema in sorted(wire.json_schemas().items()):
            path = out / name
            path.write_text(json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n", "utf-8")
            written.append(path)
    except OSError as err:
        raise DeployError(f"cannot write schemas to {out}: {err}") from err
    return written


def _cmd_schema(args: argparse.Namespace) -> int:
    for path in write_schemas(args.out):
        print(path)
    return EXIT_OK


def _register_compress(sub: Any) -> None:
    """Let the compressor add ``compress``; without it (device install, or not written yet) say why."""
    try:
        ccli = importlib.import_module("compressor.cli")
    except ModuleNotFoundError as err:
        if err.name in ("compressor", "compressor.cli"):
            return
        reason = f"{err}"
    except ImportError as err:
        reason = f"{err}"
    else:
        ccli.register(sub)
        return

    def _unavailable(_: argparse.Namespace) -> int:
        _err(f"compress needs the host extras (pip install 'edgefleet[host]'): {reason}")
        return EXIT_FAILED

    p = sub.add_parser("compress", help="compress a Keras model (needs the host extras)")
    p.set_defaults(func=_unavailable)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="edgefleet", description="Compress, publish, select and assign TFLite models to a fleet."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    broker = _broker_parent()

    keys = sub.add_parser("keys", help="manage the fleet signing key")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", parser_class=_Parser)
    keys_sub.required = True
    k_init = keys_sub.add_parser("init", help="create the Ed25519 signing key")
    k_init.add_argument(
        "--dir", type=Path, help="key directory (default: $EDGEFLEET_HOME or ~/.config/edgefleet)"
    )
    k_init.add_argument("--force", action="store_true", help="replace an existing key")
    k_init.set_defaults(func=_cmd_keys_init)
    k_show = keys_sub.add_parser("show", help="print the public key and its id")
    k_show.add_argument("--dir", type=Path, help="key directory")
    k_show.set_defaults(func=_cmd_keys_show)

    key_help = "signing key (PEM; default: $EDGEFLEET_HOME/signing.key or ~/.config/edgefleet/signing.key)"

    pub = sub.add_parser("publish", parents=[broker], help="sign and publish a bundle")
    pub.add_argument("bundle", type=Path, help="bundle directory (with manifest.json)")
    pub.add_argument("--key", type=Path, help=key_help)
    pub.add_argument(
        "--allow-downgrade", action="store_true", help="publish even if the broker holds a newer version"
    )
    pub.set_defaults(func=_cmd_publish)

    def model_args(p: argparse.ArgumentParser) -> None:
        from deploy.observe.views import source_args

        p.add_argument("--model", required=True, help="model id")
        p.add_argument("--policy", type=Path, help="policy TOML (default: highest accuracy, no limits)")
        p.add_argument("--device", action="append", help="only this device (repeatable)")
        p.add_argument("--json", action="store_true", help="decisions as JSON")
        source_args(p, "decide")
        p.add_argument(
            "--allow-partial",
            action="store_true",
            help="decide even when the broker's retained burst looks cut (devices may be missing)",
        )

    sel = sub.add_parser("select", parents=[broker], help="show the variant the policy picks per device")
    model_args(sel)
    sel.set_defaults(func=_cmd_select)

    asg = sub.add_parser("assign", parents=[broker], help="publish signed assignments")
    model_args(asg)
    asg.add_argument("--key", type=Path, help=key_help)
    asg.add_argument("--dry-run", action="store_true", help="show the decisions, publish nothing")
    asg.set_defaults(func=_cmd_assign)

    sch = sub.add_parser("schema", help="write the JSON Schemas of the wire messages")
    sch.add_argument("--out", type=Path, required=True, help="output directory")
    sch.set_defaults(func=_cmd_schema)

    _register_compress(sub)

    # Subcommands that live in their own modules (imports as light as the rest of deploy).
    from deploy import demo as demo_command
    from deploy.broker import conf as brokerconf
    from deploy.broker import provision
    from deploy.control import command, controller, rollout_cli
    from deploy.observe import collect, views

    collect.register(sub, parents=[broker])
    controller.register(sub, parents=[broker])
    rollout_cli.register(sub, parents=[_broker_parent("--connect-timeout")])
    command.register(sub, parents=[broker])
    views.register(sub, parents=[broker])
    brokerconf.register(sub)
    provision.register(sub)
    demo_command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(_join_dash_values(sys.argv[1:] if argv is None else list(argv)))
    except SystemExit as exc:  # --help (0) or a usage error (1)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except BaseException as err:
        if _after_interrupt(err):
            # Ctrl-C, or something that failed while the commands' cleanup ran because of it (a lock
            # released twice when the signal landed inside a Condition.wait, a timeout while stopping):
            # the user interrupted, and every context manager still ran its cleanup.
            extra = ""
            if not isinstance(err, KeyboardInterrupt):
                extra = f" ({type(err).__name__} while stopping: {err})"
            _err(f"interrupted{extra}")
            return EXIT_INTERRUPTED
        if isinstance(err, (DeployError, wire.WireError)):
            _err(str(err))
            return EXIT_FAILED
        raise


def _join_dash_values(argv: list[str]) -> list[str]:
    """``compress --input-range -1,1``: the compressor rewrites the values argparse would take for options."""
    try:
        from compressor.cli import join_dash_values
    except ImportError:  # a device install without the compressor
        return argv
    return join_dash_values(argv)


def _after_interrupt(err: BaseException | None) -> bool:
    """True if ``err`` is a KeyboardInterrupt or was raised while handling one (its context chain)."""
    seen = 0
    while err is not None and seen < 20:  # chains are short; the bound guards against a cycle
        if isinstance(err, KeyboardInterrupt):
            return True
        err = err.__cause__ or err.__context__
        seen += 1
    return False


if __name__ == "__main__":
    sys.exit(main())
