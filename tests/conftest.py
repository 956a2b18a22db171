"""Session fixtures: every network is generated and JIT-compiled once per test session.

``compiled(spec_or_network, dtype)`` returns a fresh :class:`symbp.Model` (its own copy of
the parameters and work buffers) whose kernels are shared with every other model of the
same (network spec, dtype): Numba compiles each generated function once per module, so a
second model of the same network costs nothing.  Generated modules go into a session
temporary directory, never into the project's ``generated/`` or the user's ``$SYMBP_CACHE_DIR``.
"""

from __future__ import annotations

import atexit
import copy
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # lets a bare `pytest` (not only `python -m pytest`) find symbp
    sys.path.insert(0, str(ROOT))

from _support import NetSpec  # noqa: E402

# Every module a test generates — through the fixtures, sb.compile's default, or a `symbp`
# subprocess (it inherits the environment) — goes into this session's temporary folder, set
# before symbp is imported; it is removed when the session ends.
SESSION_CACHE = tempfile.mkdtemp(prefix="symbp-test-cache-")
os.environ["SYMBP_CACHE_DIR"] = SESSION_CACHE
atexit.register(shutil.rmtree, SESSION_CACHE, ignore_errors=True)

try:  # the differential fuzzers (tests/test_formula_fuzz.py): fixed seed, bounded in CI
    from hypothesis import settings

    settings.register_profile("ci", max_examples=12, derandomize=True, deadline=None, print_blob=True)
    settings.register_profile("long", max_examples=400, deadline=None, print_blob=True)
    settings.load_profile("ci")  # `pytest --hypothesis-profile=long` replaces it
except ImportError:
    pass

import symbp as sb  # noqa: E402


@pytest.fixture(scope="session")
def project_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def session_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("symbp-generated")


@pytest.fixture(scope="session")
def compiled(session_cache_dir):
    """Factory ``compiled(spec, dtype="float64", seed=0) -> Model``, memoized by
    (network fingerprint, dtype).  ``spec`` is a :class:`_support.NetSpec` or an
    ``sb.Network``."""
    memo: dict[tuple[str, str], sb.Model] = {}

    def factory(spec, dtype: str = "float64", seed: int | None = 0) -> sb.Model:
        net = spec.build() if isinstance(spec, NetSpec) else spec
        key = (net.fingerprint(), dtype)
        if key not in memo:
            memo[key] = sb.compile(net, dtype=dtype, seed=0, cache_dir=session_cache_dir)
        model = copy.copy(memo[key])
        model.network = net
        model.params = net.init_params(seed, np.dtype(dtype))
        model._buffers = {}  # work buffers are per model: never share them between copies
        model.optimizer, model.schedule, model.base_lr, model.epoch = None, None, None, 0
        model.history = sb.History()
        return model

    return factory
