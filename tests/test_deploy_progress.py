"""The publish progress bar: drawn in place on a terminal, silent elsewhere."""

from __future__ import annotations

import io

from deploy.progress import ByteProgress

MIB = 1024 * 1024


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_draws_in_place_throttled_and_finishes_on_the_last_byte() -> None:
    out, clock = Tty(), Clock()
    bar = ByteProgress("publishing", 100 * MIB, out, width=10, interval_s=0.1, clock=clock)
    clock.now += 0.5
    bar.update(50 * MIB)
    assert out.getvalue() == "\r\x1b[2Kpublishing [#####-----]  50% 50.0/100.0 MiB  100.0 MiB/s  ETA 0.5 s"
    clock.now += 0.05
    bar.update(60 * MIB)  # within the interval: not redrawn
    assert out.getvalue().count("\r") == 1
    clock.now += 0.05
    bar.update(100 * MIB)  # the last byte is always drawn, without an ETA
    assert out.getvalue().endswith("[##########] 100% 100.0/100.0 MiB  166.7 MiB/s")
    bar.clear()
    assert out.getvalue().endswith("\r\x1b[2K")
    bar.clear()  # nothing drawn since: nothing to erase
    assert out.getvalue().count("\r") == 3


def test_clear_lets_the_next_update_draw_at_once() -> None:
    out, clock = Tty(), Clock()
    bar = ByteProgress("publishing", 10, out, clock=clock)
    bar.update(1)
    bar.clear()
    bar.update(2)  # same instant, but the bar was erased: drawn again
    assert out.getvalue().count("publishing") == 2


def test_silent_when_not_a_terminal() -> None:
    out = io.StringIO()
    bar = ByteProgress("publishing", 10, out)
    bar.update(5)
    bar.update(10)
    bar.clear()
    assert out.getvalue() == ""
    assert bar.render().startswith("publishing [####################] 100%")


def test_empty_total_does_not_divide_by_zero() -> None:
    bar = ByteProgress("publishing", 0, Tty(), clock=Clock())
    bar.update(0)
    assert "0%" in bar.render()
