"""The progress line of a long compression step (acf.methods.step_progress): the block in progress is read off the
libraries' output that goes to the step log, and shown on the terminal, never in the log."""

from __future__ import annotations

import io
import json
import logging
import time

from acf.methods.step_progress import StepProgress, elapsed, num_blocks


def test_block_is_read_off_library_lines_and_shown_outside_the_log(tmp_path):
    from acf.methods.run_steps import _step_log

    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 30}))
    term = io.StringIO()
    prog = StepProgress("gptq", num_blocks(tmp_path), term, quiet=0.0, every=0.05)
    with _step_log(tmp_path / "step.log", logging.getLogger("acf.methods"), prog), prog:
        print("Quantizing 1 module(s): ['model.layers.13.mlp.up_proj']")
        print("2026 | INFO | Applying AutoRound on layer model.layers.4")    # a lower block later: the max stays
        time.sleep(0.3)
    assert prog.block == 13 and prog.line().startswith("  gptq · block 14/30 · ")
    shown = term.getvalue()
    assert "gptq · block 14/30" in shown and "Quantizing" not in shown            # one line, not the library's
    assert "block 14/30" not in (tmp_path / "step.log").read_text()                # the log keeps the library's


def test_a_short_step_shows_nothing_and_configs_without_layers(tmp_path):
    term = io.StringIO()
    with StepProgress("rtn", None, term, quiet=5.0):
        pass
    assert term.getvalue() == ""
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": 26}}))
    assert num_blocks(tmp_path) == 26 and num_blocks(tmp_path / "missing") is None
    assert elapsed(83) == "1m 23s" and elapsed(9) == "9s"


def test_model_loads_keep_library_bars_off_stderr(capsys):
    """compressed-tensors draws two tqdm bars per compressed model load with `disable=` passed explicitly (so
    TQDM_DISABLE cannot stop them); acf's loader keeps bar updates off stderr unless --verbose."""
    import sys

    from acf.models.loading import quiet_load_bars

    lg = logging.getLogger("acf")
    old = lg.level
    lg.setLevel(logging.WARNING)
    try:
        with quiet_load_bars():
            sys.stderr.write("Applying quantization config:  48%|####8     | 101/210 [00:00<00:00, 1000.00it/s]")
            sys.stderr.write("a real warning\n")
    finally:
        lg.setLevel(old)
    err = capsys.readouterr().err
    assert "Applying quantization" not in err and "a real warning" in err
