"""Training: a compiled model in, trained parameters out.

``model`` (the Model and its one ``fit`` loop over a backend's runtime), ``optim`` (update
rules as SymPy statements the kernels fuse), ``schedules``, ``callbacks``, ``checkpoint``
(save and load, every field checked), ``data`` (inputs and targets checked, safe npz
reading), ``datafiles`` (a user's .npz, .npy and .csv/.tsv files read and checked).
"""
