"""symbp: backpropagation derived by SymPy, run as generated Numba kernels.

>>> import symbp as sb
>>> net = sb.Network(inputs=64, layers=[sb.Dense(32, activation="tanh"), sb.Dense(10)])
>>> d = sb.derive(net)                       # the SymPy derivation
>>> model = sb.compile(net, dtype="float32")  # generated/<name>-<hash>.py, JIT-compiled
"""

from . import _runtime  # noqa: F401 - configures BLAS/threads before NumPy's libraries load
from ._version import __version__
from .compile import compile, load
from .derive import Derivation, derive
from .gradcheck import gradcheck
from .interop.torch_weights import from_torch  # torch is imported when called
from .spec.activations import Activation
from .spec.graph import Input
from .spec.layers import Add, AvgPool2D, BatchNorm, Concat, Conv2D, Dense, Dropout, Flatten, LayerNorm, Maxout, MaxPool2D
from .spec.layers import FormulaLayer as Layer  # sb.Layer("z[n, k] = …", units=…, params=…)
from .spec.losses import Loss
from .spec.network import Network
from .train.callbacks import EarlyStopping, ModelCheckpoint
from .train.model import History, Model
from .train.optim import SGD, Adagrad, Adam, AdamW, FormulaOptimizer, Optimizer, RMSprop
from .train.schedules import CosineDecay, ExponentialDecay, ReduceLROnPlateau, StepDecay

# The readers (they print SymPy) load when first named, so that a process training a model
# from the cache never imports SymPy (``import symbp``: 0.15 s, was 0.41 with SymPy and them).
_READERS = {"graph": "graph", "optimizer_paths": "paths", "report": "report", "Walkthrough": "walkthrough",
            "walkthrough": "walkthrough"}


def __getattr__(name: str):
    if name in _READERS:
        import importlib

        value = getattr(importlib.import_module(f".read.{_READERS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_READERS))

__all__ = [
    "Activation", "Adagrad", "Adam", "AdamW", "Add", "AvgPool2D", "BatchNorm", "Concat", "Conv2D", "CosineDecay",
    "Dense", "Dropout", "Flatten", "Layer", "LayerNorm",
    "MaxPool2D", "Maxout", "Derivation", "EarlyStopping",
    "ExponentialDecay", "FormulaOptimizer", "from_torch", "History", "Input", "Loss", "Model", "ModelCheckpoint", "Network",
    "Optimizer", "RMSprop", "ReduceLROnPlateau", "SGD", "StepDecay", "__version__", "compile", "derive",
    "gradcheck", "graph", "load", "optimizer_paths", "report", "walkthrough", "Walkthrough",
]
