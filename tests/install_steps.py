"""The README's install steps as commands: extraction and re-rooting shared by the tests and scripts.

README.md's "Running the agent on a Raspberry Pi" section holds the only copy of the install commands, in
``sh`` blocks marked ``<!-- install-steps: host -->`` and ``<!-- install-steps: device -->``.
tests/test_install_docs.py runs them on this machine; ``scripts/arm64-smoke --install-check`` runs the
device block with the arm64 Python under qemu-user. Both change the commands the same way: paths under
/opt/edgefleet, /etc/edgefleet, /var/lib/edgefleet, /etc/systemd/system, /usr/lib/sysusers.d and /tmp get
a ROOT prefix, ``sudo`` is dropped and the service user is played by an account that exists here.

Standard library only: ``scripts/arm64-smoke`` imports this module as well.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
SECTION = "## Running the agent on a Raspberry Pi"
SERVICE_USER = "edgefleet"
IS_ROOT = os.geteuid() == 0
# Who plays the service user and group as root: an account that exists and is not root.
STAND_IN_USER, STAND_IN_GROUP = "nobody", "nogroup"
# What `sudo` runs commands with on Debian (secure_path), and systemd's default PATH for services.
SECURE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
REROOTED = (
    "/opt/edgefleet",
    "/etc/edgefleet",
    "/var/lib/edgefleet",
    "/etc/systemd/system",
    "/usr/lib/sysusers.d",
    "/tmp",
)
_REROOT = re.compile(r"(?<![\w./~-])(" + "|".join(map(re.escape, REROOTED)) + r")(?=[/\s\"']|$)")


def raspberry_pi_section(text: str) -> str:
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start : end if end >= 0 else len(text)]


def install_blocks(text: str) -> dict[str, list[str]]:
    """``{"host": [...], "device": [...]}``: the marked sh blocks, one logical command per entry."""
    blocks: dict[str, list[str]] = {}
    pattern = re.compile(r"<!-- install-steps: (\w+)[^>]*-->\s*```sh\n(.*?)```", re.DOTALL)
    for name, body in pattern.findall(raspberry_pi_section(text)):
        lines: list[str] = []
        pending = ""
        for raw in body.splitlines():
            line = pending + raw.strip()
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            pending = ""
            if line and not line.startswith("#"):
                lines.append(line)
        blocks[name] = lines
    return blocks


def reroot(text: str, root: Path) -> str:
    return _REROOT.sub(lambda m: f"{root}{m.group(1)}", text)


def scp_as_copy(line: str, root: Path) -> str:
    """``scp ... user@host:/path/`` → ``cp -r ... ROOT/path/`` (the device is ROOT on this machine)."""
    words = shlex.split(line)[1:]
    args = [w for w in words if not w.startswith("-")]
    dest = args.pop()
    m = re.fullmatch(r"[^@\s]+@[^:\s]+:(/\S*)", dest)
    assert m, f"scp destination is not user@host:/path: {line}"
    target = Path(reroot(m.group(1), root))
    return shlex.join(["cp", "-r", *args, f"{target}/"])


def host_command(line: str, root: Path, broker_port: int) -> str:
    if line.startswith("scp "):
        return scp_as_copy(line, root)
    if " provision " in f" {line} ":
        assert "--broker-host broker.lan" in line, f"provision without --broker-host broker.lan: {line}"
    return line.replace("--broker-host broker.lan", f"--broker-host 127.0.0.1 --broker-port {broker_port}")


def device_parts(line: str) -> list[str]:
    """One doc line → its commands: a trailing comment dropped, split at ``&&``."""
    line = re.sub(r"\s+#.*$", "", line)
    return [part.strip() for part in line.split(" && ")]


def device_command(line: str, root: Path) -> tuple[str | None, str]:
    """The shell command for one device line (None: skipped), and why it differs from the line."""
    words = shlex.split(line)
    as_user = None
    rest = words
    if rest[0] == "sudo":
        rest = rest[1:]
        if rest[:1] == ["-u"]:
            as_user, rest = rest[1], rest[2:]
    prog = rest[0]
    if prog in ("systemctl", "journalctl"):
        return None, "no systemd here: the test starts the unit's ExecStartPre= and ExecStart= itself"
    if prog == "systemd-sysusers":
        if not IS_ROOT:
            return None, "creating a system user needs root"
        cmd = shlex.join(["systemd-sysusers", f"--root={root}", *rest[1:]])
        return cmd, "into ROOT/etc/passwd and ROOT/etc/group, not this machine's"
    body = line.split(" ", 1)[1] if words[0] == "sudo" else line
    if as_user is not None:
        body = body.split(" ", 2)[2]
    body = reroot(body, root)
    why = "re-rooted, sudo dropped"
    if prog in ("install", "chown") and not IS_ROOT:
        body = re.sub(r"\s-[og]\s+\S+", "", body)
        why += "; -o/-g dropped (not root)"
    elif prog in ("install", "chown") and re.search(rf"\s-[og]\s+{SERVICE_USER}\b", body):
        body = re.sub(rf"(\s-o\s+){SERVICE_USER}\b", rf"\g<1>{STAND_IN_USER}", body)
        body = re.sub(rf"(\s-g\s+){SERVICE_USER}\b", rf"\g<1>{STAND_IN_GROUP}", body)
        why += f"; {SERVICE_USER} played by {STAND_IN_USER}:{STAND_IN_GROUP}"
    if as_user is not None:
        if IS_ROOT:
            assert as_user == SERVICE_USER, line
            body = f"runuser -u {STAND_IN_USER} -- {body}"
            why += f"; {SERVICE_USER} played by {STAND_IN_USER}"
        else:
            why += f"; runs as {pwd.getpwuid(os.geteuid()).pw_name}, not {as_user} (not root)"
    return body, why


def make_root(parent: Path) -> Path:
    """A private root the service user can traverse (pytest's tmp dirs are 0700 root)."""
    path = Path(tempfile.mkdtemp(prefix="root-", dir=parent))
    path.chmod(0o755)
    for sub in ("opt", "etc/systemd/system", "var/lib", "usr/lib/sysusers.d", "run"):
        (path / sub).mkdir(parents=True, exist_ok=True)
        (path / sub).chmod(0o755)
    (path / "tmp").mkdir(mode=0o1777)
    (path / "tmp").chmod(0o1777)
    (path / "home/pi").mkdir(parents=True)
    (path / "home/pi").chmod(0o700)  # like a Raspberry Pi OS home: the service user cannot enter it
    return path


def copy_repo(dest: Path) -> Path:
    ignore = shutil.ignore_patterns(
        ".git", ".venv*", "__pycache__", "*.egg-info", "build", "dist", ".*_cache", ".hypothesis", "out"
    )
    shutil.copytree(REPO, dest, ignore=ignore)
    (dest / ".venv").symlink_to(REPO / ".venv")  # the host's venv, as `scripts/setup.sh` made it
    return dest
