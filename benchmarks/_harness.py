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

# The environment this process started with, taken before anything it imports can
# change it (``import symbp`` sets OMP_WAIT_POLICY and OPENBLAS_CORETYPE in os.environ).
# Parents build every worker's environment from it; a worker compares its environment
# with it to report what a library set in-process.
START_ENV = dict(os.environ)
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


# Variables that tune a numerical library's threads or kernels. Workers get none of them
# from the shell that started the benchmark (unless asked to keep them): each library runs
# as its users get it, with its own defaults and whatever it sets for itself when imported.
TUNING_PREFIXES = (
    "OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_", "GOTO", "BLIS_", "NUMBA_", "XLA_FLAGS",
    "TORCHINDUCTOR_", "SYMBP_",
)


# --------------------------------------------------------------------------
# worker side
# --------------------------------------------------------------------------


# The training step every benchmark times: plain SGD at this rate, or Adam with
# torch.optim.Adam's defaults except lr (also optax.adam's b1, b2, eps).
LR = 0.01
ADAM_LR = 1e-3
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
OPTIMIZERS = ("sgd", "adam")

def emit(result: dict) -> None:
    """Send the worker's result to the parent (one JSON line on stdout)."""
    print(RESULT_MARKER + json.dumps(result), flush=True)


def one_line_error(exc: BaseException, limit: int = 160) -> str:
    """``Type: message`` squeezed onto a single short line for the table."""
    msg = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def gemm_rate() -> dict:
    """The best float32 2048³ GEMM rate NumPy gets here (its own threads, run in a NumPy
    worker): the rate of issue 16's GEMM floor, 3× a step's forward GEMM FLOPs at this rate."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
    out = np.empty_like(a)
    best = min(time_once(lambda: np.matmul(a, a, out=out)) for _ in range(6))
    return {"impl": "gemm", "gflops": 2 * 2048 ** 3 / best / 1e9}


def gemm_floor_ms(forward_flops: int, gflops: float | None) -> float | None:
    """Issue 16's GEMM floor of a step, ms: 3× the forward pass's GEMM FLOPs (forward, δ and
    weight gradient) at ``gflops`` (:func:`gemm_rate`, measured in the same run); None without it."""
    return 3 * forward_flops / (gflops * 1e9) * 1e3 if gflops else None


def gemm_floor_note(forward_flops: int, gflops: float, digits: int = 3) -> str:
    """The line under a table that says how its × floor column was counted."""
    return (f"GEMM floor {gemm_floor_ms(forward_flops, gflops):.{digits}f} ms/step: 3 × the forward pass's GEMM "
            f"FLOPs ({forward_flops / 1e6:.1f} M) at {gflops:.0f} GFLOP/s, NumPy's best float32 2048³ GEMM in this run")


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


def cxx_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend (inductor) would look for, if any."""
    import shutil

    for name in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def torch_compile_error(exc: BaseException) -> str:
    """A torch.compile failure, said so that the table's reader knows why there is no number."""
    text = one_line_error(exc, 260)
    cxx = cxx_compiler()
    if cxx is None:
        return ("torch.compile could not run: no C++ compiler (CXX, g++, clang++, c++ on PATH), which "
                f"inductor, its CPU backend, needs -- {text}")
    return f"torch.compile could not run (C++ compiler: {cxx}) -- {text}"


def set_in_process() -> dict[str, str]:
    """Relevant variables this process changed or added since it started: what a library
    set for itself at import (symbp sets OMP_WAIT_POLICY, OPENBLAS_CORETYPE)."""
    return {k: v for k, v in relevant_env(dict(os.environ)).items() if START_ENV.get(k) != v}


def thread_info() -> list[str]:
    """Thread counts of the libraries loaded in *this* process (looked up in sys.modules,
    never imported here), then the BLAS/OpenMP pools threadpoolctl sees."""
    out = []
    torch = sys.modules.get("torch")
    if torch is not None:
        out.append(f"torch threads={torch.get_num_threads()} interop={torch.get_num_interop_threads()}")
    numba = sys.modules.get("numba")
    if numba is not None:
        try:
            layer = numba.threading_layer()
        except Exception:  # ValueError until a parallel region has run
            layer = "not initialized"
        out.append(f"numba threads={numba.get_num_threads()} layer={layer}")
    jax = sys.modules.get("jax")
    if jax is not None:
        try:
            out.append(f"jax devices={','.join(str(d) for d in jax.devices())}")
        except Exception as exc:
            out.append(f"jax devices: {one_line_error(exc, 60)}")
    return out + blas_info()


def worker_env_info() -> dict:
    """What a worker reports about its environment: the relevant variables it had when
    measured, those set in-process, and its threads. Call it before anything else here
    imports threadpoolctl, which sets KMP_DUPLICATE_LIB_OK when imported."""
    env, own = relevant_env(dict(os.environ)), set_in_process()
    return {"env": env, "set_in_process": own, "threads": thread_info()}


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_bytes() -> int | None:
    """Resident set size of this process now (Linux /proc), in bytes."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window: writing 5 to /proc/self/clear_refs resets VmHWM
    (Linux >= 4.0). False when that is not possible: then peak_rss_bytes is the peak
    over the process's whole life."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """Peak resident set size since the last reset_peak_rss (or process start), in bytes."""
    kib = _status_kib("VmHWM")
    if kib is None:
        import resource
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib * 1024


# --------------------------------------------------------------------------
# parent side
# --------------------------------------------------------------------------

class WorkerEnv:
    """The environment of each worker process.

    Every worker starts from the shell's environment *without* its tuning variables
    (``TUNING_PREFIXES``; kept with ``keep_shell_tuning``), then gets

    * ``needs[impl]``: only what a library needs to run at all (JAX_PLATFORMS=cpu);
    * ``--env KEY=VALUE`` (every worker) and ``--env IMPL:KEY=VALUE`` (that impl's only).

    Nothing else: a library's own settings (symbp's OMP_WAIT_POLICY=passive and
    OPENBLAS_CORETYPE, set by ``import symbp``) come from the library inside its own worker,
    and the worker reports them (``worker_env_info``).
    """

    def __init__(self, impls: Sequence[str], needs: dict[str, dict[str, str]],
                 env_options: Sequence[str] = (), keep_shell_tuning: bool = False) -> None:
        self.needs = needs
        self.keep_shell_tuning = keep_shell_tuning
        self.every: dict[str, str] = {}
        self.per_impl: dict[str, dict[str, str]] = {}
        for item in env_options:
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise SystemExit(f"--env {item!r}: expected KEY=VALUE or IMPL:KEY=VALUE")
            impl, colon, name = key.partition(":")
            if colon:
                if impl not in impls:
                    raise SystemExit(f"--env {item!r}: {impl!r} is not one of {', '.join(impls)}")
                self.per_impl.setdefault(impl, {})[name] = value
            else:
                self.every[key] = value
        self.dropped = {} if keep_shell_tuning else \
            {k: v for k, v in sorted(START_ENV.items()) if k.startswith(TUNING_PREFIXES)}

    def given(self, impl: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        """What the harness adds for ``impl`` on top of the (cleaned) shell environment."""
        return {**self.needs.get(impl, {}), **self.every, **self.per_impl.get(impl, {}), **(extra or {})}

    def for_impl(self, impl: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in START_ENV.items() if k not in self.dropped}
        env.update(self.given(impl, extra))
        return env

    def header_lines(self) -> list[str]:
        added = [f"{fmt_env(self.given(i))} ({i} only)" for i in self.needs if self.given(i)]
        lines = ["worker environments: each library with its own defaults and threads; the harness adds "
                 + (", ".join(added) if added else "nothing")]
        if self.every:
            lines.append("  --env for every worker: " + fmt_env(self.every))
        for impl, env in self.per_impl.items():
            lines.append(f"  --env for {impl} only: " + fmt_env(env))
        if self.dropped:
            lines.append("  not passed on from this shell (tuning variables): " + fmt_env(self.dropped))
        elif self.keep_shell_tuning:
            kept = {k: v for k, v in START_ENV.items() if k.startswith(TUNING_PREFIXES)}
            lines.append("  shell tuning variables passed to every worker: " + (fmt_env(kept) or "none set"))
        return lines

    def table(self, impls: Sequence[str], infos: dict[str, dict | None]) -> str:
        """One row per impl: what the harness gave it, what the library set in-process;
        then each worker's threads. ``infos[impl]`` is a worker's ``worker_env_info()``."""
        rows, threads = [], []
        for impl in impls:
            info = infos.get(impl) or {}
            rows.append([impl, fmt_env(self.given(impl)) or "-",
                         fmt_env(info.get("set_in_process", {})) or ("-" if info else "? (no worker ran)")])
            for i, line in enumerate(info.get("threads", [])):
                threads.append(f"  {impl if i == 0 else '':<14}{line}")
        table = format_table(["worker", "env given by the harness", "env set by the library in-process"], rows)
        return table + ("\nthreads and BLAS pools each worker found (threadpoolctl):\n" + "\n".join(threads)
                        if threads else "")


def run_startup(impls: Sequence[str], argv_for: Callable[[str], list[str]], envs: WorkerEnv,
                compile_cache: dict[str, str], rounds: int, timeout: float, wait_idle: float = 0.0,
                threshold: float = 0.10) -> dict:
    """Time to the first step, per impl, in fresh processes: "cold" with an empty compile
    cache (``compile_cache[impl]`` names the variable pointing at it, e.g. SYMBP_CACHE_DIR),
    then "cached", a second process reusing it. A fresh cache per round; impls rotate from
    round to round. The worker (``argv_for(impl)``) returns at least ``total_s``."""
    import shutil
    import tempfile

    if "symbp" in impls:
        byte_compile("symbp")
    out = {impl: {"cold": [], "cached": [], "error": None} for impl in impls}
    for r in range(rounds):
        for impl in list(impls[r % len(impls):]) + list(impls[:r % len(impls)]):
            rec = out[impl]
            if rec["error"]:
                continue
            var = compile_cache.get(impl)
            cache = tempfile.mkdtemp(prefix="bench-startup-") if var else None
            try:
                for kind in ("cold", "cached"):
                    if wait_idle > 0:
                        wait_for_idle(wait_idle, threshold)
                    res = run_worker(argv_for(impl), envs.for_impl(impl, {var: cache} if var else None), timeout)
                    if "error" in res:
                        rec["error"] = f"{kind}: {res['error']}"
                        break
                    rec[kind].append(res)
                    print(f"  start-up round {r + 1}  {impl:<13}  {kind:<6}  {res['total_s']:6.2f} s",
                          file=sys.stderr, flush=True)
            finally:
                if cache:
                    shutil.rmtree(cache, ignore_errors=True)
    return out


def byte_compile(package: str) -> None:
    """Write the .pyc files of ``package``'s modules, as ``pip install`` does for the packages
    it installs (the peers' were written so).  A checkout installed with ``pip install -e``
    has none until a process writes them, and none is ever written where
    PYTHONDONTWRITEBYTECODE is set: every process would compile the package's sources again
    (0.09 s of symbp's start-up, measured), a cost its users do not pay."""
    import compileall
    import importlib.util

    spec = importlib.util.find_spec(package)  # finds, does not import
    for folder in (spec.submodule_search_locations or []) if spec else []:
        compileall.compile_dir(folder, quiet=1)


def print_startup(impls: Sequence[str], out: dict, what: str, compile_cache: dict[str, str],
                  cache_note: dict[str, str]) -> None:
    """The start-up table of ``run_startup``'s result: best total per kind (and the range
    over rounds), the best run's import / build / first step, and the process's wall time."""
    def span(runs: list[dict]) -> str:
        totals = sorted(r["total_s"] for r in runs)
        return f"{totals[0]:.2f}" + (f"-{totals[-1]:.2f}" if len(totals) > 1 else "")

    def parts(runs: list[dict]) -> str:
        b = min(runs, key=lambda r: r["total_s"])
        return f"{b['import_s']:.2f} / {b['build_s']:.2f} / {b['first_step_s']:.2f}"

    rows = []
    for impl in impls:
        rec = out[impl]
        if not rec["cold"] or not rec["cached"]:
            rows.append([impl, f"error: {rec['error']}"])
            continue
        walls = "/".join(f"{min(r['process_wall_s'] for r in rec[k]):.2f}" for k in ("cold", "cached"))
        cache = f"{compile_cache[impl]} (fresh, then reused)" if impl in compile_cache else cache_note.get(impl, "")
        rows.append([impl, span(rec["cold"]), span(rec["cached"]), parts(rec["cold"]), parts(rec["cached"]),
                     walls, cache])
    rounds = max((len(out[i]["cold"]) for i in impls), default=0)
    print(f"\nstart-up: {what}, fresh process; {rounds} round(s), best (-worst) shown")
    print(format_table(["impl", "cold s", "cached s", "cold: import/build/1st step",
                        "cached: import/build/1st step", "process wall s", "compile cache"],
                       rows, right=[False, True, True, True, True, True, False]))
    print("cold/cached s: from before the library's import to the end of its first step (making the\n"
          "data left out); build includes symbp's compile, 1st step includes JAX's jit and\n"
          "torch.compile's compilation; process wall adds the interpreter's own start.\n"
          "Every library's modules load from .pyc files (symbp's written first, as pip install does).")


def fmt_env(env: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in env.items())


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
