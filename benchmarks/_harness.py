"""Generic benchmark plumbing: worker subprocesses, timing loops, plain tables.

Nothing here knows about neural nets; ``bench_mlp.py`` holds the workload.
Only the standard library is imported at module level, because the parent
process must not load NumPy/BLAS/torch/JAX (their thread pools would then
be alive in the parent, and a worker must start from a clean slate).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence

# A worker prints exactly one line starting with this marker. Libraries may
# write their own chatter to stdout (numba, XLA), so the parent looks only
# for the marker instead of parsing the whole output.
RESULT_MARKER = "@@BENCH-RESULT@@ "

# Env prefixes that change how the numerical libraries behave. They are
# echoed in the report so a reader can reproduce the numbers.
RELEVANT_ENV_PREFIXES = (
    "OPENBLAS_", "OMP_", "MKL_", "GOTO", "BLIS_", "NUMBA_", "XLA_", "JAX_",
    "TF_CPP_", "TORCH_", "KMP_", "SYMBP_", "PYTHONHASHSEED",
)


# --------------------------------------------------------------------------
# worker side
# --------------------------------------------------------------------------

def emit(result: dict) -> None:
    """Send the worker's result to the parent (one JSON line on stdout)."""
    print(RESULT_MARKER + json.dumps(result), flush=True)


def one_line_error(exc: BaseException, limit: int = 160) -> str:
    """``Type: message`` squeezed onto a single short line for the table."""
    msg = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def time_once(fn: Callable[[], object]) -> float:
    """Wall time of one call, with the cyclic GC held off (as timeit does):
    a collection landing inside one rep and not another is noise, not cost."""
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    finally:
        gc.enable()


def time_reps(fn: Callable[[], object], reps: int) -> list[float]:
    return [time_once(fn) for _ in range(reps)]


def _proc_stat() -> tuple[float, float] | None:
    """Machine-wide (busy, steal) CPU seconds since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


class Contention:
    """Share of the machine's CPU capacity that something *else* used while
    the block ran: busy time of all CPUs minus this process's own CPU time,
    plus time the hypervisor stole. Processes in other containers on the same
    VM are invisible to ``ps`` but not to /proc/stat, so this is how a
    benchmark learns that its numbers were taken on a busy machine.

        with Contention() as c:
            ...
        c.fraction   # 0.0 on an idle machine; 0.5 = one of two cores taken
    """

    def __enter__(self):
        self._stat = _proc_stat()
        self._own = time.process_time()   # all threads of this process
        self._wall = time.perf_counter()
        self.fraction = None
        return self

    def __exit__(self, *exc):
        end = _proc_stat()
        if self._stat is None or end is None:
            return False
        wall = time.perf_counter() - self._wall
        own = time.process_time() - self._own
        other = max(0.0, (end[0] - self._stat[0]) - own) + (end[1] - self._stat[1])
        # Jiffy granularity (10 ms) makes short blocks imprecise; clamp at 0..1.
        self.fraction = min(1.0, other / max(wall * (os.cpu_count() or 1), 1e-9))
        return False


def wait_for_idle(max_wait: float, threshold: float = 0.10, window: float = 0.5) -> float | None:
    """Block until the machine looks idle (other load below ``threshold`` over
    one ``window``) or ``max_wait`` seconds pass. Called by the parent between
    workers, when it runs nothing itself. Returns the seconds waited, or None
    if the machine never went quiet."""
    t0 = time.perf_counter()
    while True:
        with Contention() as c:
            time.sleep(window)
        if c.fraction is None or c.fraction < threshold:
            return time.perf_counter() - t0
        if time.perf_counter() - t0 >= max_wait:
            return None


def blas_info() -> list[str]:
    """The BLAS/OpenMP pools loaded in *this* process, via threadpoolctl when
    available (it reports e.g. OpenBLAS' selected kernel architecture)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    out = []
    for pool in threadpool_info():
        name = pool.get("internal_api", "?")
        arch = pool.get("architecture")
        lib = os.path.basename(pool.get("filepath", ""))
        desc = f"{name} {pool.get('version') or ''}".strip()
        if arch:
            desc += f" arch={arch}"
        desc += f" threads={pool.get('num_threads')} ({lib})"
        out.append(desc)
    return out


# --------------------------------------------------------------------------
# parent side
# --------------------------------------------------------------------------

def make_env(overrides: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(overrides)
    return env


def relevant_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in sorted(env.items()) if k.startswith(RELEVANT_ENV_PREFIXES)}


def run_worker(argv: Sequence[str], env: dict[str, str], timeout: float) -> dict:
    """Run ``python <argv>`` and return its result dict.

    Never raises: a crash, a timeout or missing output becomes
    ``{"error": "..."}`` so one broken implementation cannot take the whole
    report down with it.
    """
    cmd = [sys.executable, *argv]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            result = json.loads(line[len(RESULT_MARKER):])
            result["process_wall_s"] = wall
            return result
    # No result line: the interpreter died (segfault, OOM kill, import-time
    # crash before our try block). Show the last thing it said.
    lines = [l for l in (proc.stderr + "\n" + proc.stdout).splitlines() if l.strip()]
    tail = " ".join(lines[-1].split()) if lines else "no output"
    code = proc.returncode
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    return {"error": f"worker {how}: {tail[:160]}"}


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]],
                 right: Sequence[bool] | None = None) -> str:
    """Plain-text table. A row with fewer cells than headers has its last
    cell span the rest of the line (used for error messages)."""
    right = right or [False] * len(headers)
    widths = [len(h) for h in headers]
    for row in rows:
        if len(row) == len(headers):
            for i, cell in enumerate(row):
                widths[i] = max(widths[i], len(cell))

    def fmt(row: Sequence[str]) -> str:
        if len(row) < len(headers):
            head = [c.ljust(widths[i]) for i, c in enumerate(row[:-1])]
            return "  ".join(head + [row[-1]]).rstrip()
        cells = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)]
        return "  ".join(cells).rstrip()

    lines = [fmt(headers), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)


def system_info() -> dict[str, str]:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "logical_cpus": str(os.cpu_count()),
    }
