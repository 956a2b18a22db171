"""Lowering: a :class:`~symbp.derive.Derivation` in, kernel steps out.

``ir`` holds the steps every backend prints (GEMMs, loop nests, reductions, window scans);
``patterns`` and ``windows`` find contractions, column sums, per-row reductions and
convolutions in derived index formulas; ``stages`` plans each layer's stages into steps;
``plan`` names the buffers, tags their roles and orders the steps of a forward pass, a
backward pass and an optimizer's fused update; ``fuse`` merges loops over the same (batch,
units) entries into one pass (the CPU printer applies it).  Nothing here prints code or knows a layer.
"""
