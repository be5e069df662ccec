"""The options every backbone's ``from_pretrained`` gets."""

from __future__ import annotations

import torch


def load_options(attn_implementation: str | None, device: torch.device | str | None) -> dict:
    """``from_pretrained`` keyword arguments: the attention implementation and the device to load onto
    (``None``: the library's defaults), and no kernels from the hub: transformers 5 swaps layers for kernels
    downloaded from the hub when the ``kernels`` package is installed (and fails on the ``meta`` device);
    a backbone here is built from local files alone. Older versions keep the flag as a config attribute."""
    options: dict = {"use_kernels": False}
    if attn_implementation is not None:
        options["attn_implementation"] = attn_implementation
    if device is not None:  # the weights go from the files to the device (no CPU copy)
        options["device_map"] = torch.device(device)
    return options
