"""Every ```python block of README.md and docs/*.md runs, each in a fresh namespace.

A block whose first line is `# docs-test: skip (<reason>)` is not run (for snippets that need
CUDA, say); there must be few of them and each must give its reason."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
SKIP = re.compile(r"#\s*docs-test:\s*skip\s*\((?P<reason>[^)]+)\)")
MAX_SKIPPED = 3


def _blocks():
    for page in PAGES:
        text = page.read_text()
        for m in BLOCK.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            yield pytest.param(page, line, m.group(1), id=f"{page.relative_to(ROOT)}:{line}")


BLOCKS = list(_blocks())


def test_there_are_snippets_and_few_are_skipped():
    assert len(BLOCKS) >= 5, "README.md and docs/ should hold runnable examples"
    skipped = [b for b in BLOCKS if SKIP.match(b.values[2].lstrip())]
    assert len(skipped) <= MAX_SKIPPED, f"{len(skipped)} snippets opt out of running: {[b.id for b in skipped]}"


@pytest.mark.parametrize("page,line,code", BLOCKS)
def test_snippet_runs(page, line, code, tmp_path, monkeypatch):
    first = code.lstrip().splitlines()[0] if code.strip() else ""
    if "docs-test" in first:
        m = SKIP.match(first)
        assert m, f"{page.name}:{line}: malformed opt-out marker {first!r} (want '# docs-test: skip (<reason>)')"
        pytest.skip(f"{page.name}:{line}: {m.group('reason')}")
    monkeypatch.chdir(tmp_path)  # whatever a snippet writes stays out of the checkout
    exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec"), {"__name__": "__docs__"})
