"""Catch host/device mix-ups on a CPU-only machine, as CUDA kernels would.

On CUDA, an op whose tensors live on different devices fails ("Expected all tensors to be on the same
device"), except that a 0-dim CPU tensor may be read by a GPU kernel. On a CPU-only machine every
tensor is on the CPU, so such bugs stay silent until the first GPU run. `DeviceDiscipline` brings them
back: it tracks which tensors would be on the training device (the model's parameters and buffers,
whatever is moved or created there, and every result computed from such tensors) and fails on any op
that mixes them with host tensors the way a CUDA kernel refuses.

Two modes cooperate: a TorchFunctionMode sees `.to(device)` / `device=` requests, which are no-ops on
the CPU and never reach the dispatcher; a TorchDispatchMode sees every aten op, backward and
optimizer included, propagates "on device" and checks the CUDA rule.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# Ops that legitimately move data between host and device, or read a scalar back.
_TRANSFER_OPS = {"_to_copy", "copy_", "_local_scalar_dense", "to", "lift_fresh", "set_", "detach"}
# Indexing accepts host index tensors with device data (the kernel moves them).
_INDEX_OPS = {"index", "index_put_", "index_put", "_index_put_impl_"}


class DeviceMixError(AssertionError):
    """An op that would fail on CUDA: host and device tensors mixed."""


class _Registry:
    """Device tensors, keyed by their storage: views and the shallow copies autograd saves for backward share
    it. Registered tensors are kept alive so a freed address is never mistaken for a new tensor's."""

    def __init__(self) -> None:
        self._storages: dict[int, torch.Tensor] = {}

    @staticmethod
    def _key(tensor: torch.Tensor) -> int:
        return tensor.untyped_storage()._cdata

    def add(self, tensor: torch.Tensor) -> None:
        self._storages.setdefault(self._key(tensor), tensor)

    def __contains__(self, tensor: torch.Tensor) -> bool:
        return self._key(tensor) in self._storages


class _Requests(TorchFunctionMode):
    """Marks tensors moved to, or created on, the device that stands for the GPU."""

    def __init__(self, registry: _Registry, device: torch.device) -> None:
        super().__init__()
        self.registry, self.device = registry, device

    def _targets_device(self, args: tuple, kwargs: dict) -> bool:
        for value in (*args, *kwargs.values()):
            if isinstance(value, (str, torch.device)):
                try:
                    if torch.device(value) == self.device:
                        return True
                except RuntimeError:
                    continue
        return False

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        to_device = name == "cuda" or (
            (name == "to" or "device" in kwargs) and self._targets_device(args[1:] if name == "to" else (), kwargs)
        )
        if to_device:
            for tensor in _tensors(out):
                self.registry.add(tensor)
        return out


class _Checks(TorchDispatchMode):
    """Propagates "on device" through every aten op and enforces CUDA's same-device rule."""

    def __init__(self, registry: _Registry) -> None:
        super().__init__()
        self.registry = registry
        self.checked_ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        inputs = [t for t in _tensors((args, kwargs)) if t.device.type == "cpu"]
        on_device = [t for t in inputs if t in self.registry]
        out = func(*args, **kwargs)
        if on_device and name not in _TRANSFER_OPS:
            self.checked_ops += 1
            mutated = _tensors(
                [
                    args[i]
                    for i, arg in enumerate(func._schema.arguments)
                    if i < len(args) and arg.alias_info is not None and arg.alias_info.is_write
                ]
            )
            for tensor in mutated:
                if tensor not in self.registry:
                    raise DeviceMixError(f"{func}: writes a host tensor {_describe(tensor)} from device tensors")
            if name not in _INDEX_OPS:
                for tensor in inputs:
                    if tensor not in self.registry and tensor.dim() > 0:
                        raise DeviceMixError(f"{func}: mixes a host tensor {_describe(tensor)} with device tensors")
            for tensor in _tensors(out):
                self.registry.add(tensor)
        return out


def _tensors(tree: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(tree)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def _describe(tensor: torch.Tensor) -> str:
    return f"(shape {list(tensor.shape)}, {tensor.dtype})"


class DeviceDiscipline:
    """Context manager: everything inside runs as if `device` were a GPU and everything else the host.

    `modules` are the model(s) whose parameters and buffers live on the device from the start."""

    def __init__(self, device: torch.device, modules: Iterable[torch.nn.Module]) -> None:
        self.registry = _Registry()
        for module in modules:
            for tensor in (*module.parameters(), *module.buffers()):
                self.registry.add(tensor)
        self._function_mode = _Requests(self.registry, torch.device(device))
        self._dispatch_mode = _Checks(self.registry)

    @property
    def checked_ops(self) -> int:
        return self._dispatch_mode.checked_ops

    def __enter__(self) -> DeviceDiscipline:
        self._function_mode.__enter__()
        self._dispatch_mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._dispatch_mode.__exit__(*exc)
        self._function_mode.__exit__(*exc)
