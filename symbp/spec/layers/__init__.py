"""Layers, one file each: what comes in is a user's declaration (``sb.Dense(32, …)``, a
TOML table); what goes out is a :class:`~symbp.spec.layers.base.LayerForm` of index-formula
stages that :mod:`symbp.derive` differentiates.  ``LAYERS`` maps each TOML ``type`` to its
class; importing a layer's file registers it.
"""

from .base import LAYERS, Layer, LayerForm, Stage, image_dims, register
from .conv2d import Conv2D
from .custom import FormulaLayer
from .dense import Dense
from .dropout import Dropout
from .flatten import Flatten
from .maxout import Maxout
from .merge import Add, Concat
from .norm import BatchNorm, LayerNorm
from .pooling import AvgPool2D, MaxPool2D

__all__ = ["LAYERS", "Add", "AvgPool2D", "BatchNorm", "Concat", "Conv2D", "Dense", "Dropout", "Flatten", "FormulaLayer", "Layer",
           "LayerForm", "LayerNorm", "MaxPool2D", "Maxout", "Stage", "image_dims", "register"]
