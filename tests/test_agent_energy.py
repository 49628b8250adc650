"""Energy backends against recorded sysfs trees and recorded vcgencmd output; sampler and arithmetic."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from agent.board import PROFILES, CommandUnavailable, PowerProfile
from agent.energy import (
    BackendUnavailable,
    BatteryBackend,
    EnergyBackend,
    EnergyConfig,
    EnergyMeter,
    HwmonBackend,
    ModelBackend,
    PmicBackend,
    PowerSampler,
    RaplBackend,
    SensorError,
    average_power,
    energy_from_power,
    find_battery,
    find_hwmon,
    modelled_energy,
    parse_pmic_adc,
    read_text,
    select_backend,
)
from agent.wire import Energy, EnergyMethod

# Recorded on a Raspberry Pi 5 (firmware 2024-11), ``vcgencmd pmic_read_adc`` under load.
PMIC_OUTPUT = """\
     3V7_WL_SW_A current(0)=0.00000000A
       3V3_SYS_A current(1)=0.05172000A
       1V8_SYS_A current(2)=0.16299000A
      DDR_VDD2_A current(3)=0.02049000A
      DDR_VDDQ_A current(4)=0.00000000A
       1V1_SYS_A current(5)=0.18347000A
       0V8_SYS_A current(6)=0.33740000A
      VDD_CORE_A current(7)=2.01500000A
       3V3_DAC_A current(17)=0.00048840A
       3V3_ADC_A current(18)=0.00041640A
       0V8_AON_A current(16)=0.00540000A
          HDMI_A current(22)=0.00002000A
     3V7_WL_SW_V volt(8)=3.71846400V
       3V3_SYS_V volt(9)=3.30500000V
       1V8_SYS_V volt(10)=1.80048000V
      DDR_VDD2_V volt(11)=1.11263800V
      DDR_VDDQ_V volt(12)=0.60036600V
       1V1_SYS_V volt(13)=1.10622300V
       0V8_SYS_V volt(14)=0.80066100V
      VDD_CORE_V volt(15)=0.79000000V
       3V3_DAC_V volt(20)=3.30402000V
       3V3_ADC_V volt(21)=3.30402000V
       0V8_AON_V volt(19)=0.80070000V
          HDMI_V volt(23)=5.12400000V
         EXT5V_V volt(24)=5.12400000V
          BATT_V volt(25)=0.00000000V
"""


def write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return path


def ina219(root: Path, n: int = 0, power_uw: int = 4_250_000) -> Path:
    d = root / f"sys/class/hwmon/hwmon{n}"
    write(root, f"sys/class/hwmon/hwmon{n}/name", "ina219")
    write(root, f"sys/class/hwmon/hwmon{n}/in0_input", "12")  # shunt mV
    write(root, f"sys/class/hwmon/hwmon{n}/in1_input", "5080")  # bus mV
    write(root, f"sys/class/hwmon/hwmon{n}/curr1_input", "836")
    write(root, f"sys/class/hwmon/hwmon{n}/power1_input", str(power_uw))
    return d


def ina3221(root: Path, n: int = 1) -> Path:
    base = f"sys/class/hwmon/hwmon{n}"
    write(root, f"{base}/name", "ina3221")
    channels = {1: ("VDD_IN", 5000, 1200), 2: ("VDD_CPU", 1000, 900), 3: ("VDD_SOC", 1000, 300)}
    for ch, (label, mv, ma) in channels.items():
        write(root, f"{base}/in{ch}_label", label)
        write(root, f"{base}/in{ch}_input", str(mv))
        write(root, f"{base}/curr{ch}_input", str(ma))
        write(root, f"{base}/in{ch + 3}_input", "7")  # shunt voltages: never paired
    return root / base


def rapl(root: Path, energy_uj: int, max_range: int = 262_143_328_850) -> Path:
    base = "sys/class/powercap/intel-rapl:0"
    write(root, f"{base}/name", "package-0")
    write(root, f"{base}/energy_uj", str(energy_uj))
    write(root, f"{base}/max_energy_range_uj", str(max_range))
    write(root, "sys/class/powercap/intel-rapl:0:0/energy_uj", "5")  # a subzone: not summed
    return root / base


def battery(root: Path, status: str, *, power_uw: int | None = None, ua: int = 0, uv: int = 0) -> Path:
    base = "sys/class/power_supply/BAT0"
    write(root, "sys/class/power_supply/AC/type", "Mains")
    write(root, f"{base}/type", "Battery")
    write(root, f"{base}/status", status)
    if power_uw is not None:
        write(root, f"{base}/power_now", str(power_uw))
    else:
        write(root, f"{base}/current_now", str(ua))
        write(root, f"{base}/voltage_now", str(uv))
    return root / base


def no_vcgencmd(argv: Sequence[str], timeout: float) -> str:
    raise CommandUnavailable(f"{argv[0]} is not installed (not on PATH)")


def recorded(text: str) -> Callable[[Sequence[str], float], str]:
    def runner(argv: Sequence[str], timeout: float) -> str:
        assert list(argv) == ["vcgencmd", "pmic_read_adc"]
        return text

    return runner


PI5 = PROFILES["pi5"]


# --------------------------------------------------------------------------------------------------------
# hwmon


def test_ina219_power1_input(tmp_path: Path) -> None:
    ina219(tmp_path)
    backend = find_hwmon(tmp_path)
    assert backend.read_power_w() == pytest.approx(4.25)
    assert backend.method is EnergyMethod.HWMON and backend.measured
    assert "ina219" in backend.sensor and "power1_input" in backend.sensor


def test_ina3221_sums_channels_paired_by_index(tmp_path: Path) -> None:
    ina3221(tmp_path)
    backend = find_hwmon(tmp_path)
    assert backend.channels == [1, 2, 3]
    assert backend.read_power_w() == pytest.approx(5.0 * 1.2 + 1.0 * 0.9 + 1.0 * 0.3)
    assert "VDD_IN" in backend.sensor
    only_input = find_hwmon(tmp_path, channels=[1])
    assert only_input.read_power_w() == pytest.approx(6.0)


def test_ina3221_disabled_channel_is_skipped(tmp_path: Path) -> None:
    device = ina3221(tmp_path)
    (device / "curr3_input").unlink()
    backend = HwmonBackend(device, "ina3221")
    assert backend.channels == [1, 2]
    assert backend.read_power_w() == pytest.approx(6.9)


def test_hwmon_ignores_other_chips_and_can_be_named(tmp_path: Path) -> None:
    write(tmp_path, "sys/class/hwmon/hwmon0/name", "coretemp")
    ina219(tmp_path, n=2, power_uw=1_000_000)
    ina3221(tmp_path, n=10)
    assert find_hwmon(tmp_path).chip == "ina219"  # hwmon2 before hwmon10
    assert find_hwmon(tmp_path, device="ina3221").chip == "ina3221"
    assert find_hwmon(tmp_path, device="hwmon10").chip == "ina3221"
    with pytest.raises(BackendUnavailable, match="coretemp"):
        find_hwmon(tmp_path, device="ina226")


def test_hwmon_absent(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable) as info:
        find_hwmon(tmp_path)
    assert info.value.kind == "hwmon"
    assert "nothing" in info.value.reason


def test_hwmon_read_error_is_a_sensor_error(tmp_path: Path) -> None:
    device = ina219(tmp_path)
    backend = find_hwmon(tmp_path)
    (device / "power1_input").unlink()
    with pytest.raises(SensorError, match="power1_input"):
        backend.read_power_w()


# --------------------------------------------------------------------------------------------------------
# PMIC


def test_parse_pmic_pairs_rails_and_drops_voltage_only() -> None:
    rails = parse_pmic_adc(PMIC_OUTPUT)
    assert len(rails) == 12
    assert rails["VDD_CORE"] == (0.79, 2.015)
    assert "EXT5V" not in rails and "BATT" not in rails
    assert parse_pmic_adc("garbage\n") == {}


def test_pmic_applies_the_published_fit() -> None:
    rails = parse_pmic_adc(PMIC_OUTPUT)
    raw = sum(v * a for v, a in rails.values())
    backend = PmicBackend(recorded(PMIC_OUTPUT))
    assert backend.raw_rail_power_w() == pytest.approx(raw)
    assert backend.read_power_w() == pytest.approx(1.1451 * raw + 0.5879)
    assert backend.method is EnergyMethod.PMIC and backend.measured
    assert "1.1451" in backend.sensor and "12 rails" in backend.sensor
    custom = PmicBackend(recorded(PMIC_OUTPUT), slope=1.0, offset_w=0.0)
    assert custom.read_power_w() == pytest.approx(raw)


def test_pmic_unavailable_without_vcgencmd_or_rails() -> None:
    with pytest.raises(BackendUnavailable, match="not installed"):
        PmicBackend(no_vcgencmd)
    with pytest.raises(BackendUnavailable, match="no rail"):
        PmicBackend(recorded('error=1 error_msg="Command not registered"\n'))


# --------------------------------------------------------------------------------------------------------
# RAPL


def test_rapl_counter_and_wrap_around(tmp_path: Path) -> None:
    zone = rapl(tmp_path, energy_uj=999_000_000, max_range=1_000_000_000)
    backend = RaplBackend(tmp_path)
    assert backend.counter and backend.method is EnergyMethod.RAPL
    assert backend.zones == [zone]  # the intel-rapl:0:0 subzone is not summed
    assert backend.read_energy_j() == 0.0
    write(tmp_path, "sys/class/powercap/intel-rapl:0/energy_uj", "999_500_000".replace("_", ""))
    assert backend.read_energy_j() == pytest.approx(0.5)
    write(tmp_path, "sys/class/powercap/intel-rapl:0/energy_uj", "2000000")  # wrapped
    assert backend.read_energy_j() == pytest.approx(0.5 + 0.5 + 2.0)
    assert "package-0" in backend.sensor
    with pytest.raises(SensorError):
        backend.read_power_w()


def test_rapl_permission_denied_is_unavailable_not_a_crash(tmp_path: Path) -> None:
    rapl(tmp_path, energy_uj=1)

    def opener(path: Path) -> str:
        if path.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(path))
        return read_text(path)

    with pytest.raises(BackendUnavailable, match="root only") as info:
        RaplBackend(tmp_path, opener)
    assert info.value.kind == "rapl"
    backend, skipped = select_backend(EnergyConfig(), tmp_path, no_vcgencmd, PI5, opener)
    assert backend.method is EnergyMethod.MODEL
    assert any(s.startswith("rapl:") and "root only" in s for s in skipped)


def test_rapl_absent(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable, match="no intel-rapl zone"):
        RaplBackend(tmp_path)


# --------------------------------------------------------------------------------------------------------
# Battery


def test_battery_discharging_power_now(tmp_path: Path) -> None:
    battery(tmp_path, "Discharging", power_uw=7_300_000)
    backend = find_battery(tmp_path)
    assert backend.read_power_w() == pytest.approx(7.3)
    assert backend.method is EnergyMethod.BATTERY and "power_now" in backend.sensor


def test_battery_current_times_voltage(tmp_path: Path) -> None:
    battery(tmp_path, "Discharging", ua=-850_000, uv=11_400_000)  # some drivers sign the current
    assert find_battery(tmp_path).read_power_w() == pytest.approx(0.85 * 11.4)


def test_battery_charging_is_refused(tmp_path: Path) -> None:
    supply = battery(tmp_path, "Charging", power_uw=20_000_000)
    with pytest.raises(BackendUnavailable, match="Charging"):
        find_battery(tmp_path)
    backend = BatteryBackend(supply)  # e.g. it was discharging at selection, then plugged in
    with pytest.raises(SensorError, match="not the board's draw"):
        backend.read_power_w()


def test_no_battery(tmp_path: Path) -> None:
    write(tmp_path, "sys/class/power_supply/AC/type", "Mains")
    with pytest.raises(BackendUnavailable, match="no power supply of type Battery"):
        find_battery(tmp_path)


# --------------------------------------------------------------------------------------------------------
# Model


def test_model_backend_is_never_measured_and_follows_the_formula() -> None:
    backend = ModelBackend(PI5, utilisation=lambda: 0.25)
    assert backend.measured is False and backend.method is EnergyMethod.MODEL
    assert backend.power_w(0.5) == pytest.approx(2.8 + (9.7 - 2.8) * 0.5)
    assert backend.read_power_w() == pytest.approx(2.8 + 6.9 * 0.25)
    assert backend.power_w(-1) == 2.8 and backend.power_w(3) == 9.7
    assert "pi5" in backend.sensor


def test_modelled_energy_per_inference() -> None:
    # 2 busy cores of 4 → u = 0.5 → 6.25 W; 100 inferences in 2 s → 125 mJ each.
    energy = modelled_energy(PI5, cpu_util=2.0, cores=4, inferences=100, duration_s=2.0)
    assert energy.method is EnergyMethod.MODEL and energy.measured is False
    assert energy.avg_power_w == pytest.approx(6.25)
    assert energy.mj_per_inference == pytest.approx(125.0)
    assert energy.idle_power_w == 2.8
    assert energy.samples == 0


def test_system_utilisation_reader_runs_here() -> None:
    backend = ModelBackend(PROFILES["generic-x86"])
    first = backend.read_power_w()
    assert 5.0 <= first <= 25.0


# --------------------------------------------------------------------------------------------------------
# Selection


def full_tree(root: Path) -> None:
    ina219(root)
    rapl(root, energy_uj=100)
    battery(root, "Discharging", power_uw=5_000_000)


def test_auto_prefers_hwmon_then_pmic_then_rapl_then_battery(tmp_path: Path) -> None:
    full_tree(tmp_path)
    pmic = recorded(PMIC_OUTPUT)
    backend, skipped = select_backend(EnergyConfig(), tmp_path, pmic, PI5)
    assert backend.method is EnergyMethod.HWMON and skipped == []

    hw = tmp_path / "sys/class/hwmon"
    for p in sorted(hw.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    backend, skipped = select_backend(EnergyConfig(), tmp_path, pmic, PI5)
    assert backend.method is EnergyMethod.PMIC
    assert [s.split(":")[0] for s in skipped] == ["hwmon"]

    backend, skipped = select_backend(EnergyConfig(), tmp_path, no_vcgencmd, PI5)
    assert backend.method is EnergyMethod.RAPL
    assert [s.split(":")[0] for s in skipped] == ["hwmon", "pmic"]


def test_auto_ends_at_the_model_with_every_reason(tmp_path: Path) -> None:
    backend, skipped = select_backend(EnergyConfig(), tmp_path, no_vcgencmd, PI5)
    assert isinstance(backend, ModelBackend) and backend.measured is False
    assert [s.split(":")[0] for s in skipped] == ["hwmon", "pmic", "rapl", "battery"]


def test_battery_chosen_only_when_nothing_better(tmp_path: Path) -> None:
    battery(tmp_path, "Discharging", power_uw=5_000_000)
    backend, _ = select_backend(EnergyConfig(), tmp_path, no_vcgencmd, PI5)
    assert backend.method is EnergyMethod.BATTERY


def test_forced_kind_overrides_auto(tmp_path: Path) -> None:
    full_tree(tmp_path)
    backend, skipped = select_backend(EnergyConfig(kind="battery"), tmp_path, no_vcgencmd, PI5)
    assert backend.method is EnergyMethod.BATTERY and skipped == []
    backend, _ = select_backend(EnergyConfig(kind="model"), tmp_path, no_vcgencmd, PI5)
    assert backend.method is EnergyMethod.MODEL


def test_forced_kind_unavailable_falls_back_or_raises(tmp_path: Path) -> None:
    backend, skipped = select_backend(EnergyConfig(kind="pmic"), tmp_path, no_vcgencmd, PI5)
    assert backend.method is EnergyMethod.MODEL
    assert len(skipped) == 1 and skipped[0].startswith("pmic:")
    with pytest.raises(BackendUnavailable, match="pmic"):
        select_backend(EnergyConfig(kind="pmic", require=True), tmp_path, no_vcgencmd, PI5)


def test_backend_that_lists_but_cannot_be_read_is_skipped(tmp_path: Path) -> None:
    device = ina219(tmp_path)
    (device / "power1_input").write_text("garbage\n")
    backend, skipped = select_backend(EnergyConfig(), tmp_path, no_vcgencmd, PI5)
    assert backend.method is EnergyMethod.MODEL
    assert skipped[0].startswith("hwmon: first read failed")


def test_profile_defaults_to_the_detected_board(tmp_path: Path) -> None:
    write(tmp_path, "proc/device-tree/model", "Raspberry Pi 4 Model B Rev 1.4\x00")
    backend, _ = select_backend(EnergyConfig(kind="model"), tmp_path, no_vcgencmd)
    assert isinstance(backend, ModelBackend) and backend.profile.key == "pi4b"


def test_config_is_strict() -> None:
    with pytest.raises(ValueError, match="extra"):
        EnergyConfig.model_validate({"kind": "auto", "interval": 0.1})
    with pytest.raises(ValueError):
        EnergyConfig.model_validate({"kind": "nvml"})


def test_backends_satisfy_the_protocol(tmp_path: Path) -> None:
    ina219(tmp_path)
    rapl(tmp_path, energy_uj=1)
    for backend in (
        find_hwmon(tmp_path),
        RaplBackend(tmp_path),
        ModelBackend(PI5),
        PmicBackend(recorded(PMIC_OUTPUT)),
    ):
        assert isinstance(backend, EnergyBackend)


# --------------------------------------------------------------------------------------------------------
# Sampling and arithmetic


def test_average_power_time_weighted_and_counter() -> None:
    assert average_power([], counter=False) == (None, 0.0, 0)
    assert average_power([(0.0, 3.0)], counter=False) == (3.0, 0.0, 1)
    avg, span, n = average_power([(0.0, 2.0), (1.0, 4.0), (3.0, 4.0)], counter=False)
    assert (span, n) == (3.0, 3)
    assert avg == pytest.approx((3.0 + 8.0) / 3.0)
    avg, span, n = average_power([(10.0, 100.0), (12.0, 110.0)], counter=True)
    assert avg == pytest.approx(5.0)
    assert average_power([(1.0, 5.0)], counter=True)[0] is None


class ScriptedPower:
    """A power backend replaying values, then repeating the last."""

    method = EnergyMethod.HWMON
    sensor = "scripted"
    measured = True
    counter = False

    def __init__(self, values: list[float | Exception]) -> None:
        self.values = values
        self.reads = 0

    def read_power_w(self) -> float:
        value = self.values[min(self.reads, len(self.values) - 1)]
        self.reads += 1
        if isinstance(value, Exception):
            raise value
        return value

    def read_energy_j(self) -> float:
        raise SensorError("power only")


def test_sampler_samples_in_background_and_counts_errors() -> None:
    backend = ScriptedPower([5.0, SensorError("EIO"), 5.0])
    sampler = PowerSampler(backend, interval_s=0.005, max_samples=1000)
    sampler.start()
    with pytest.raises(RuntimeError, match="already running"):
        sampler.start()
    deadline = time.monotonic() + 5.0
    while backend.reads < 4 and time.monotonic() < deadline:
        time.sleep(0.005)
    window = sampler.stop()
    assert not sampler.running
    assert window.samples >= 3
    assert window.errors == 1
    assert window.avg_power_w == pytest.approx(5.0)
    assert window.energy_j == pytest.approx(5.0 * window.seconds)


def test_sampler_is_bounded_and_windows_by_monotonic_marks() -> None:
    t = [0.0]
    backend = ScriptedPower([1.0, 1.0, 9.0, 9.0, 9.0, 1.0])
    sampler = PowerSampler(backend, interval_s=0.001, max_samples=4, clock=lambda: t[0])
    for i in range(6):
        t[0] = float(i)
        sampler._sample()
    assert sampler.window().samples == 4  # ring buffer
    window = sampler.window(start=2.0, end=4.0)
    assert window.samples == 3 and window.avg_power_w == pytest.approx(9.0)
    assert window.seconds == pytest.approx(2.0)


def test_sampler_over_a_rapl_counter(tmp_path: Path) -> None:
    rapl(tmp_path, energy_uj=0)
    backend = RaplBackend(tmp_path)
    t = [0.0]
    sampler = PowerSampler(backend, clock=lambda: t[0])
    sampler._sample()
    t[0] = 2.0
    write(tmp_path, "sys/class/powercap/intel-rapl:0/energy_uj", "30000000")  # 30 J in 2 s
    sampler._sample()
    assert sampler.window().avg_power_w == pytest.approx(15.0)


def test_energy_per_inference_arithmetic() -> None:
    backend = ScriptedPower([4.0])
    energy = energy_from_power(backend, 4.0, inferences=200, duration_s=5.0, idle_w=2.5, samples=100)
    assert isinstance(energy, Energy)
    assert energy.mj_per_inference == pytest.approx(4.0 * 5.0 / 200 * 1000)  # 100 mJ
    assert (energy.method, energy.measured, energy.sensor) == (EnergyMethod.HWMON, True, "scripted")
    assert (energy.idle_power_w, energy.samples) == (2.5, 100)
    with pytest.raises(ValueError):
        energy_from_power(backend, 4.0, inferences=0, duration_s=1.0)


def meter_for(backend: EnergyBackend, **cfg: object) -> EnergyMeter:
    config = EnergyConfig.model_validate({"interval_s": 0.005, "idle_seconds": 0.03, **cfg})
    return EnergyMeter(backend, PI5, cores=4, config=config)


def test_meter_measure_wraps_a_loop() -> None:
    backend = ScriptedPower([6.0])
    meter = meter_for(backend)

    def loop() -> int:
        time.sleep(0.04)
        return 10

    energy = meter.measure(loop, threading.Event())
    assert energy is not None
    assert energy.method is EnergyMethod.HWMON and energy.measured
    assert energy.avg_power_w == pytest.approx(6.0)
    assert energy.idle_power_w == pytest.approx(6.0)
    assert energy.samples >= 2
    # 6 W over a wall time of at least the 40 ms sleep, for 10 inferences
    assert 6.0 * 0.04 / 10 * 1000 <= energy.mj_per_inference < 6.0 * 2.0 / 10 * 1000


def test_meter_with_model_backend_uses_cpu_util() -> None:
    meter = meter_for(ModelBackend(PI5))
    assert meter.idle_baseline(threading.Event()) == 2.8  # no waiting for the model
    energy = meter.energy(None, inferences=100, duration_s=2.0, cpu_util=2.0, idle_w=2.8)
    assert energy is not None and energy.measured is False
    assert energy.mj_per_inference == pytest.approx(125.0)


def test_meter_empty_window_falls_back_to_model_labelled_as_such() -> None:
    meter = meter_for(ScriptedPower([SensorError("EIO")]))
    meter.start()
    window = meter.stop()
    assert window.samples == 0 and window.avg_power_w is None
    energy = meter.energy(window, inferences=100, duration_s=2.0, cpu_util=2.0)
    assert energy is not None and energy.method is EnergyMethod.MODEL and energy.measured is False
    assert meter.energy(window, inferences=100, duration_s=2.0) is None
    assert meter.energy(window, inferences=0, duration_s=2.0, cpu_util=1.0) is None


def test_idle_baseline_off_and_interrupted() -> None:
    meter = meter_for(ScriptedPower([3.0]), idle_seconds=0)
    assert meter.idle_baseline(threading.Event()) is None
    stop = threading.Event()
    stop.set()
    started = time.monotonic()
    assert meter.idle_baseline(stop, seconds=10.0) == pytest.approx(3.0)
    assert time.monotonic() - started < 2.0


def test_meter_from_config_on_a_recorded_pi5(tmp_path: Path) -> None:
    write(tmp_path, "proc/device-tree/model", "Raspberry Pi 5 Model B Rev 1.0\x00")
    write(tmp_path, "proc/cpuinfo", "processor\t: 0\nprocessor\t: 1\nprocessor\t: 2\nprocessor\t: 3\n")
    meter = EnergyMeter.from_config(EnergyConfig(), root=tmp_path, runner=recorded(PMIC_OUTPUT))
    assert meter.backend.method is EnergyMethod.PMIC
    assert meter.cores == 4 and meter.profile.key == "pi5"
    assert [s.split(":")[0] for s in meter.skipped] == ["hwmon"]


def test_profile_type_is_shared() -> None:
    assert isinstance(PI5, PowerProfile)
    assert PI5.power_at(1.0) == 9.7


def test_profile_file_defaults_to_the_store(tmp_path: Path) -> None:
    from agent.energy import DEFAULT_PROFILE_NAME, resolve_profile_file

    assert resolve_profile_file(EnergyConfig(), tmp_path) is None  # nothing calibrated yet
    (tmp_path / DEFAULT_PROFILE_NAME).write_text('{"idle_w": 1.0, "max_w": 2.0}')
    assert resolve_profile_file(EnergyConfig(), tmp_path) == tmp_path / DEFAULT_PROFILE_NAME
    explicit = tmp_path / "elsewhere.json"
    assert resolve_profile_file(EnergyConfig(profile_file=explicit), tmp_path) == explicit
