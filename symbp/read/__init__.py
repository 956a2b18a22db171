"""Readers: a derivation (and a model) in, text, LaTeX, HTML and pictures out.

``explain`` and ``printing`` (the formulas in notation), ``walkthrough`` (one sample, every
number checked), ``graph``/``graph_draw`` (the gates picture), ``report`` (one HTML page),
``summary``, ``paths`` and ``plots``; ``index_eval`` evaluates index formulas with NumPy.
"""
