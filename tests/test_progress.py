"""Progress off a terminal: periodic lines, never carriage-return bar redraws in a log."""

from __future__ import annotations

from vps.progress import Progress


def test_progress_off_a_terminal_prints_a_line_every_tenth(capsys):
    with Progress("g epoch 1/2", 40, "batch", prefix="vps-train") as progress:
        for step in range(40):
            progress.update(1, f"loss {1 / (step + 1):.3f}")
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and len(lines) == 10
    assert lines[0].startswith("vps-train: g epoch 1/2: 4/40 (10 %), ") and " batch/s, loss 0.250" in lines[0]
    assert lines[-1].startswith("vps-train: g epoch 1/2: 40/40") and "(100 %)" in lines[-1] and "loss 0.025" in lines[-1]


def test_quiet_progress_prints_nothing(capsys):
    with Progress("x", 5, quiet=True) as progress:
        progress.update(5)
    assert capsys.readouterr().err == ""
