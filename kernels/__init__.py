"""Triton kernels, one op a file (kernel, launcher, autograd wrapper, torch reference).

This folder is installed as ``titan_dsv3.kernels`` (see pyproject.toml): a top-level package named ``kernels``
would clash with the PyPI package of that name. Shared by the launchers: require_same_device.
"""


def require_same_device(ref_name: str, ref, **tensors) -> None:
    """Refuse a tensor on another device than ref, naming it. The kernels take raw pointers: a tensor elsewhere (a
    CPU tensor beside CUDA ones, say) would be read as device memory it is not. None entries are skipped."""
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(
                f"{name} is on {t.device}, {ref_name} on {ref.device}: move it to {ref_name}'s device"
            )
