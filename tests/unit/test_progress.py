"""Progress lines: every tenth of the way and at the end, silent on other ranks, relayed from a job's log."""

from __future__ import annotations

import logging

from mip_core.progress import LOGGER, MARKER, Progress, log_to_stderr, progress
from tasks.launch import _relay_progress


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER.name]


def test_a_line_every_tenth_and_one_at_the_end(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER.name)
    with Progress(20, "editing (RMisU)", unit="step", bar=False) as bar:
        for _ in range(20):
            bar.update()
    lines = _lines(caplog)
    assert lines[0] == f"{MARKER}editing (RMisU): 0/20 step"
    assert [line.split(": ")[1].split(" ")[0] for line in lines[1:]] == [f"{k}/20" for k in range(2, 21, 2)]
    assert "(50 %)" in lines[5] and "s left" in lines[5] and "s left" not in lines[-1]
    assert all(line.startswith(MARKER) for line in lines)


def test_a_loop_stopped_early_says_where_and_other_ranks_are_silent(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER.name)
    bar = Progress(100, "training", unit="step", bar=False)
    for _ in range(3):  # a time budget ends the loop at step 3
        bar.update()
    bar.close()
    assert list(progress(range(4), 4, "items")) == [0, 1, 2, 3]
    with Progress(10, "rank 1", enabled=False) as quiet:
        quiet.update(10)
    lines = _lines(caplog)
    assert any(x.startswith(f"{MARKER}training: 3/100 step (3 %)") for x in lines)
    assert lines[-1].startswith(f"{MARKER}items: 4/4 it (100 %)") and not any("rank 1" in x for x in lines)


def test_the_launcher_relays_complete_progress_lines_of_the_log(tmp_path):
    log = tmp_path / "edit.log"
    log.write_text("[rank0] loading\n[2026] INFO progress editing (RMisU): 30/300 step (10 %), 3 s elapsed\n"
                   "progress editing (RMisU): 60/3")  # the last line is still being written
    got: list[str] = []
    offset = _relay_progress(log, 0, got.append)
    assert got == ["progress editing (RMisU): 30/300 step (10 %), 3 s elapsed"]
    with log.open("a") as f:
        f.write("00 step (20 %), 6 s elapsed\n")
    _relay_progress(log, offset, got.append)
    assert got[-1] == "progress editing (RMisU): 60/300 step (20 %), 6 s elapsed" and len(got) == 2


def test_log_to_stderr_prints_once(capsys):
    log_to_stderr()
    log_to_stderr()
    try:
        LOGGER.info("%shello", MARKER)
        assert capsys.readouterr().err == f"{MARKER}hello\n"
    finally:
        for handler in list(LOGGER.handlers):
            LOGGER.removeHandler(handler)


def test_a_job_logging_to_a_file_gets_no_weight_loading_bars(tiny_models, tmp_path):
    """A job's stderr is a log file (the edit job's edit.log): transformers' loading bars, redrawn with carriage
    returns, must not fill it."""
    import subprocess
    import sys

    from mip_core.modeling import save_model

    model, processor = tiny_models["qwen2_5_vl"]
    save_model(model, processor, str(tmp_path / "m"))
    code = ("from mip_core.progress import log_to_stderr; log_to_stderr(); "
            f"from mip_core.modeling import load_model; load_model({str(tmp_path / 'm')!r})")
    log = tmp_path / "job.log"
    with log.open("wb") as f:
        subprocess.run([sys.executable, "-c", code], check=True, stdout=f, stderr=subprocess.STDOUT)
    text = log.read_text()
    assert "\r" not in text and "Loading weights" not in text, text[-500:]
