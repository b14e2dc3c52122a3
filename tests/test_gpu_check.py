"""benchmarks/gpu_check.sh, the one-call GPU validation script, without a GPU: its dry run (every
heavy command stubbed, a GPU pretended) and its no-GPU path. Seconds, no extension build."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = ["facts", "deps", "build-aot", "tests", "sanitize-memcheck", "sanitize-racecheck", "sanitize-synccheck",
         "sanitize-initcheck", "build-jit", "tests-jit", "bench"]
PHASE_B = STEPS[3:10]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def run(tmp_path, *args, **env):
    """Runs the script with a clean GPU_CHECK_* environment plus `env`; returns
    (exit status, stdout, {step: (status, seconds, note)} from OUTDIR/summary.md)."""
    out = tmp_path / "out"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    clean.update(GPU_CHECK_PYTHON=sys.executable, GPU_CHECK_COMMIT="0123456789abcdef",
                 GPU_CHECK_WHEELS=str(tmp_path / "no-wheels"), GPU_CHECK_JIT_DIR=str(tmp_path / "jit"))
    clean.update({k: str(v) for k, v in env.items()})
    p = subprocess.run(["bash", str(SCRIPT), str(out), *args], cwd=ROOT, env=clean, capture_output=True,
                       text=True, timeout=120)
    summary = (out / "summary.md").read_text() if (out / "summary.md").exists() else ""
    rows = {}
    for line in summary.splitlines():
        m = re.match(r"\| (\S+) \| (PASS|FAIL|TIMEOUT|SKIP) \| (\d+) \| (.*) \|$", line)
        if m:
            rows[m[1]] = (m[2], int(m[3]), m[4])
    return p.returncode, p.stdout + p.stderr, rows


def test_dry_run_passes_every_step_and_prints_the_summary(tmp_path):
    archive = tmp_path / "o" / "check.tgz"
    rc, out, rows = run(tmp_path, "--archive", archive, GPU_CHECK_DRY=1)
    assert rc == 0, out
    assert list(rows) == STEPS, out
    assert all(status == "PASS" for status, _, _ in rows.values()), rows
    # the summary is the end of the output: what a device call's output tail shows
    assert re.search(r"total \d+s: 11 passed, 0 failed, 0 skipped\s*$", out), out[-2000:]
    # the commands the steps would run
    logs = tmp_path / "out"
    tests = (logs / "tests.log").read_text()
    assert "-m pytest" in tests and "-rfE" in tests and "--durations=30" in tests and "--junitxml=" in tests, tests
    assert " -x" not in tests and "TRIPLET_CUDA_EXPECT_LOADER=aot" in tests, tests
    for tool in ("memcheck", "racecheck", "synccheck", "initcheck"):
        log = (logs / f"sanitize-{tool}.log").read_text()
        assert f"--tool {tool}" in log and "-m sanitize tests/test_cuda_sanitize.py" in log, log
        assert "PYTORCH_NO_CUDA_MEMORY_CACHING=1" in log and "--error-exitcode" in log, log
    build = (logs / "build-aot.log").read_text()
    assert "TORCH_CUDA_ARCH_LIST=9.0" in build and "MAX_JOBS=" in build, build
    assert "TRIPLET_CUDA_FORCE_JIT=1" in (logs / "build-jit.log").read_text()
    bench = (logs / "bench.log").read_text()
    assert "-m benchmarks --preset gpu --out " + str(logs / "bench") in bench, bench
    with tarfile.open(archive) as t:
        names = t.getnames()
    assert "out/summary.md" in names and "out/tests.log" in names, names


def test_dry_run_failed_build_skips_everything_after_it(tmp_path):
    rc, out, rows = run(tmp_path, GPU_CHECK_DRY=1, GPU_CHECK_DRY_FAIL="build-aot")
    assert rc == 1, out
    assert rows["build-aot"][0] == "FAIL", rows
    assert "last lines of build-aot.log" in out and "fails on purpose" in out, out
    for step in PHASE_B + ["bench"]:
        assert rows[step][0] == "SKIP" and "ahead-of-time build failed" in rows[step][2], (step, rows[step])


def test_dry_run_failures_timeouts_and_user_skips(tmp_path):
    rc, out, rows = run(tmp_path, GPU_CHECK_DRY=1, GPU_CHECK_DRY_FAIL="tests", GPU_CHECK_DRY_HANG="sanitize-racecheck",
                        GPU_CHECK_T_SANITIZE=2, GPU_CHECK_SKIP="build-jit,bench")
    assert rc == 1, out
    assert rows["tests"][0] == "FAIL" and rows["tests"][2].startswith("dry run; exit 1"), rows["tests"]
    assert rows["sanitize-racecheck"][0] == "TIMEOUT" and "timed out after 2s" in rows["sanitize-racecheck"][2]
    for step in ("sanitize-memcheck", "sanitize-synccheck", "sanitize-initcheck"):
        assert rows[step][0] == "PASS", rows[step]
    assert rows["build-jit"][0] == "SKIP" and rows["bench"][0] == "SKIP", rows
    assert rows["tests-jit"][0] == "PASS", rows  # skipping build-jit reuses an earlier JIT build
    assert re.search(r"total \d+s: 7 passed, 2 failed, 2 skipped\s*$", out), out[-2000:]


def test_dry_run_out_of_budget_is_a_failure(tmp_path):
    rc, out, rows = run(tmp_path, GPU_CHECK_DRY=1, GPU_CHECK_BUDGET_S=100)
    assert rc == 1, out
    assert rows["deps"][0] == "TIMEOUT" and "no time left" in rows["deps"][2], rows
    assert rows["build-aot"][0] == "TIMEOUT", rows
    assert rows["tests"][0] == "SKIP" and "did not finish" in rows["tests"][2], rows


def test_dry_run_leaves_out_test_modules_with_missing_imports(tmp_path):
    tests = tmp_path / "suite"
    tests.mkdir()
    (tests / "test_fine.py").write_text("import os\nimport pytest\nfrom conftest import x\n")
    (tests / "test_needs_it.py").write_text("import json\nimport surely_not_installed_pkg.sub\n")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "something-1.0-py3-none-any.whl").write_bytes(b"")
    rc, out, rows = run(tmp_path, GPU_CHECK_DRY=1, GPU_CHECK_TESTS=tests, GPU_CHECK_WHEELS=wheels)
    assert rc == 0, out
    assert "tests left out: test_needs_it.py (no surely_not_installed_pkg)" in rows["deps"][2], rows["deps"]
    assert "wheels: 1" in rows["deps"][2]
    assert "pip install" in (tmp_path / "out" / "deps.log").read_text()
    log = (tmp_path / "out" / "tests.log").read_text()
    assert f"--ignore={tests}/test_needs_it.py" in log and "test_fine.py" not in log, log
    assert "left out: test_needs_it.py" in rows["tests"][2], rows["tests"]


def test_dry_run_conftest_with_a_missing_import_fails_deps(tmp_path):
    tests = tmp_path / "suite"
    tests.mkdir()
    (tests / "conftest.py").write_text("import surely_not_installed_pkg\n")
    (tests / "test_fine.py").write_text("import pytest\n")
    rc, out, rows = run(tmp_path, GPU_CHECK_DRY=1, GPU_CHECK_TESTS=tests)
    assert rc == 1, out
    assert rows["deps"][0] == "FAIL" and "conftest.py (no surely_not_installed_pkg)" in rows["deps"][2], rows["deps"]
    assert "no test can run" in (tmp_path / "out" / "deps.log").read_text()
    assert "--ignore" not in (tmp_path / "out" / "tests.log").read_text()  # the suite fails visibly instead


def test_no_gpu_path_skips_every_cuda_step(tmp_path):
    rc, out, rows = run(tmp_path, GPU_CHECK_NO_GPU=1)
    assert rc == 0, out
    assert rows["facts"][0] == "PASS" and rows["deps"][0] == "PASS", rows
    for step in STEPS[2:]:
        assert rows[step][0] == "SKIP" and "no CUDA device" in rows[step][2], (step, rows[step])
    assert "NO CUDA DEVICE: nothing ran on a GPU" in out
    facts = (tmp_path / "out" / "facts.log").read_text()
    assert "commit: 0123456789abcdef" in facts and "torch " in facts and "source fingerprint:" in facts, facts


def test_fingerprint_and_arguments(tmp_path):
    fp = subprocess.run(["bash", str(SCRIPT), "--fingerprint"], cwd=ROOT, capture_output=True, text=True)
    assert fp.returncode == 0 and re.fullmatch(r"[0-9a-f]{16}\n", fp.stdout), fp
    bad = subprocess.run(["bash", str(SCRIPT), "--no-such-option"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option" in bad.stderr
    usage = subprocess.run(["bash", str(SCRIPT), "--help"], cwd=ROOT, capture_output=True, text=True)
    assert usage.returncode == 0 and "gpu_check.sh [OUTDIR]" in usage.stdout
