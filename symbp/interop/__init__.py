"""Leaving symbp (and arriving): a compiled :class:`~symbp.Model` in, another toolkit's form out.

- :mod:`~symbp.interop.onnx_export`: a model in, an ONNX file out (``model.to_onnx(path)``,
  ``symbp export run.npz -o model.onnx``); needs the ``onnx`` extra.
- :mod:`~symbp.interop.torch_weights`: a model in, a PyTorch ``nn.Sequential`` with the same
  weights out (``model.to_torch()``), and back (``sb.from_torch(module, inputs=…)``).
- :mod:`~symbp.interop.kernels`: a model in, a folder with a NumPy + Numba module and its
  weights out (``symbp export … --kernels -o DIR``).

Nothing here is imported with symbp: each module loads its optional package when called.
"""
