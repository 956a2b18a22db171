"""The computational graph of one sample, from a walkthrough, a network or a model.

:func:`graph` is the entry point: it makes the sample's :class:`~symbp.read.walkthrough.Walkthrough`
when given a network or model, and :mod:`symbp.read.graph_draw` builds and draws the gates.
"""

from __future__ import annotations

from ..spec.network import Network
from ..train.model import Model
from .graph_draw import (
    EXPAND_MAX_ENTRIES,
    EXPAND_MAX_ENTRY_PARAMS,
    EXPAND_MAX_PARAMS,
    EXPAND_MAX_UNITS,
    Edge,
    Graph,
    GraphvizNotFound,
    Node,
    draw,
)
from .walkthrough import Walkthrough, walkthrough

__all__ = ["EXPAND_MAX_ENTRIES", "EXPAND_MAX_ENTRY_PARAMS", "EXPAND_MAX_PARAMS",
           "EXPAND_MAX_UNITS", "Edge", "Graph", "GraphvizNotFound", "Node", "graph"]


def graph(source, collapse: bool | None = None, **walkthrough_args) -> Graph:
    """The computational graph of one sample.

    Parameters
    ----------
    source : Walkthrough, Network or Model
        A :class:`~symbp.read.walkthrough.Walkthrough` supplies the sample's numbers; for a
        network or model one is made with ``walkthrough_args`` (``x``, ``t``, ``params``,
        ``seed``).
    collapse : bool, optional
        One node per layer.  By default the graph is drawn unit by unit when every layer
        has at most :data:`EXPAND_MAX_UNITS` units and the network at most
        :data:`EXPAND_MAX_PARAMS` parameters, and collapsed otherwise; a network with other
        layers (convolution, pooling, …) is drawn entry by entry — a convolution's windows as
        × and + gates, a max pool's as max gates — when it has at most
        :data:`EXPAND_MAX_ENTRIES` values per sample and :data:`EXPAND_MAX_ENTRY_PARAMS`
        parameters.

    Examples
    --------
    >>> import symbp as sb
    >>> g = graph(sb.Network(inputs=2, layers=[sb.Dense(2, activation="relu"), sb.Dense(1)], loss="mse"))
    >>> g.node("z_h₁").label, g.node("h₁").label
    ('+', 'max')
    """

    if isinstance(source, Walkthrough):
        if walkthrough_args:
            raise TypeError(f"graph() of a Walkthrough takes no {', '.join(sorted(walkthrough_args))}")
        w = source
    elif isinstance(source, (Network, Model)):
        w = walkthrough(source, **walkthrough_args)
    else:
        raise TypeError(f"graph() takes a Walkthrough, Network or Model, got {type(source).__name__}")
    return draw(w, collapse)
