"""The functional form of a network: ``x = sb.Input(64)``, ``h = sb.Dense(64)(x)``, ….

Calling a layer on a tensor (or a list of tensors, for ``sb.Add`` and ``sb.Concat``) records
an edge; nothing is computed.  :func:`topological` turns the tensors an output depends on
into the order the kernels run them in, each layer with the positions of its inputs (0: the
network input, l: layer l's output): the one form :class:`~symbp.spec.network.Network`
keeps for a chain and a graph alike.
"""

from __future__ import annotations


class Input:
    """The network input of a functional network: a width, or an image shape (C, H, W)."""

    def __init__(self, shape) -> None:
        self.shape = tuple(shape) if isinstance(shape, (tuple, list)) else shape  # Network checks it

    def __repr__(self) -> str:
        return f"Input({self.shape!r})"


class Tensor:
    """A layer's output in a functional network: the layer and the tensors it reads."""

    def __init__(self, layer, inputs: tuple) -> None:
        self.layer = layer
        self.inputs = inputs

    def __repr__(self) -> str:
        return f"Tensor({self.layer!r})"


def as_inputs(value, layer) -> tuple:
    """What a layer is called on, as a tuple of tensors: one, or a list for a merging layer."""
    many = isinstance(value, (list, tuple))
    items = tuple(value) if many else (value,)
    if getattr(layer, "merges", False) != many:
        raise TypeError(f"{layer!r} takes {'a list of tensors' if layer.merges else 'one tensor'}, "
                        f"got {type(value).__name__}")
    if many and len(items) < 2:
        raise ValueError(f"{layer!r} joins at least two tensors, got {len(items)}")
    for item in items:
        if not isinstance(item, (Input, Tensor)):
            raise TypeError(f"{layer!r} is called on a {type(item).__name__}: it takes sb.Input(…) or the "
                            "output of another layer")
    return items


def topological(source: Input, output) -> tuple[list, list]:
    """(layers in the order they run, the input positions of each), from ``output`` back.

    Depth first, inputs in the order given: a chain keeps its order and the layer that
    joins two branches comes after both.  A layer object used at two places, or a tensor
    that does not come from ``source``, is an error (weights are never shared silently).
    """
    if not isinstance(output, Tensor):
        raise TypeError(f"outputs must be the output of a layer (h = sb.Dense(10)(x)), got {type(output).__name__}")
    order, position, seen = [], {}, {}
    stack = [(output, False)]
    while stack:  # iterative: a deep chain must not hit Python's recursion limit
        node, done = stack.pop()
        if isinstance(node, Input):
            if node is not source:
                raise ValueError(f"the graph reads {node!r}, which is not the network's inputs {source!r}: "
                                 "a network has one input")
            continue
        if id(node) in position:
            continue
        if done:
            if id(node.layer) in seen and seen[id(node.layer)] is not node:
                raise ValueError(f"{node.layer!r} is used at two places in the graph; symbp does not share a "
                                 "layer's weights between places: declare a second layer")
            seen[id(node.layer)] = node
            order.append(node)
            position[id(node)] = len(order)
            continue
        stack.append((node, True))
        stack.extend((item, False) for item in reversed(node.inputs) if id(item) not in position)
    sources = [tuple(0 if isinstance(item, Input) else position[id(item)] for item in node.inputs) for node in order]
    return [node.layer for node in order], sources
