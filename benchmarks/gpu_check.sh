#!/usr/bin/env bash
# One-call validation of triplet_cuda on a GPU (issue 8): device facts, the ahead-of-time build
# for sm_90, the whole test suite on CUDA, the compute-sanitizer subset under memcheck,
# racecheck, synccheck and initcheck, the JIT build and load, and `python -m benchmarks
# --preset gpu`; a summary table (step, status, seconds, note) at the end and in summary.md.
# See benchmarks/README.md ("GPU check") for the device call and how to read the results.
#
#   bash benchmarks/gpu_check.sh [OUTDIR] [--archive FILE.tgz]
#   bash benchmarks/gpu_check.sh --fingerprint     # the source fingerprint, and nothing else
#
# OUTDIR defaults to benchmarks/results/<device>/check-<commit>/. --archive writes OUTDIR as a
# .tgz (refreshed after each phase, so a killed call still leaves the phases before it): with
# the default OUTDIR its paths are <device>/check-<commit>/... (extract it into
# benchmarks/results), else OUTDIR's own name/... . Exit status: 0 when no step failed or timed out (skipped steps
# do not count: with no GPU every CUDA step is skipped and the summary says so), 1 otherwise,
# 2 for bad arguments.
#
# Steps and their order (each under its own `timeout`, all within GPU_CHECK_BUDGET_S):
#   A  facts, deps, build-aot                       one after the other
#   B  tests | sanitize-{memcheck,racecheck,synccheck,initcheck} | build-jit -> tests-jit
#                                                   in parallel, on the ahead-of-time build
#   C  bench                                        alone on the GPU, after B
# A failed ahead-of-time build skips everything after it.
#
# Environment (all optional):
#   GPU_CHECK_COMMIT      commit to record (default: git rev-parse HEAD; the device's copy of
#                         the tree has no .git, so the caller passes it)
#   GPU_CHECK_PYTHON      python with torch (default python3)
#   GPU_CHECK_BUDGET_S    seconds for everything (default 540, inside a 600 s device call)
#   GPU_CHECK_T_<STEP>    a step's own cap in seconds, STEP in FACTS DEPS BUILD TESTS SANITIZE
#                         JIT_BUILD JIT_TESTS BENCH (see the defaults below)
#   GPU_CHECK_SKIP        comma-separated steps to skip (e.g. bench,build-jit for a rerun)
#   GPU_CHECK_ARCH        TORCH_CUDA_ARCH_LIST of both builds (default 9.0)
#   GPU_CHECK_CLEAN=1     remove build/ and the JIT cache first (default: reuse them, so a
#                         rerun on a warm machine recompiles only what changed)
#   GPU_CHECK_JIT_DIR     TORCH_EXTENSIONS_DIR of the JIT build (default /tmp/gpu_check_jit)
#   GPU_CHECK_WHEELS      folder of wheels installed first, for test / benchmark dependencies
#                         the device lacks (default .whl)
#   GPU_CHECK_TEST_WORKERS  pytest-xdist workers for the test suite where xdist is installed
#                         (default 4; 1 = no xdist)
#   GPU_CHECK_SANITIZER_ARGS  extra compute-sanitizer arguments (e.g. --kernel-name kns=triplet_cuda)
#   GPU_CHECK_TESTS_PYTEST, GPU_CHECK_SANITIZE_PYTEST  extra pytest arguments of the test suite /
#                         the sanitizer runs, for reruns (e.g. "-k cuda", "-k batch_hard")
#   GPU_CHECK_BENCH_ARGS  extra `python -m benchmarks` arguments (default --target-s 0.5)
#   GPU_CHECK_NO_GPU=1    act as if there were no CUDA device (the skip path, for the tests)
#   GPU_CHECK_DRY=1       dry run: pretend a GPU and compute-sanitizer, and print the heavy
#                         commands instead of running them; GPU_CHECK_DRY_FAIL / _HANG (comma-
#                         separated steps) make those stubs fail / hang (tests/test_gpu_check.py)
set -uo pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
ROOT="$(cd "$(dirname "$SELF")/.." && pwd)"
cd "$ROOT" || exit 2

SANITIZER_TOOLS=(memcheck racecheck synccheck initcheck)
PHASE_B_STEPS=(tests sanitize-memcheck sanitize-racecheck sanitize-synccheck sanitize-initcheck build-jit tests-jit)
ALL_STEPS=(facts deps build-aot "${PHASE_B_STEPS[@]}" bench)

# ----------------------------------------------------------------------------- helpers
fingerprint() {
  # sha256 over the sources that decide what is built, tested and benchmarked (paths and
  # contents), so a device run can be matched to a commit even without .git there
  find csrc triplet_cuda tests benchmarks setup.py pyproject.toml -type f \
    \( -name '*.py' -o -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \
       -o -name '*.sh' -o -name '*.toml' \) -not -path '*/__pycache__/*' -not -path 'benchmarks/results/*' \
    2>/dev/null | LC_ALL=C sort | xargs -r sha256sum | sha256sum | cut -c1-16
}

# Runs a heavy command, or in a dry run prints it (and fails / hangs where asked).
x() {
  if [[ "${GPU_CHECK_DRY:-0}" == 1 ]]; then
    echo "[dry] $*"
    if [[ ",${GPU_CHECK_DRY_FAIL:-}," == *",$STEP,"* ]]; then echo "[dry] $STEP fails on purpose"; return 1; fi
    if [[ ",${GPU_CHECK_DRY_HANG:-}," == *",$STEP,"* ]]; then echo "[dry] $STEP hangs on purpose"; sleep 600; fi
    return 0
  fi
  "$@"
}

note() { printf '%s' "$*" >"$STATE/$STEP.note"; }

# pytest's JUnit XML -> "P passed, F failed, E errors, S skipped (CUDA cases: ...)"
junit_note() {
  [[ -f "$1" ]] || { echo "no JUnit XML"; return; }
  "$PY" - "$1" <<'PY' 2>/dev/null || echo "JUnit XML unreadable"
import sys
import xml.etree.ElementTree as ET

counts = {"all": [0, 0, 0, 0], "cuda": [0, 0, 0, 0]}  # passed, failed, errors, skipped
for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
    kinds = {child.tag for child in case}
    k = 1 if "failure" in kinds else 2 if "error" in kinds else 3 if "skipped" in kinds else 0
    counts["all"][k] += 1
    name = case.get("name", "")
    if "cuda" in name[name.find("["):].lower() or "test_cuda_" in case.get("classname", ""):  # [..cuda..] ids
        counts["cuda"][k] += 1
p, f, e, s = counts["all"]
cp, cf, ce, cs = counts["cuda"]
print(f"{p} passed, {f} failed, {e} errors, {s} skipped; CUDA cases: {cp} passed, {cf} failed, {ce} errors, {cs} skipped")
PY
}

find_sanitizer() {
  local c
  for c in "${GPU_CHECK_SANITIZER:-}" "$(command -v compute-sanitizer 2>/dev/null)" \
           "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
           "${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer/compute-sanitizer"; do
    if [[ -n "$c" && -x "$c" ]]; then echo "$c"; return 0; fi
  done
  return 1
}

# ----------------------------------------------------------------------------- the steps
# Each runs as `bash gpu_check.sh --run-step NAME` under `timeout`, output in OUTDIR/NAME.log;
# its exit status is the step's; it may leave a one-line note in $STATE/NAME.note.

step_facts() {
  echo "date (UTC): $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "command: $GPU_CHECK_COMMAND"
  echo "commit: $COMMIT${DIRTY:+ ($DIRTY)}"
  echo "source fingerprint: $FINGERPRINT (bash benchmarks/gpu_check.sh --fingerprint)"
  echo "host: $(uname -srm); $(nproc) cores; $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 2^20}' /proc/meminfo 2>/dev/null)"
  echo
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,power.limit \
      --format=csv 2>&1
    echo
    nvidia-smi 2>&1
  else
    echo "nvidia-smi: not found"
  fi
  echo
  if command -v nvcc >/dev/null 2>&1; then nvcc --version 2>&1 | tail -n 2; else echo "nvcc: not found"; fi
  local san
  if san="$(find_sanitizer)"; then "$san" --version 2>&1 | tail -n 2; else echo "compute-sanitizer: not found"; fi
  echo
  local gpu
  gpu="$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1)"
  GPU="$gpu" "$PY" - <<'PY'
import importlib.metadata as md
import os
import platform

import torch

print(f"python {platform.python_version()}; torch {torch.__version__}; torch CUDA {torch.version.cuda}; "
      f"cuDNN {torch.backends.cudnn.version() if torch.cuda.is_available() else None}")
print(f"torch arch list: {torch.cuda.get_arch_list() if torch.cuda.is_available() else []}")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i}: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
              f"{p.total_memory / 2**30:.1f} GiB, L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
else:
    print("torch.cuda.is_available(): False")
versions = []
for name in ("setuptools", "ninja", "pybind11", "numpy", "pytest", "pytest-xdist", "pytest-timeout",
             "hypothesis", "matplotlib", "tqdm", "pytorch-metric-learning", "triton"):
    try:
        versions.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        versions.append(f"{name} -")
print("packages: " + ", ".join(versions))
gpu = os.environ.get("GPU") or "no nvidia-smi"
with open(os.path.join(os.environ["STATE"], "facts.note"), "w") as f:
    f.write(f"{gpu}; torch {torch.__version__}, CUDA {torch.version.cuda}")
PY
}

step_deps() {
  local rc=0
  shopt -s nullglob
  local wheels=("$WHEELS"/*.whl)
  shopt -u nullglob
  if [[ ${#wheels[@]} -gt 0 ]]; then
    echo "installing ${#wheels[@]} wheel(s) from $WHEELS into $SITE"
    x "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "${wheels[@]}" || rc=$?
  else
    echo "no wheels in $WHEELS"
  fi
  # test modules whose module-level imports are missing here: left out of the runs, listed
  "$PY" - "$TESTS" >"$STATE/ignored.tsv" <<'PY' || rc=$?
import ast
import importlib.util
import sys
from pathlib import Path

tests = Path(sys.argv[1])
local = {"conftest", "triplet_cuda", "benchmarks"} | {p.stem for p in tests.glob("*.py")}
for f in sorted(tests.glob("conftest.py")) + sorted(tests.glob("test_*.py")):
    missing = set()
    for node in ast.parse(f.read_text()).body:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for top in {n.split(".")[0] for n in names}:
            if top in local or top in sys.stdlib_module_names or top == "__future__":
                continue
            if importlib.util.find_spec(top) is None:
                missing.add(top)
    if missing:
        print(f"{f.name}\t{','.join(sorted(missing))}")
PY
  local bench_missing
  bench_missing="$("$PY" -c 'import importlib.util as u
print(",".join(m for m in ("matplotlib", "tqdm", "pytorch_metric_learning") if u.find_spec(m) is None))')" || rc=$?
  if grep -q '^conftest.py' "$STATE/ignored.tsv"; then  # the whole suite needs it: fail loudly
    echo "tests/conftest.py imports a missing package ($(grep '^conftest.py' "$STATE/ignored.tsv" | cut -f2)):" \
         "no test can run; carry its wheel in .whl (benchmarks/README.md)"
    rc=1
  fi
  local ignored
  ignored="$(awk -F'\t' '{printf "%s%s (no %s)", (NR > 1 ? ", " : ""), $1, $2}' "$STATE/ignored.tsv")"
  echo "test modules left out: ${ignored:-none}"
  echo "benchmark extras missing: ${bench_missing:-none}"
  note "wheels: ${#wheels[@]}; tests left out: ${ignored:-none}; bench extras missing: ${bench_missing:-none}"
  return $rc
}

step_build_aot() {
  if [[ "$CLEAN" == 1 ]]; then x rm -rf build; fi
  x rm -f triplet_cuda/_C.*.so triplet_cuda/_C.so  # a failed build must not leave an old one
  local how
  # setup.py honours pyproject.toml, whose SPDX license string needs setuptools >= 77; an
  # older setuptools gets the same extension built by _build.py's settings directly.
  if "$PY" -c 'import sys, setuptools; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)' 2>/dev/null; then
    how="setup.py build_ext --inplace"
    x env TRIPLET_CUDA_BUILD_EXT=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$NPROC" \
      "$PY" setup.py build_ext --inplace || return $?
  else
    how="setuptools < 77: CUDAExtension from triplet_cuda/_build.py, outside setup.py"
    echo "$how"
    x env TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$NPROC" "$PY" - "$ROOT" <<'PY' || return $?
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension

root = Path(sys.argv[1])
spec = importlib.util.spec_from_file_location("_tc_build", root / "triplet_cuda" / "_build.py")
cfg = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cfg)
os.chdir(tempfile.mkdtemp())  # away from pyproject.toml
setup(name="triplet_cuda_aot", cmdclass={"build_ext": BuildExtension}, script_args=[
          "build_ext", "--build-lib", str(root), "--build-temp", str(root / "build" / "temp-direct")],
      ext_modules=[CUDAExtension(name=cfg.EXTENSION_NAME, sources=cfg.sources(root / "csrc", True),
                                 extra_compile_args=cfg.extra_compile_args(True),
                                 extra_link_args=cfg.extra_link_args())])
PY
  fi
  # the build is what the tests will load: the ahead-of-time _C, with CUDA kernels for every op
  x "$PY" - <<'PY' || return $?
import torch

import triplet_cuda as tc

where = tc.loaded_from()
print("loaded from", where)
assert where.startswith("aot:"), f"expected the ahead-of-time build, got {where}"
ops = ["pairwise_distance", "pairwise_distance_backward", "batch_hard_mine", "batch_hard_mine_backward",
       "batch_all_loss", "batch_all_loss_backward", "semi_hard_loss", "semi_hard_loss_backward",
       "contrastive_loss", "contrastive_loss_backward", "mine_triplets"]
missing = [o for o in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"triplet_cuda::{o}", "CUDA")]
assert not missing, f"no CUDA kernel registered for {missing}"
print(f"CUDA kernels registered for all {len(ops)} ops")
PY
  local so elf=""
  so="$(ls triplet_cuda/_C*.so 2>/dev/null | head -n 1)"
  if [[ -n "$so" ]] && command -v cuobjdump >/dev/null 2>&1; then
    elf="$(cuobjdump --list-elf "$so" 2>/dev/null | grep -o 'sm_[0-9a-z]*' | sort -u | tr '\n' ' ')"
    echo "cubins in $so: ${elf:-none}"
  fi
  note "$how; MAX_JOBS=$NPROC; arch $ARCH${elf:+; cubins: $elf}"
}

pytest_args() {  # common pytest arguments: junit file, per-test timeout where pytest-timeout is
  local junit="$1" per_test="$2"
  printf '%s\n' -p no:cacheprovider -rfE "--junitxml=$junit" -o junit_family=xunit2
  if "$PY" -c 'import pytest_timeout' 2>/dev/null; then printf '%s\n' "--timeout=$per_test"; fi
}

step_tests() {
  local args ignores=() f
  mapfile -t args < <(pytest_args "$OUTDIR/tests-junit.xml" 240)
  while IFS=$'\t' read -r f _; do
    [[ -n "$f" && "$f" != conftest.py ]] && ignores+=("--ignore=$TESTS/$f")
  done <"$STATE/ignored.tsv"
  if [[ "$WORKERS" -gt 1 ]] && "$PY" -c 'import xdist' 2>/dev/null; then args+=(-n "$WORKERS"); fi
  local rc=0
  x env TRIPLET_CUDA_EXPECT_LOADER=aot OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1 \
    "$PY" -m pytest "${args[@]}" --durations=30 "$TESTS" ${ignores[@]+"${ignores[@]}"} $TESTS_PYTEST || rc=$?
  note "$(junit_note "$OUTDIR/tests-junit.xml")${ignores[*]:+; left out: ${ignores[*]##*/}}"
  return $rc
}

step_sanitize() {  # $1: memcheck | racecheck | synccheck | initcheck
  local tool="$1" san args rc=0
  san="$(find_sanitizer)" || { [[ "${GPU_CHECK_DRY:-0}" == 1 ]] && san=compute-sanitizer; }
  mapfile -t args < <(pytest_args "$OUTDIR/sanitize-$tool-junit.xml" 200)
  # every allocation its own cudaMalloc, so memcheck sees the bounds of each tensor
  x env PYTORCH_NO_CUDA_MEMORY_CACHING=1 TRIPLET_CUDA_EXPECT_LOADER=aot PYTHONUNBUFFERED=1 \
    "$san" --tool "$tool" --error-exitcode 86 --print-limit 200 ${SANITIZER_ARGS} \
    "$PY" -m pytest "${args[@]}" -q --durations=5 -m sanitize tests/test_cuda_sanitize.py $SANITIZE_PYTEST || rc=$?
  local log="$OUTDIR/sanitize-$tool.log" summary kernels
  summary="$(grep -Eo '(ERROR|RACECHECK) SUMMARY: .*' "$log" 2>/dev/null | tail -n 2 | tr '\n' ' ')"
  # the most frequent report locations ("=========     at <where>", racecheck's "... access at <where>")
  kernels="$(sed -nE 's/^=+ +(at |.* access at )(.*)/\2/p' "$log" 2>/dev/null | cut -c1-90 | sort | uniq -c \
             | sort -rn | head -n 3 | awk '{c = $1; $1 = ""; printf "%s%s (x%s)", (NR > 1 ? ", " : ""), substr($0, 2), c}')"
  local what=""
  [[ $rc -eq 86 ]] && what="the sanitizer reported errors; "
  [[ $rc -ne 0 && $rc -ne 86 ]] && what="pytest exit $rc; "
  if [[ $rc -eq 0 && -z "$summary" && "${GPU_CHECK_DRY:-0}" != 1 ]]; then
    what="no ERROR SUMMARY line: the sanitizer did not report; " rc=1
  fi
  note "$what${summary:-no sanitizer summary}; $(junit_note "$OUTDIR/sanitize-$tool-junit.xml")${kernels:+; most reported at: $kernels}"
  return $rc
}

step_build_jit() {
  if [[ "$CLEAN" == 1 ]]; then x rm -rf "$JIT_DIR"; fi
  x mkdir -p "$JIT_DIR"
  x env TRIPLET_CUDA_FORCE_JIT=1 TRIPLET_CUDA_VERBOSE=1 TORCH_EXTENSIONS_DIR="$JIT_DIR" \
    TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$JIT_JOBS" "$PY" -c '
import torch
import triplet_cuda as tc
where = tc.loaded_from()
print("loaded from", where)
assert where.startswith("jit:"), where
assert torch._C._dispatch_has_kernel_for_dispatch_key("triplet_cuda::batch_hard_mine", "CUDA"), "no CUDA kernels"
' || return $?
  note "TORCH_EXTENSIONS_DIR=$JIT_DIR; MAX_JOBS=$JIT_JOBS (alongside the tests)"
}

step_tests_jit() {
  local args rc=0
  mapfile -t args < <(pytest_args "$OUTDIR/tests-jit-junit.xml" 120)
  x env TRIPLET_CUDA_FORCE_JIT=1 TORCH_EXTENSIONS_DIR="$JIT_DIR" TRIPLET_CUDA_EXPECT_LOADER=jit \
    PYTHONUNBUFFERED=1 "$PY" -m pytest "${args[@]}" -q tests/test_cuda_sanitize.py tests/test_loader.py || rc=$?
  note "the sanitize subset and test_loader.py on the JIT build: $(junit_note "$OUTDIR/tests-jit-junit.xml")"
  return $rc
}

step_bench() {
  local rc=0
  # shellcheck disable=SC2086
  x env PYTHONUNBUFFERED=1 "$PY" -m benchmarks --preset gpu --out "$OUTDIR/bench" --no-progress $BENCH_ARGS || rc=$?
  local json="$OUTDIR/bench/gpu.json"
  if [[ -f "$json" ]]; then
    # the device's copy has no .git: record the caller's commit, then re-render the Markdown
    "$PY" - "$json" "$COMMIT" <<'PY' && "$PY" -m benchmarks --render "$json" >/dev/null
import json
import sys
from pathlib import Path

from benchmarks import report

path, commit = Path(sys.argv[1]), sys.argv[2]
doc = json.loads(path.read_text())
if not doc["meta"].get("commit") and commit != "unknown":
    doc["meta"]["commit"] = commit
    report.write_json(doc, path)
PY
    note "$(ls "$OUTDIR/bench" | tr '\n' ' ')"
  else
    note "no results written"
  fi
  return $rc
}

if [[ "${1:-}" == "--run-step" ]]; then
  STEP="$2"
  shift 2
  case "$STEP" in
    facts) step_facts ;;
    deps) step_deps ;;
    build-aot) step_build_aot ;;
    tests) step_tests ;;
    sanitize-*) step_sanitize "${STEP#sanitize-}" ;;
    build-jit) step_build_jit ;;
    tests-jit) step_tests_jit ;;
    bench) step_bench ;;
    *) echo "unknown step $STEP" >&2; exit 2 ;;
  esac
  exit $?
fi

# ----------------------------------------------------------------------------- arguments
OUTDIR="" ARCHIVE=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --archive) ARCHIVE="${2:?--archive needs a file}"; shift 2 ;;
    --archive=*) ARCHIVE="${1#*=}"; shift ;;
    --fingerprint) fingerprint; exit 0 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$SELF" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) [[ -z "$OUTDIR" ]] || { echo "gpu_check: one OUTDIR only" >&2; exit 2; }; OUTDIR="$1"; shift ;;
  esac
done

export GPU_CHECK_COMMAND="bash benchmarks/gpu_check.sh${OUTDIR:+ $OUTDIR}${ARCHIVE:+ --archive $ARCHIVE}"
export PY="${GPU_CHECK_PYTHON:-python3}"
export ARCH="${GPU_CHECK_ARCH:-9.0}"
export CLEAN="${GPU_CHECK_CLEAN:-0}"
export JIT_DIR="${GPU_CHECK_JIT_DIR:-/tmp/gpu_check_jit}"
export WHEELS="${GPU_CHECK_WHEELS:-$ROOT/.whl}"
export TESTS="${GPU_CHECK_TESTS:-tests}"  # the suite's folder (another one only in tests/test_gpu_check.py)
export WORKERS="${GPU_CHECK_TEST_WORKERS:-4}"
export SANITIZER_ARGS="${GPU_CHECK_SANITIZER_ARGS:-}"
export TESTS_PYTEST="${GPU_CHECK_TESTS_PYTEST:-}" SANITIZE_PYTEST="${GPU_CHECK_SANITIZE_PYTEST:-}"
export BENCH_ARGS="${GPU_CHECK_BENCH_ARGS:---target-s 0.5}"
export NPROC="$(nproc 2>/dev/null || echo 2)"
export JIT_JOBS=$(( NPROC / 2 > 2 ? NPROC / 2 : 2 ))
BUDGET="${GPU_CHECK_BUDGET_S:-540}"
T_FACTS="${GPU_CHECK_T_FACTS:-60}" T_DEPS="${GPU_CHECK_T_DEPS:-90}" T_BUILD="${GPU_CHECK_T_BUILD:-240}"
T_TESTS="${GPU_CHECK_T_TESTS:-300}" T_SANITIZE="${GPU_CHECK_T_SANITIZE:-300}"
T_JIT_BUILD="${GPU_CHECK_T_JIT_BUILD:-240}" T_JIT_TESTS="${GPU_CHECK_T_JIT_TESTS:-120}" T_BENCH="${GPU_CHECK_T_BENCH:-150}"
RESERVE_B=150  # seconds kept for phase B while building, and
RESERVE_C=75   # for the benchmark while phase B runs
DRY="${GPU_CHECK_DRY:-0}"
export GPU_CHECK_DRY="$DRY"

export STATE
STATE="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")" || exit 2
trap 'rm -rf "$STATE"' EXIT
: >"$STATE/ignored.tsv"
export SITE="$STATE/site"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

export COMMIT="${GPU_CHECK_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
export DIRTY=""
if git rev-parse HEAD >/dev/null 2>&1 && [[ -n "$(git status --porcelain -- csrc triplet_cuda tests benchmarks setup.py pyproject.toml 2>/dev/null | grep -v '^?? benchmarks/results/')" ]]; then
  DIRTY="uncommitted changes in the sources"
fi
export FINGERPRINT
FINGERPRINT="$(fingerprint)"

# The device: one quick probe (the facts step records the rest).
HAS_GPU=0 SLUG=""
if [[ "$DRY" == 1 ]]; then
  HAS_GPU=1 SLUG="dry-run"
elif [[ "${GPU_CHECK_NO_GPU:-0}" != 1 ]]; then
  probe="$(timeout 120 "$PY" -c '
import torch
try:
    from benchmarks.report import device_slug
except Exception:
    device_slug = None
ok = torch.cuda.is_available()
print(int(ok))
print(device_slug("cuda" if ok else "cpu") if device_slug else ("cuda-" if ok else "cpu-") + "device")
' 2>/dev/null)" || probe=""
  HAS_GPU="$(sed -n 1p <<<"$probe")"
  SLUG="$(sed -n 2p <<<"$probe")"
fi
[[ "$HAS_GPU" == 1 ]] || HAS_GPU=0
if [[ -z "$SLUG" && -z "$OUTDIR" ]]; then
  SLUG="$("$PY" -c 'from benchmarks.report import device_slug; print(device_slug("cpu"))' 2>/dev/null || echo unknown-device)"
fi
ARCHIVE_BASE=""  # the archive holds OUTDIR relative to this folder
if [[ -z "$OUTDIR" && "$DRY" == 1 ]]; then
  OUTDIR="${TMPDIR:-/tmp}/gpu_check-dry/check-${COMMIT:0:10}"  # a dry run leaves results/ alone
elif [[ -z "$OUTDIR" ]]; then
  OUTDIR="$ROOT/benchmarks/results/$SLUG/check-${COMMIT:0:10}"
  ARCHIVE_BASE="$ROOT/benchmarks/results"  # <device>/check-<commit>/...: extract into benchmarks/results
fi
mkdir -p "$OUTDIR" || exit 2
OUTDIR="$(cd "$OUTDIR" && pwd)"
ARCHIVE_BASE="${ARCHIVE_BASE:-$(dirname "$OUTDIR")}"
export OUTDIR
CONSOLE="$OUTDIR/console.log"
: >"$CONSOLE"

say() { echo "$*" | tee -a "$CONSOLE"; }

archive() {
  [[ -n "$ARCHIVE" ]] || return 0
  mkdir -p "$(dirname "$ARCHIVE")"
  tar -czf "$ARCHIVE.part" -C "$ARCHIVE_BASE" "${OUTDIR#"$ARCHIVE_BASE"/}" 2>/dev/null \
    && mv -f "$ARCHIVE.part" "$ARCHIVE"
}

record() {  # name status seconds note
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >"$STATE/$1.status"
}

skip() {  # name reason
  record "$1" SKIP 0 "$2"
  say "[gpu_check] skip  $1: $2"
}

skipped_by_user() { [[ ",${GPU_CHECK_SKIP:-}," == *",$1,"* ]]; }

# Seconds a step may run: its cap, within the budget less what is kept for later phases.
limit_for() {  # cap reserve
  local left=$(( BUDGET - SECONDS - $2 ))
  (( left < $1 )) && echo "$left" || echo "$1"
}

run_step() {  # name cap reserve
  local name="$1" limit rc status t0=$SECONDS
  if skipped_by_user "$name"; then skip "$name" "GPU_CHECK_SKIP"; return 0; fi
  limit="$(limit_for "$2" "$3")"
  if (( limit < 10 && limit < $2 )); then  # counts as a failure: the step did not run
    record "$name" TIMEOUT 0 "not started: no time left in the ${BUDGET}s budget"
    say "[gpu_check] $name: not started, no time left in the ${BUDGET}s budget"
    return 1
  fi
  say "[gpu_check] $(date -u +%H:%M:%S) start $name (timeout ${limit}s)"
  timeout --kill-after=15 "$limit" bash "$SELF" --run-step "$name" </dev/null >"$OUTDIR/$name.log" 2>&1
  rc=$?
  local secs=$(( SECONDS - t0 )) text=""
  [[ -f "$STATE/$name.note" ]] && text="$(cat "$STATE/$name.note")"
  if [[ $rc -eq 0 ]]; then
    status=PASS
  elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
    status=TIMEOUT
    text="timed out after ${limit}s${text:+; $text}"
  else
    status=FAIL
    text="exit $rc${text:+; $text}"
  fi
  [[ "$DRY" == 1 ]] && text="dry run${text:+; $text}"
  record "$name" "$status" "$secs" "$text"
  say "[gpu_check] $(date -u +%H:%M:%S) end   $name: $status (${secs}s)${text:+ - $text}"
  if [[ $status != PASS ]]; then
    if [[ $name == build-* ]]; then  # a compiler's first errors sit above the build tool's traceback
      say "[gpu_check] first error lines of $name.log:"
      grep -n -m 25 -E 'error|FAILED|Error' "$OUTDIR/$name.log" | cut -c1-300 | sed 's/^/    | /' | tee -a "$CONSOLE"
    fi
    say "[gpu_check] last lines of $name.log:"
    tail -n 40 "$OUTDIR/$name.log" | cut -c1-300 | sed 's/^/    | /' | tee -a "$CONSOLE"
  fi
  [[ $status == PASS ]]
}

summary() {
  local name line status secs text total=$SECONDS n_pass=0 n_fail=0 n_skip=0
  {
    echo "## gpu_check summary"
    echo
    echo "- commit ${COMMIT:0:10}${DIRTY:+ ($DIRTY)}; source fingerprint $FINGERPRINT; $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "- device: ${DEVICE_LINE:-none}"
    echo "- command: \`$GPU_CHECK_COMMAND\`; output: $OUTDIR"
    echo
    echo "| step | status | s | note |"
    echo "|---|---|---:|---|"
    for name in "${ALL_STEPS[@]}"; do
      line="$(cat "$STATE/$name.status" 2>/dev/null || printf '%s\tSKIP\t0\tnot reached' "$name")"
      IFS=$'\t' read -r _ status secs text <<<"$line"
      case "$status" in PASS) n_pass=$((n_pass + 1)) ;; SKIP) n_skip=$((n_skip + 1)) ;; *) n_fail=$((n_fail + 1)) ;; esac
      echo "| $name | $status | $secs | ${text//|/\\|} |"
    done
    echo
    echo "total ${total}s: $n_pass passed, $n_fail failed, $n_skip skipped$([[ $HAS_GPU == 1 ]] || echo "; NO CUDA DEVICE: nothing ran on a GPU")"
  } >"$OUTDIR/summary.md"
  echo
  tee -a "$CONSOLE" <"$OUTDIR/summary.md"
  [[ $n_fail -eq 0 ]]
}

# ----------------------------------------------------------------------------- the run
say "[gpu_check] $GPU_CHECK_COMMAND: output in $OUTDIR; budget ${BUDGET}s; commit ${COMMIT:0:10}$([[ $DRY == 1 ]] && echo '; DRY RUN')"

# phase A
if [[ "$DRY" == 1 ]]; then
  record facts PASS 0 "dry run: facts not collected"
else
  run_step facts "$T_FACTS" $((RESERVE_B + RESERVE_C))
fi
DEVICE_LINE="$(grep -m1 '^cuda:0' "$OUTDIR/facts.log" 2>/dev/null)"
[[ -n "$DEVICE_LINE" || "$HAS_GPU" == 1 ]] || DEVICE_LINE="no CUDA device"
[[ "$DRY" == 1 ]] && DEVICE_LINE="dry run (pretends a GPU)"
run_step deps "$T_DEPS" $((RESERVE_B + RESERVE_C))
export PATH="$SITE/bin:$PATH"

build_ok=0
if [[ "$HAS_GPU" != 1 ]]; then
  skip build-aot "no CUDA device (torch.cuda.is_available() is False)"
elif skipped_by_user build-aot; then
  skip build-aot "GPU_CHECK_SKIP: the tests use the ahead-of-time build already there"
  build_ok=1
elif run_step build-aot "$T_BUILD" $((RESERVE_B + RESERVE_C)); then
  build_ok=1
fi
archive

# phase B: in parallel on the ahead-of-time build
skip_rest() {  # reason: every step from phase B on
  local s
  for s in "${PHASE_B_STEPS[@]}" bench; do skip "$s" "$1"; done
}
if [[ "$HAS_GPU" != 1 ]]; then
  skip_rest "no CUDA device"
elif [[ $build_ok != 1 ]]; then
  case "$(cut -f2 "$STATE/build-aot.status")" in
    FAIL) skip_rest "the ahead-of-time build failed" ;;
    *) skip_rest "the ahead-of-time build did not finish" ;;
  esac
else
  pids=()
  run_step tests "$T_TESTS" "$RESERVE_C" & pids+=($!)
  if [[ "$DRY" == 1 ]] || find_sanitizer >/dev/null; then
    for tool in "${SANITIZER_TOOLS[@]}"; do
      run_step "sanitize-$tool" "$T_SANITIZE" "$RESERVE_C" & pids+=($!)
    done
  else
    for tool in "${SANITIZER_TOOLS[@]}"; do skip "sanitize-$tool" "compute-sanitizer not found"; done
  fi
  (
    run_step build-jit "$T_JIT_BUILD" $((RESERVE_C + 30))
    case "$(cut -f2 "$STATE/build-jit.status")" in
      PASS) run_step tests-jit "$T_JIT_TESTS" "$RESERVE_C" ;;
      SKIP) if skipped_by_user build-jit; then run_step tests-jit "$T_JIT_TESTS" "$RESERVE_C"  # an earlier JIT build
            else skip tests-jit "build-jit was skipped"; fi ;;
      *) skip tests-jit "the JIT build failed" ;;
    esac
  ) & pids+=($!)
  wait "${pids[@]}"
  archive
  # phase C: alone on the GPU
  run_step bench "$T_BENCH" 5
fi

summary
rc=$?
archive
exit $((rc == 0 ? 0 : 1))
