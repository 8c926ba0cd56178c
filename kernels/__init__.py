"""Triton kernels, one op a file (kernel, launcher, autograd wrapper, torch reference).

This folder is installed as ``titan_dsv3.kernels`` (see pyproject.toml): a top-level package named ``kernels``
would clash with the PyPI package of that name.
"""
