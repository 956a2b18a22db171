"""The specification: what a user declares, checked when declared.

In: a network's inputs, layers (``layers/``, one file each), activation and loss formulas
(parsed by ``formula`` without eval, their functions in ``ops``).  Out: a checked
:class:`~symbp.spec.network.Network` whose layers state their forward passes as index-formula
stages, for :mod:`symbp.derive`.
"""
