"""The front door: a network in, a compiled model out (:func:`compile`); a checkpoint in, the
model it saved out (:func:`load`).  Both targets start here: the CPU model
(:mod:`symbp.train.model`) and the CUDA one (:mod:`symbp.backends.cuda.model`)."""

from __future__ import annotations

import os

import numpy as np

from . import cache
from .spec.network import Network
from .train.model import Model

__all__ = ["compile", "load"]


def compile(  # noqa: A001 - the public name the API promises
    net: Network,
    target: str = "cpu",
    dtype: str = "float32",
    seed: int | None = 0,
    cache_dir: str | os.PathLike | None = None,
) -> Model:
    """Generate (or reuse) the kernels for ``net`` and return a trainable :class:`Model`.

    Parameters
    ----------
    net : Network
    target : {"cpu", "cuda"}
        "cuda" generates numba.cuda kernels (the ``cuda`` extra; see README).
    dtype : {"float32", "float64"}
    seed : int or None
        Seeds the parameter initialisation.
    cache_dir : path, optional
        Where generated modules go; defaults to ``$SYMBP_CACHE_DIR`` or ``generated/``.
    """
    if not isinstance(net, Network):
        raise TypeError(f"compile() takes a symbp.Network, got {type(net).__name__}")
    if target == "cuda":
        from .backends.cuda.model import compile_cuda

        return compile_cuda(net, dtype=dtype, seed=seed, cache_dir=cache_dir)
    if target != "cpu":
        raise ValueError(f"unknown target {target!r}; available: 'cpu', 'cuda'")
    if dtype not in ("float32", "float64") and np.dtype(dtype).name not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    dtype = np.dtype(dtype).name

    def generate(derivation) -> str:  # the generator (and SymPy) load only on a cache miss
        from .backends.cpu.module import generate_source

        return generate_source(derivation, dtype)

    module, path, derivation = cache.model_module(net, dtype, "cpu", cache_dir, generate)
    model = Model(net, module, path, dtype, net.init_params(seed, np.dtype(dtype)))
    if derivation is not None:  # derived once: a training module generated later reads this one
        model._derivation = derivation
    return model


def load(path, cache_dir: str | os.PathLike | None = None) -> Model:
    """Rebuild a model saved with :meth:`Model.save`: spec, parameters, optimizer and its
    state, schedule, epoch counter and history.  A damaged, truncated or forged file is
    refused (ValueError naming it and the problem; see :mod:`symbp.train.checkpoint`)."""
    from .train import checkpoint

    found = checkpoint.contents(path)  # every field and array checked against the spec
    meta = found.meta
    model = compile(found.network, dtype=meta["dtype"], seed=None, cache_dir=cache_dir)
    model.params = {name: np.ascontiguousarray(found.arrays[f"param/{name}"], dtype=model.dtype)
                    for name in found.network.param_shapes()}
    if found.optimizer is not None:
        for states in found.optimizer.state.values():
            for sname, arr in states.items():
                states[sname] = np.ascontiguousarray(arr, dtype=model.dtype)
    model.optimizer = found.optimizer
    model.schedule = found.schedule
    model.base_lr = meta["base_lr"]
    model.epoch = meta["epoch"]
    model.history.epoch = list(meta["history"]["epoch"])
    model.history.history = {k: [float(v) for v in values] for k, values in meta["history"]["metrics"].items()}
    return model
