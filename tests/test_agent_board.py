"""Board detection, power profiles, CPU temperature, throttling and cool-down, against recorded trees."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent.board import (
    PROFILES,
    CommandUnavailable,
    ProfileError,
    decode_revision,
    default_runner,
    detect_board,
    power_profile,
)
from agent.thermal import (
    CoolOutcome,
    ThrottleState,
    cpu_temperature,
    parse_throttled,
    read_throttled,
    wait_until_cool,
)

PI_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU part\t: 0xd08

processor\t: 1
BogoMIPS\t: 108.00

processor\t: 2
BogoMIPS\t: 108.00

processor\t: 3
BogoMIPS\t: 108.00

Revision\t: {revision}
Serial\t\t: 10000000abcdef01
Model\t\t: {model}
"""

X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model\t\t: 85
model name\t: Intel(R) Xeon(R) CPU @ 2.20GHz

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) CPU @ 2.20GHz
"""

MEMINFO = "MemTotal:        8245860 kB\nMemFree:         7000000 kB\n"


def write(root: Path, rel: str, data: str | bytes) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)
    return path


def pi_tree(root: Path, model: str, revision: str = "d04170", device_tree: bool = True) -> Path:
    if device_tree:
        write(root, "proc/device-tree/model", model.encode() + b"\x00")
    write(root, "proc/cpuinfo", PI_CPUINFO.format(model=model, revision=revision))
    write(root, "proc/meminfo", MEMINFO)
    return root


# --------------------------------------------------------------------------------------------------------
# Board


@pytest.mark.parametrize(
    ("model", "name", "key"),
    [
        ("Raspberry Pi 5 Model B Rev 1.0", "Raspberry Pi 5", "pi5"),
        ("Raspberry Pi 4 Model B Rev 1.4", "Raspberry Pi 4", "pi4b"),
        ("Raspberry Pi 3 Model B Plus Rev 1.3", "Raspberry Pi 3", "pi3b+"),
        ("Raspberry Pi Zero 2 W Rev 1.0", "Raspberry Pi Zero 2 W", "zero2w"),
        ("Raspberry Pi Compute Module 4 Rev 1.1", "Raspberry Pi 4", "pi4b"),
    ],
)
def test_detects_each_pi_from_device_tree(tmp_path: Path, model: str, name: str, key: str) -> None:
    board = detect_board(pi_tree(tmp_path, model), machine="aarch64")
    assert board.name == name
    assert board.model_string == model  # NUL stripped
    assert board.profile_key == key
    assert board.arch == "aarch64"
    assert board.cpu_count == 4
    assert board.ram_bytes == 8245860 * 1024
    assert board.is_raspberry_pi


def test_cpuinfo_model_line_when_device_tree_is_missing(tmp_path: Path) -> None:
    pi_tree(tmp_path, "Raspberry Pi 4 Model B Rev 1.4", device_tree=False)
    assert detect_board(tmp_path, machine="armv7l").profile_key == "pi4b"


def test_revision_code_as_last_resort(tmp_path: Path) -> None:
    write(tmp_path, "proc/cpuinfo", "processor\t: 0\nHardware\t: BCM2835\nRevision\t: c04170\n")
    board = detect_board(tmp_path, machine="aarch64")
    assert board.profile_key == "pi5"
    assert board.model_string == "Raspberry Pi 5 Model B"
    assert decode_revision("a020d3") == "Raspberry Pi 3 Model B Plus"
    assert decode_revision("902120") == "Raspberry Pi Zero 2 W"
    assert decode_revision("0002") is None  # old-style code
    assert decode_revision("zz") is None


def test_x86_is_a_generic_guess(tmp_path: Path) -> None:
    write(tmp_path, "proc/cpuinfo", X86_CPUINFO)
    write(tmp_path, "proc/meminfo", MEMINFO)
    board = detect_board(tmp_path, machine="x86_64")
    assert board.profile_key == "generic-x86"
    assert "Xeon" in board.name
    assert board.model_string == "Intel(R) Xeon(R) CPU @ 2.20GHz"  # not cpuinfo's numeric "model"
    assert board.cpu_count == 2
    assert not board.is_raspberry_pi
    assert "generic guess" in power_profile(board.profile_key).source


def test_unknown_arm_board_and_empty_tree(tmp_path: Path) -> None:
    write(tmp_path, "proc/device-tree/model", b"Radxa ROCK 5B\x00")
    assert detect_board(tmp_path, machine="aarch64").profile_key == "generic-arm"
    empty = tmp_path / "empty"
    empty.mkdir()
    board = detect_board(empty, machine="riscv64")
    assert board.profile_key == "generic"
    assert board.cpu_count == 1
    assert board.ram_bytes == 0


def test_this_machine_is_detected_without_raising() -> None:
    board = detect_board()
    assert board.cpu_count >= 1
    assert board.ram_bytes > 0


def test_builtin_profiles_name_their_source() -> None:
    assert (PROFILES["pi5"].idle_w, PROFILES["pi5"].max_w) == (2.8, 9.7)
    assert (PROFILES["pi4b"].idle_w, PROFILES["pi4b"].max_w) == (2.7, 6.4)
    assert (PROFILES["pi3b+"].idle_w, PROFILES["pi3b+"].max_w) == (1.9, 5.1)
    assert PROFILES["zero2w"].idle_w == 0.6
    for profile in PROFILES.values():
        assert profile.source
        assert profile.max_w > profile.idle_w
        assert not profile.calibrated
    assert power_profile("no-such-board").key == "generic"


def test_calibrated_profile_file_wins(tmp_path: Path) -> None:
    path = write(
        tmp_path, "cal.json", json.dumps({"idle_w": 3.3, "max_w": 8.1, "source": "USB meter 2025-01"})
    )
    profile = power_profile("pi5", path)
    assert (profile.idle_w, profile.max_w, profile.calibrated) == (3.3, 8.1, True)
    assert "USB meter" in profile.source
    assert profile.power_at(0.5) == pytest.approx(3.3 + 0.5 * (8.1 - 3.3))
    assert profile.power_at(7.0) == 8.1  # clamped


@pytest.mark.parametrize(
    "content", ['{"idle_w": 5, "max_w": 2}', '{"idle_w": 1, "max_w": 2, "typo": 1}', "not json"]
)
def test_bad_calibrated_profile_is_an_error(tmp_path: Path, content: str) -> None:
    path = write(tmp_path, "cal.json", content)
    with pytest.raises(ProfileError, match=r"cal\.json"):
        power_profile("pi5", path)
    with pytest.raises(ProfileError, match="cannot read"):
        power_profile("pi5", tmp_path / "missing.json")


def test_default_runner_reports_a_missing_command() -> None:
    with pytest.raises(CommandUnavailable, match="not installed"):
        default_runner(["edgefleet-no-such-command"], 1.0)
    assert default_runner(["true"], 5.0) == ""
    with pytest.raises(CommandUnavailable, match="exited 1"):
        default_runner(["false"], 5.0)
    with pytest.raises(CommandUnavailable, match="did not answer"):
        default_runner(["sleep", "5"], 0.05)


# --------------------------------------------------------------------------------------------------------
# Temperature


def zone(root: Path, n: int, kind: str, milli: str) -> None:
    write(root, f"sys/class/thermal/thermal_zone{n}/type", kind + "\n")
    write(root, f"sys/class/thermal/thermal_zone{n}/temp", milli + "\n")


def test_cpu_zone_is_preferred(tmp_path: Path) -> None:
    zone(tmp_path, 0, "acpitz", "27800")
    zone(tmp_path, 1, "x86_pkg_temp", "48500")
    assert cpu_temperature(tmp_path, sensors=None) == 48.5


def test_pi_cpu_thermal_and_first_zone_fallback(tmp_path: Path) -> None:
    zone(tmp_path, 0, "cpu-thermal", "52078")
    assert cpu_temperature(tmp_path, sensors=None) == pytest.approx(52.078)
    other = tmp_path / "other"
    zone(other, 0, "iwlwifi_1", "not-a-number")
    zone(other, 1, "acpitz", "31000")
    assert cpu_temperature(other, sensors=None) == 31.0


def test_psutil_fallback_and_nothing(tmp_path: Path) -> None:
    def sensors() -> dict[str, list[object]]:
        return {"nvme": [SimpleNamespace(current=40.0)], "coretemp": [SimpleNamespace(current=61.0)]}

    assert cpu_temperature(tmp_path, sensors=sensors) == 61.0
    assert cpu_temperature(tmp_path, sensors=lambda: {}) is None
    assert cpu_temperature(tmp_path, sensors=None) is None


# --------------------------------------------------------------------------------------------------------
# Throttling


def test_throttle_bits_0x50005() -> None:
    state = parse_throttled("throttled=0x50005\n")
    assert state.under_voltage_now and state.throttled_now
    assert not state.freq_capped_now and not state.soft_temp_limit_now
    assert state.under_voltage_since_boot and state.throttled_since_boot
    assert not state.freq_capped_since_boot and not state.soft_temp_limit_since_boot
    assert state.any_now and state.any_since_boot
    assert "under-voltage" in state.describe()


def test_throttle_bits_zero_and_0x80008() -> None:
    zero = parse_throttled("throttled=0x0")
    assert not zero.any_now and not zero.any_since_boot
    assert zero.describe() == "not throttled"
    soft = parse_throttled("throttled=0x80008")
    assert soft.soft_temp_limit_now and soft.soft_temp_limit_since_boot
    assert not (soft.under_voltage_now or soft.freq_capped_now or soft.throttled_now)
    past_only = ThrottleState.decode(0x20000)
    assert not past_only.any_now and past_only.freq_capped_since_boot
    with pytest.raises(ValueError):
        parse_throttled("error=2 error_msg=...")


def test_read_throttled_via_runner_then_sysfs(tmp_path: Path) -> None:
    calls: list[list[str]] = []

    def runner(argv: Sequence[str], timeout: float) -> str:
        calls.append(list(argv))
        return "throttled=0x50005\n"

    state = read_throttled(tmp_path, runner)
    assert state is not None and state.raw == 0x50005
    assert calls == [["vcgencmd", "get_throttled"]]

    def missing(argv: Sequence[str], timeout: float) -> str:
        raise CommandUnavailable("vcgencmd is not installed")

    assert read_throttled(tmp_path, missing) is None
    write(tmp_path, "sys/devices/platform/soc/soc:firmware/get_throttled", "80008\n")
    state = read_throttled(tmp_path, missing)
    assert state is not None and state.soft_temp_limit_now


# --------------------------------------------------------------------------------------------------------
# Cooling down


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class TickingEvent(threading.Event):
    """A stop event whose wait advances a fake clock instead of sleeping."""

    def __init__(self, clock: FakeClock, set_after: int | None = None) -> None:
        super().__init__()
        self.clock = clock
        self.waits = 0
        self.set_after = set_after

    def wait(self, timeout: float | None = None) -> bool:
        self.waits += 1
        self.clock.t += timeout or 0.0
        if self.set_after is not None and self.waits >= self.set_after:
            self.set()
        return self.is_set()


def test_wait_until_cool_cools() -> None:
    temps = iter([80.0, 75.0, 69.0])
    clock = FakeClock()
    stop = TickingEvent(clock)
    outcome = wait_until_cool(70.0, 60.0, stop, read_temp=lambda: next(temps), poll_s=1.0, clock=clock)
    assert outcome is CoolOutcome.COOL
    assert stop.waits == 2


def test_wait_until_cool_times_out_bounded() -> None:
    clock = FakeClock()
    stop = TickingEvent(clock)
    outcome = wait_until_cool(70.0, 10.0, stop, read_temp=lambda: 85.0, poll_s=3.0, clock=clock)
    assert outcome is CoolOutcome.TIMEOUT
    assert clock.t == pytest.approx(10.0)  # last wait shortened to the deadline
    assert stop.waits == 4


def test_wait_until_cool_stops_and_handles_no_sensor() -> None:
    clock = FakeClock()
    stop = TickingEvent(clock, set_after=2)
    assert wait_until_cool(70.0, 100.0, stop, read_temp=lambda: 85.0, clock=clock) is CoolOutcome.STOPPED
    assert stop.waits == 2
    assert wait_until_cool(70.0, 100.0, threading.Event(), read_temp=lambda: None) is CoolOutcome.NO_SENSOR


def test_wait_until_cool_with_a_real_event_returns_promptly() -> None:
    stop = threading.Event()
    timer = threading.Timer(0.05, stop.set)
    timer.start()
    try:
        assert wait_until_cool(70.0, 5.0, stop, read_temp=lambda: 90.0, poll_s=1.0) is CoolOutcome.STOPPED
    finally:
        timer.cancel()
        timer.join()


def test_profile_key_for_model_strings_and_board_detection(tmp_path: Path) -> None:
    from agent.board import power_profile, profile_key_for

    assert profile_key_for("Raspberry Pi 5 Model B Rev 1.0") == "pi5"
    assert profile_key_for("Raspberry Pi Zero 2 W Rev 1.0") == "zero2w"
    assert profile_key_for("Some PC", "x86_64") == "generic-x86"
    assert profile_key_for("Some PC") == "generic"
    assert power_profile(profile_key_for("Raspberry Pi 4 Model B")).idle_w == PROFILES["pi4b"].idle_w
    model = tmp_path / "proc/device-tree/model"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"Raspberry Pi 5 Model B Rev 1.0\x00")
    assert detect_board(tmp_path).model_string == "Raspberry Pi 5 Model B Rev 1.0"
