"""Every Python snippet in README.md runs as written: each ```python block is executed on its
own (a fresh namespace, nothing defined for it) in a temporary folder, with the session's
temporary generated-module cache.  A block that quotes generated code rather than showing
what to type is marked in the README by the line ``<!-- generated code: quoted, not run -->``
just above it; there are only a few, and each must really read as code symbp generated.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
QUOTED = "<!-- generated code: quoted, not run -->"
# The extras a snippet may need (pyproject.toml): missing ones skip that snippet, saying so.
OPTIONAL = {"sklearn": "datasets", "matplotlib": "plots", "torch": "test", "onnx": "onnx", "onnxruntime": "onnx",
            "mpi4py": "mpi"}


def snippets() -> list[tuple[int, str, bool]]:
    """(line of the fence, code, quoted) for each ```python block of the README."""
    lines = README.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start, body = i + 1, []
            i += 1
            while lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            quoted = start >= 2 and lines[start - 2].strip() == QUOTED
            out.append((start, "\n".join(body) + "\n", quoted))
        i += 1
    return out


SNIPPETS = snippets()
RUN = [(line, code) for line, code, quoted in SNIPPETS if not quoted]


def test_the_readme_has_snippets_and_quotes_few():
    assert len(RUN) >= 6
    quoted = [code for _, code, q in SNIPPETS if q]
    assert len(quoted) <= 3
    for code in quoted:  # a quotation of the kernels, not an example someone would type
        assert re.search(r"\bgemm\(|np\.float32\(|range\(d\d\)", code), code[:200]


@pytest.mark.parametrize("line, code", RUN, ids=[f"line{line}" for line, _ in RUN])
def test_snippet_runs_as_written(line, code, tmp_path, monkeypatch):
    for node in ast.walk(ast.parse(code)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        for name in names:
            top = name.split(".")[0]
            if top in OPTIONAL:
                pytest.importorskip(top, reason=f"README line {line} needs {top} (the {OPTIONAL[top]} extra)")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace = {"__name__": "__readme__"}
    try:
        exec(compile(code, f"README.md:{line}", "exec"), namespace)  # noqa: S102 - the README's own code
    except ModuleNotFoundError as err:  # an optional package symbp itself imports for the snippet
        if (err.name or "").split(".")[0] not in OPTIONAL:
            raise
        pytest.skip(f"README line {line} needs {err.name} (the {OPTIONAL[err.name.split('.')[0]]} extra)")
    finally:
        import sys

        if "matplotlib.pyplot" in sys.modules:
            sys.modules["matplotlib.pyplot"].close("all")
