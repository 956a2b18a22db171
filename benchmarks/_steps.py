"""Time each kernel step of a generated symbp module on its own.

A generated module ends with ``PROVENANCE``: for each step of each kernel, its function, its
first and last source lines, the arrays it writes and the sum it implements.  This compiles
every step alone -- the function's own first lines (``nb = X.shape[0]``, BLAS scalars, the
optimizer's hyper-parameters) then the step's lines, with the same Numba flags as the
kernels -- and times it on the caller's arrays.  A step that updates parameters runs as many
times as it is timed, so pass copies; the times of steps that read what an earlier step
writes are those of whatever those arrays hold.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path


def step_functions(module, name: str) -> list[tuple]:
    """(first line, last line, arrays written, formula, compiled step) of ``module.name``."""
    from numba import njit

    src = Path(module.__file__).read_text().split("\n")
    func = getattr(module, name).py_func
    line = func.__code__.co_firstlineno
    while not src[line - 1].startswith("def "):  # past the decorator
        line += 1
    end = line
    while end < len(src) and (src[end].startswith(" ") or not src[end].strip()):
        end += 1
    rows = [r for r in module.PROVENANCE if r[0] == name]
    if not rows:
        return []
    first_step = min(r[1] for r in rows)
    # the function's own first lines, outside any step: sizes, scalars, hyper-parameters
    prelude = [src[i - 1] for i in range(line + 1, first_step)
               if src[i - 1].startswith("    ") and not src[i - 1].startswith("     ") and '"""' not in src[i - 1]]
    params = ", ".join(inspect.signature(func).parameters)
    out = []
    for k, (_, a, b, writes, formula) in enumerate(rows):
        code = f"def _step_{k}({params}):\n" + "\n".join(prelude + src[a - 1:b]) + "\n    return 0\n"
        space = dict(vars(module))
        exec(code, space)  # noqa: S102 - the generated module's own lines
        fn = njit(fastmath=module.FASTMATH, error_model="numpy")(space[f"_step_{k}"])
        out.append((a, b, writes, formula, fn))
    return out


def profile(module, name: str, args: list, reps: int = 10, rounds: int = 3) -> list[tuple]:
    """(best ms, first line, last line, arrays written, formula) per step of ``module.name``."""
    res = []
    for a, b, writes, formula, fn in step_functions(module, name):
        fn(*args)  # compile
        best = float("inf")
        for _ in range(rounds):
            t = time.perf_counter()
            for _ in range(reps):
                fn(*args)
            best = min(best, (time.perf_counter() - t) / reps)
        res.append((best * 1e3, a, b, writes, formula))
    return res


def print_profile(title: str, res: list[tuple], whole_ms: float | None = None) -> None:
    total = sum(r[0] for r in res)
    print(f"{title}: {len(res)} steps, their times add up to {total:.3f} ms"
          + (f" (the whole function: {whole_ms:.3f} ms)" if whole_ms is not None else ""))
    for ms, a, b, writes, formula in sorted(res, key=lambda r: -r[0]):
        what = f"{', '.join(writes)}" + (f" ← {formula}" if formula else "")
        print(f"  {ms:8.3f} ms  {100 * ms / total:5.1f}%  lines {a}-{b}  {what[:90]}")
