"""The CUDA op registration (csrc/cuda/register.cpp) checked without a GPU: it is compiled with
the op schemas (csrc/ops.cpp) and stub definitions of every entry point that csrc/cuda/ops_cuda.h
declares, and loaded in a fresh process. torch checks each m.impl's C++ signature against the op
schema when the library loads, so a signature that does not match its schema fails the load here
(on a GPU machine it would fail `import triplet_cuda`); every op must then have a CUDA kernel.
Needs a C++ compiler; builds a small extension (~20-40 s on 2 cores)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"


def entry_point_declarations(header: str) -> list[tuple[str, str, str]]:
    """(return type, name, parameters) of every *_cuda function ops_cuda.h declares, with its
    TC_DECLARE_CUDA_LOSS macro expanded."""
    text = re.sub(r"//[^\n]*", "", header)
    m = re.search(r"#define TC_DECLARE_CUDA_LOSS\(NAME\)(.*?)\n(?=TC_DECLARE_CUDA_LOSS\()", text, re.S)
    assert m, "TC_DECLARE_CUDA_LOSS not found in ops_cuda.h"
    body = m.group(1).replace("\\\n", "\n")
    expanded = [body.replace("NAME##", name) for name in re.findall(r"^TC_DECLARE_CUDA_LOSS\((\w+)\)", text, re.M)]
    text = text[: m.start()] + "\n".join(expanded) + text[m.end():]
    text = re.sub(r"^(TC_DECLARE_CUDA_LOSS\(\w+\)|#undef \w+)\s*$", "", text, flags=re.M)
    decls = re.findall(r"((?:std::tuple<[^;{}()]*?>|at::Tensor))\s+(\w+_cuda)\s*\(([^;{}]*?)\);", text, re.S)
    return [(ret, name, " ".join(params.split())) for ret, name, params in decls]


def test_header_declares_an_entry_point_per_registration():
    decls = entry_point_declarations((CSRC / "cuda" / "ops_cuda.h").read_text())
    names = {name for _, name, _ in decls}
    registered = set(re.findall(r'm\.impl\("\w+", &(\w+)\)', (CSRC / "cuda" / "register.cpp").read_text()))
    schemas = set(re.findall(r'm\.def\(\s*"(\w+)\(', (CSRC / "ops.cpp").read_text()))
    assert len(decls) == len(names) == 24
    assert registered == names
    impl_ops = set(re.findall(r'm\.impl\("(\w+)"', (CSRC / "cuda" / "register.cpp").read_text()))
    assert impl_ops == schemas, f"ops without a CUDA kernel: {schemas - impl_ops}"


def test_registration_matches_the_schemas(tmp_path):
    decls = entry_point_declarations((CSRC / "cuda" / "ops_cuda.h").read_text())
    stubs = "\n".join(
        f'{ret} {name}({params}) {{ TORCH_CHECK(false, "stub {name}"); }}' for ret, name, params in decls
    )
    (tmp_path / "stubs.cpp").write_text(
        '#include <c10/util/Exception.h>\n#include "ops_cuda.h"\n'
        "namespace triplet_cuda {\nnamespace cuda {\n" + stubs + "\n}  // namespace cuda\n}  // namespace triplet_cuda\n"
    )
    script = textwrap.dedent(f"""
        import re, torch
        from torch.utils.cpp_extension import load
        load(name="tc_cuda_registration_check", is_python_module=False, verbose=False,
             sources=[{str(CSRC / "ops.cpp")!r}, {str(CSRC / "cuda" / "register.cpp")!r},
                      {str(tmp_path / "stubs.cpp")!r}],
             extra_include_paths=[{str(CSRC / "cuda")!r}], extra_cflags=["-O0", "-std=c++20"],
             build_directory={str(tmp_path)!r})
        ops = re.findall(r'm\\.def\\(\\s*"(\\w+)\\(', open({str(CSRC / "ops.cpp")!r}).read())
        missing = [op for op in ops
                   if not torch._C._dispatch_has_kernel_for_dispatch_key("triplet_cuda::" + op, "CUDA")]
        assert not missing, missing
        print("registered", len(ops))
    """)
    env = dict(os.environ, PYTHONPATH="")  # a fresh process, without the triplet_cuda library
    p = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[:4000]  # the error leads, frames follow
    assert "registered 24" in p.stdout
