"""`python -m triplet_cuda` (triplet_cuda.train_demo): a short run learns, writes its PNG and
metrics.json, is deterministic for a seed, and --help documents every flag."""
from __future__ import annotations

import json
import runpy
import sys

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from triplet_cuda import train_demo  # noqa: E402

SHORT = ["--epochs", "2", "--batch-size", "10x8", "--device", "cpu"]


def _run(tmp_path, name, *extra):
    out = tmp_path / name
    result = train_demo.main([*SHORT, "--out", str(out), *extra])
    with open(out / "metrics.json") as f:
        saved = json.load(f)
    return result, saved, out


def test_short_run_learns_and_writes_outputs(tmp_path, capsys):
    result, saved, out = _run(tmp_path, "a")
    assert (out / "digits.png").stat().st_size > 10_000
    assert saved["after"]["map@r"] > saved["before"]["map@r"] + 0.1
    assert saved["after"]["recall@1"] > saved["before"]["recall@1"]
    assert len(saved["history"]["recall@1"]) == 3 and len(saved["history"]["epoch_loss"]) == 2
    assert all(0.0 <= a <= 1.0 for a in saved["history"]["active_fraction"])
    text = capsys.readouterr().out
    for needle in ("held-out before training: Recall@1", "held-out after training:  Recall@1", "mAP@R",
                   "active triplets", "naive Gram-matrix masks", "digits.png"):
        assert needle in text


def test_deterministic_for_a_seed(tmp_path):
    _, a, _ = _run(tmp_path, "a", "--epochs", "1")
    _, b, _ = _run(tmp_path, "b", "--epochs", "1")
    _, c, _ = _run(tmp_path, "c", "--epochs", "1", "--seed", "1")
    for key in ("before", "after"):
        assert a[key] == b[key]
    assert a["history"]["step_loss"] == b["history"]["step_loss"]
    assert a["history"]["step_loss"] != c["history"]["step_loss"]


@pytest.mark.parametrize("mining,metric", [("batch_all", "cosine"), ("semi_hard", "squared_euclidean")])
def test_other_losses_and_metrics_run(tmp_path, mining, metric):
    _, saved, _ = _run(tmp_path, mining, "--mining", mining, "--metric", metric, "--epochs", "1")
    assert saved["args"]["mining"] == mining and saved["args"]["metric"] == metric
    assert saved["after"]["map@r"] > saved["before"]["map@r"]


def test_help_explains_every_flag():
    text = train_demo.build_parser().format_help()
    for flag in ("--mining", "--metric", "--margin", "--epochs", "--batch-size", "--device", "--seed", "--out"):
        assert flag in text


def test_bad_batch_size_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        train_demo.build_parser().parse_args(["--batch-size", "11x4"])
    assert "need 1 <= P <= 10" in capsys.readouterr().err


def test_python_dash_m_entry_point_help(monkeypatch, capsys):
    # what `python -m triplet_cuda --help` runs, in this process (the package already loaded)
    monkeypatch.setattr(sys, "argv", ["python -m triplet_cuda", "--help"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("triplet_cuda", run_name="__main__")
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--batch-size" in out and "digits" in out
