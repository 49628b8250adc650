"""compressor.progress: plain lines in a log, an in-place bar per training run on a terminal."""

from __future__ import annotations

import io

from compressor.progress import TerminalProgress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _clock() -> object:
    t = iter(float(i) for i in range(1000))
    return lambda: next(t)


def test_not_a_terminal_prints_every_line_unchanged() -> None:
    out = io.StringIO()
    p = TerminalProgress(out)
    lines = ["convert int8", "distill: epoch 1/2 loss 0.5 val_accuracy 0.9", "distill: epoch 2/2 loss 0.4"]
    for line in lines:
        p(line)
    assert out.getvalue() == "".join(f"{line}\n" for line in lines)


def test_terminal_draws_one_bar_per_training_and_keeps_it() -> None:
    out = _Tty()
    p = TerminalProgress(out, width=10, clock=_clock())  # type: ignore[arg-type]
    p("search prune-search-int8: trial keep 0.25")
    p("prune fine-tune: epoch 1/4 loss 0.9000 val_accuracy 0.5000")
    p("prune fine-tune: epoch 2/4 loss 0.5000 val_accuracy 0.8000")
    p("convert prune-search-int8")  # another line finishes the bar first
    p("distill: epoch 1/1 loss 0.3")
    text = out.getvalue()
    lines = text.split("\n")
    assert lines[0] == "search prune-search-int8: trial keep 0.25"
    # the two epochs of one run share one screen line, redrawn in place
    assert lines[1].count("\r\x1b[2K") == 2 and lines[1].endswith(
        "2/4  loss 0.5000 val_accuracy 0.8000  ETA 2 s"
    )
    assert "[#####-----] 2/4" in lines[1] and "[##--------] 1/4" in lines[1]
    assert lines[2] == "convert prune-search-int8"
    assert lines[3].endswith("[##########] 1/1  loss 0.3") and lines[4] == ""  # complete: a newline after it
