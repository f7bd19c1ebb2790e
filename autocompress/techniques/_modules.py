"""Small helpers to get and replace submodules by dotted name."""

from __future__ import annotations

from torch import nn


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(get_module(model, parent_name), child, new)
