"""The benchmark harness's plumbing (benchmarks/): baselines are right, a tiny sweep runs end to
end, failures are recorded and the sweep goes on, the JSON schema is stable. No timing
assertions: these run on a small CPU-only CI machine."""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import cli, harness, impls, naive, report, sweep  # noqa: E402
from benchmarks.harness import GIB, Case  # noqa: E402


def _reference():
    """triplet_cuda.reference; loaded by path (with a stub package) if the extension cannot load,
    so the baselines are checked even where the C++ build fails."""
    try:
        return importlib.import_module("triplet_cuda.reference")
    except Exception:  # noqa: BLE001
        pkg_dir = ROOT / "triplet_cuda"
        pkg = types.ModuleType("_tc_stub")
        pkg.__path__ = [str(pkg_dir)]
        sys.modules["_tc_stub"] = pkg
        for name in ("_types", "reference"):
            spec = importlib.util.spec_from_file_location(f"_tc_stub.{name}", pkg_dir / f"{name}.py")
            mod = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mod
            spec.loader.exec_module(mod)
        return sys.modules["_tc_stub.reference"]


REF_FUNCTIONS = {
    "batch_hard": "batch_hard_triplet_loss",
    "batch_all": "batch_all_triplet_loss",
    "semi_hard": "semi_hard_triplet_loss",
    "contrastive": "contrastive_loss",
}


def _inputs(n, d, classes, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), generator=g)
    return x, labels


# ----------------------------------------------------------------------------- baselines are right
@pytest.mark.parametrize("loss", naive.LOSSES)
@pytest.mark.parametrize("metric", ["euclidean", "squared_euclidean"])
@pytest.mark.parametrize("n,classes,seed", [(12, 3, 0), (13, 5, 1), (24, 6, 2), (9, 9, 3)])
def test_naive_matches_reference(loss, metric, n, classes, seed):
    ref = getattr(_reference(), REF_FUNCTIONS[loss])
    x, labels = _inputs(n, 5, classes, seed)
    margin = naive.DEFAULT_MARGIN[loss]
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    got = naive.FUNCTIONS[loss](xa, labels, margin, metric=metric)
    want = ref(xb, labels, margin, metric=metric)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    (ga,) = torch.autograd.grad(got, xa)
    (gb,) = torch.autograd.grad(want, xb)
    torch.testing.assert_close(ga, gb, rtol=1e-7, atol=1e-10)


def test_naive_handles_anchors_without_positive_or_negative():
    ref = _reference()
    x, _ = _inputs(6, 4, 2, 7)
    for labels in (torch.tensor([0, 0, 1, 1, 2, 3]), torch.zeros(6, dtype=torch.int64)):
        for loss in naive.LOSSES:
            m = naive.DEFAULT_MARGIN[loss]
            got = naive.FUNCTIONS[loss](x, labels, m)
            want = getattr(ref, REF_FUNCTIONS[loss])(x, labels, m)
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss", ["batch_hard", "batch_all"])
def test_pml_adapters_match_reference(loss):
    pytest.importorskip("pytorch_metric_learning")
    from benchmarks import peers

    ref = getattr(_reference(), REF_FUNCTIONS[loss])
    x = torch.randn(32, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(8).repeat_interleave(4)
    got = peers.make(loss, 0.2)(x, labels)
    torch.testing.assert_close(got, ref(x, labels, 0.2), rtol=1e-9, atol=1e-12)


def test_limits_and_steps_shapes():
    x = torch.randn(16, 4)
    labels = torch.arange(4).repeat_interleave(4)
    for impl, pass_, shape in (("matmul", "fwd", (16, 16)), ("matmul", "fwd+bwd", (16, 4)),
                               ("read_once", "fwd", ()), ("read_once", "fwd+bwd", (16, 4)),
                               ("naive", "fwd", ()), ("naive", "fwd+bwd", (16, 4))):
        step = impls.make_step(Case(impl, "batch_hard", pass_, 16, 4))
        xi = x.clone().requires_grad_(step.needs_grad)
        assert tuple(step(xi, labels).shape) == shape


def test_pk_labels():
    labels = harness.pk_labels(10, 4, torch.Generator().manual_seed(0))
    assert sorted(torch.bincount(labels).tolist()) == [2, 4, 4]


# ----------------------------------------------------------------------------- schema
EXPECTED_ROW_KEYS = ["impl", "loss", "pass", "n", "d", "dtype", "k", "status", "time_s_median", "time_s_iqr",
                     "peak_mem_bytes", "ratio_vs_ours", "reps", "times_s", "first_call_s", "mem_estimate_bytes",
                     "note"]
EXPECTED_META_KEYS = ["device", "device_slug", "torch", "cuda", "triplet_cuda", "loaded_from", "pml", "commit",
                      "dirty", "command", "threads", "date", "python", "platform", "preset", "config", "timer",
                      "memory", "mem_budget_bytes", "isolated", "loadavg", "wall_s"]


def test_schema_is_stable():
    # changing these breaks readers of committed results: bump report.SCHEMA_VERSION and update here
    assert report.SCHEMA_VERSION == 1
    assert list(report.TOP_KEYS) == ["schema_version", "meta", "results", "checks"]
    assert list(report.ROW_KEYS) == EXPECTED_ROW_KEYS
    assert list(report.META_KEYS) == EXPECTED_META_KEYS
    assert list(harness.empty_row(Case("naive", "batch_hard", "fwd", 8, 4))) == EXPECTED_ROW_KEYS


def test_validate_catches_a_broken_document():
    row = harness.empty_row(Case("naive", "batch_hard", "fwd", 8, 4))
    row["status"] = "fine"
    doc = {"schema_version": 1, "meta": {}, "results": [row], "checks": []}
    errors = report.validate(doc)
    assert any("meta keys" in e for e in errors) and any("status" in e for e in errors)


# ----------------------------------------------------------------------------- end to end
def _tiny(**kw) -> sweep.SweepConfig:
    base = dict(name="tiny", device="cpu", impls=(impls.OURS, "naive", "matmul", "read_once"),
                losses=("batch_hard", "contrastive"), passes=("fwd", "fwd+bwd"), ns=(16, 32), ds=(8,),
                dtypes=("float32",), min_reps=2, max_reps=3, target_s=0.0, warmup_s=0.0, threads=1,
                case_timeout_s=240.0)
    base.update(kw)
    return sweep.SweepConfig(**base)


def test_tiny_sweep_end_to_end(tmp_path, capsys):
    doc = cli.run(_tiny(isolate=True), out_dir=tmp_path, progress=False, argv=["benchmarks/run.py", "--tiny"])
    saved = json.loads((tmp_path / "tiny.json").read_text())
    assert saved == json.loads(json.dumps(doc))
    assert report.validate(saved) == []
    rows = saved["results"]
    assert len(rows) == 4 * 2 * 2 * 2
    ours_ok = impls.availability(impls.OURS)[0]
    for r in rows:
        if r["impl"] == impls.OURS and not ours_ok:
            assert r["status"].startswith("skipped: ")
            continue
        assert r["status"] == "ok", r
        assert r["reps"] >= 2 and len(r["times_s"]) == r["reps"]
        assert r["time_s_median"] > 0 and r["peak_mem_bytes"] is not None
        if ours_ok:
            assert r["ratio_vs_ours"] is not None
            if r["impl"] == impls.OURS:
                assert r["ratio_vs_ours"] == pytest.approx(1.0)
    assert saved["meta"]["threads"] == 1 and saved["meta"]["isolated"] is True
    assert saved["meta"]["command"] == "python benchmarks/run.py --tiny"
    md = (tmp_path / "tiny.md").read_text()
    assert "| loss | pass | N | D | dtype | triplet_cuda | naive eager |" in md
    assert md.splitlines()[0] in capsys.readouterr().out
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "tiny-time-fwdbwd-float32.png").stat().st_size > 0
        assert (tmp_path / "tiny-memory-fwd-float32.png").stat().st_size > 0
    (tmp_path / "tiny.md").unlink()
    cli.render(tmp_path / "tiny.json", plots=False)  # the report again, from the JSON alone
    assert (tmp_path / "tiny.md").read_text().startswith(md.splitlines()[0])


def test_failures_are_recorded_and_the_sweep_goes_on():
    config = _tiny(impls=("_ok", "_oom", "_alloc", "_error", "_huge"), losses=("batch_hard",), passes=("fwd",),
                   ns=(16, 32), isolate=False)
    rows, _ = sweep.run(config, progress=False)
    status = {(r["impl"], r["n"]): r["status"] for r in rows}
    assert status[("_ok", 16)] == status[("_ok", 32)] == "ok"
    assert status[("_oom", 16)] == status[("_alloc", 16)] == "OOM"
    # after an OOM, the larger N of the series are not tried
    assert status[("_oom", 32)] == "skipped: OOM at N=16"
    assert status[("_error", 16)].startswith("error: ValueError")
    assert status[("_huge", 16)].startswith("skipped: needs ") and status[("_huge", 16)].endswith(" GiB")


def test_killed_child_is_recorded_as_oom():
    config = _tiny(impls=("_kill", "_ok"), losses=("batch_hard",), passes=("fwd",), ns=(16,), isolate=True)
    rows, _ = sweep.run(config, progress=False)
    assert [r["status"] for r in rows] == ["OOM", "ok"]
    assert "SIGKILL" in rows[0]["note"]


def test_memory_fallback_without_clear_refs(monkeypatch):
    monkeypatch.setattr(harness, "reset_peak_rss", lambda: False)
    case = Case("naive", "batch_hard", "fwd", 64, 8, min_reps=2, max_reps=2, target_s=0.0, warmup_s=0.0)
    row = harness.run_case(case, impls.make_step)
    assert row["status"] == "ok" and row["peak_mem_bytes"] is not None
    assert "first call" in row["note"]


def test_memory_estimate_skips_a_too_large_case():
    assert impls.mem_estimate("naive", "batch_all", "fwd+bwd", 65536, 128, 4) > 1000 * GIB
    assert impls.mem_estimate(impls.OURS, "batch_all", "fwd+bwd", 65536, 128, 4) < 1 * GIB

    def never(case):
        raise AssertionError(f"{case.describe()} should have been skipped")

    config = _tiny(impls=("naive",), losses=("batch_all",), passes=("fwd+bwd",), ns=(65536,), ds=(128,),
                   isolate=False, mem_budget_bytes=16 * GIB)
    rows, _ = sweep.run(config, progress=False, step_factory=never)
    assert rows[0]["status"].startswith("skipped: needs ") and rows[0]["mem_estimate_bytes"] > 16 * GIB


def test_slow_case_is_skipped_by_extrapolation():
    config = _tiny(impls=("naive",), losses=("batch_all",), passes=("fwd",), ns=(16, 4096), isolate=False,
                   max_call_s=1e-9, mem_budget_bytes=2**60)
    calls = []

    def factory(case):
        calls.append(case.n)
        return impls.make_step(case)

    rows, _ = sweep.run(config, progress=False, step_factory=factory)
    assert calls == [16]
    assert rows[1]["status"].startswith("skipped: est. ")


def test_progress_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails
    config = _tiny(impls=("_ok",), losses=("batch_hard",), passes=("fwd",), ns=(16,), isolate=False)
    sweep.run(config, progress=True)
    assert "[1/1] _ok batch_hard fwd N=16" in capsys.readouterr().err


# ----------------------------------------------------------------------------- ratios, checks, CLI
def _row(impl, t, loss="batch_hard", n=64, status="ok", mem=None):
    r = harness.empty_row(Case(impl, loss, "fwd+bwd", n, 8))
    r.update(status=status, time_s_median=t, peak_mem_bytes=mem)
    return r


def test_ratios_and_checks():
    rows = [_row(impls.OURS, 0.5), _row("naive", 2.0), _row("pml", None, status="OOM"),
            _row(impls.OURS, 1.0, n=128, mem=100), _row("matmul", 0.25, n=128)]
    sweep.add_ratios(rows)
    assert [r["ratio_vs_ours"] for r in rows] == [1.0, 4.0, None, 1.0, 0.25]
    sel = lambda impl, n=64: {"impl": impl, "loss": "batch_hard", "pass": "fwd+bwd", "n": n}  # noqa: E731
    checks = [
        sweep.Check("vs naive", "speedup", sel(impls.OURS), sel("naive"), ">=", 4.0),
        sweep.Check("vs pml", "speedup", sel(impls.OURS), sel("pml"), ">=", 4.0),
        sweep.Check("time", "time", sel(impls.OURS, 128), None, "<", 0.9),
        sweep.Check("mem", "memory", sel(impls.OURS, 128)),
        sweep.Check("ratio", "time_ratio", sel(impls.OURS, 128), sel("matmul", 128)),
    ]
    out = sweep.evaluate_checks(checks, rows)
    assert [c["value"] for c in out] == [4.0, None, 1.0, 100, 4.0]
    assert [c["met"] for c in out] == [True, None, False, None, None]
    assert out[1]["note"] == "pml: OOM"


def test_cli_configs():
    p = cli.parser()
    quick = cli.build_config(p.parse_args(["--quick", "--device", "cpu"]))
    assert quick.name == "quick" and quick.cases is None
    custom = cli.build_config(p.parse_args(["--device", "cpu", "--n", "256,512", "--impl", "naive", "--k", "8"]))
    assert custom.name == "custom" and custom.ns == (256, 512) and custom.impls == ("naive",) and custom.k == 8
    bar = cli.build_config(p.parse_args(["--preset", "cpu-bar", "--device", "cpu", "--impl", "triplet_cuda"]))
    assert bar.cases and all(c["impl"] == impls.OURS for c in bar.cases) and bar.name == "cpu-bar-custom"
    gpu = sweep.preset("gpu", "cuda")
    assert gpu.isolate is False and {c["n"] for c in gpu.cases} == {8192, 16384, 65536}
    assert dataclasses.replace(sweep.preset("full", "cpu")).ns[-1] == 65536
    with pytest.raises(SystemExit):
        cli.build_config(p.parse_args(["--device", "cpu", "--impl", "nope"]))
