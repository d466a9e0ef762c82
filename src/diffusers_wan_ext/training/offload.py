"""Layer-level CPU offload training: DiffSynth-Studio's ``--enable_model_cpu_offload`` and
``--enable_optimizer_cpu_offload``.

The trained module's weights live in CPU memory and each layer is brought to the compute device only while it
runs, by module hooks (as the reference's ``OffloadTrainingManager``):

* the *units* are the leaf modules that hold parameters (a parametrized Linear -- fp8 storage -- counts as one unit
  with its stored weight);
* forward pre-hook: the unit's frozen weights are copied to the device; forward hook: they are dropped again
  (the CPU copy is the weight) -- except in a gradient-checkpointing recompute (a forward run by the backward): its
  saved tensors hold the frozen parameters themselves, so they stay on the device until the unit's backward;
  backward pre-hook: copied in again (the backward needs them); backward hook: dropped;
* trainable parameters stay on the device (``--enable_model_cpu_offload`` alone: the optimizer runs there), or --
  with ``--enable_optimizer_cpu_offload`` -- live on the CPU with their gradients and optimizer states, come to the
  device with their unit and go back, gradients included, after the backward (:meth:`LayerOffloadManager.after_backward`,
  before ``optimizer.step``), so the optimizer steps on the CPU;
* buffers and parameters held by non-leaf modules (modulation tables, rotary tables) are small and stay on the
  device.

Offloading moves tensors and nothing else: on a fixed seed the losses are those of the plain run.

Example:
    >>> manager = LayerOffloadManager(module, torch.device("cuda"), optimizer_on_cpu=True)  # doctest: +SKIP
    >>> loss.backward(); manager.after_backward(); optimizer.step()  # doctest: +SKIP
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["LayerOffloadManager", "offload_units"]


def offload_units(module: nn.Module) -> list[nn.Module]:
    """The modules whose weights travel together: leaf modules with parameters, and parametrized modules whole."""
    units: list[nn.Module] = []
    covered: set[int] = set()
    for sub in module.modules():
        if id(sub) in covered:
            continue
        leaf = not any(True for _ in sub.children())
        if parametrize.is_parametrized(sub) or (leaf and any(True for _ in sub.parameters(recurse=False))):
            units.append(sub)
            covered.update(id(m) for m in sub.modules())
    return units


class LayerOffloadManager:
    r"""
    Hooks that keep ``module``'s layer weights in CPU memory between their uses (see the module docstring).

    Args:
        module: the trained module (before ``accelerator.prepare``; it is not wrapped for DDP).
        device: the compute device.
        optimizer_on_cpu: keep the trainable parameters, their gradients and so the optimizer states on the CPU
            (``--enable_optimizer_cpu_offload``).

    Attributes:
        units: the hooked modules.
        onloads: how many times a unit's weights were brought to the device (a measure that the hooks run).
    """

    def __init__(self, module: nn.Module, device: torch.device | str, optimizer_on_cpu: bool = False) -> None:
        self.device = torch.device(device)
        self.optimizer_on_cpu = optimizer_on_cpu
        self.pin = self.device.type == "cuda"
        self.units = offload_units(module)
        self.onloads = 0
        self._handles = []
        self.frozen: dict[int, torch.Tensor] = {}  # id(parameter) -> its CPU copy
        self._frozen_params: list[nn.Parameter] = []
        self.trainable: list[nn.Parameter] = []
        in_units = set()
        for unit in self.units:
            for p in unit.parameters():
                in_units.add(id(p))
                if p.requires_grad:
                    self.trainable.append(p)
                    p.data = p.data.to("cpu" if optimizer_on_cpu else self.device)
                else:
                    cpu = p.data.to("cpu")
                    self.frozen[id(p)] = cpu.pin_memory() if self.pin else cpu
                    self._frozen_params.append(p)
                    p.data = self.resting(p)
            self._hook(unit)
        for p in module.parameters():  # held by non-leaf modules: small, kept on the device
            if id(p) not in in_units:
                p.data = p.data.to(self.device)
        for b in module.buffers():
            b.data = b.data.to(self.device)

    def _hook(self, unit: nn.Module) -> None:
        # a unit whose inputs need no gradient (the patch embedding) still gets its backward pre-hook; torch warns
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with "
                                "respect to module outputs")
        self._handles += [
            unit.register_forward_pre_hook(lambda m, args: self.onload(m)),
            unit.register_forward_hook(lambda m, args, out: self._after_forward(m)),
            unit.register_full_backward_pre_hook(lambda m, grad_out: self.onload(m)),
            unit.register_full_backward_hook(lambda m, grad_in, grad_out: self.offload(m)),
        ]

    def onload(self, unit: nn.Module) -> None:
        """Bring the unit's weights to the device (a fresh copy of the CPU weights)."""
        self.onloads += 1
        for p in unit.parameters():
            if id(p) in self.frozen:
                p.data = self.frozen[id(p)].to(self.device, non_blocking=True, copy=True)
            elif self.optimizer_on_cpu and p.device != self.device:
                p.data = p.data.to(self.device, non_blocking=True)
                if p.grad is not None:
                    p.grad = p.grad.to(self.device)

    def resting(self, p: nn.Parameter) -> torch.Tensor:
        """What a frozen parameter holds while its unit is not running: its CPU copy."""
        return self.frozen[id(p)]

    def offload(self, unit: nn.Module) -> None:
        """Drop the device copies of the unit's frozen weights (trainable ones wait for :meth:`after_backward`)."""
        for p in unit.parameters():
            if id(p) in self.frozen:
                p.data = self.resting(p)

    def _after_forward(self, unit: nn.Module) -> None:
        # a forward inside the backward is a checkpoint recompute: torch.utils.checkpoint keeps a frozen (no-grad)
        # tensor it saves by reference, so the weights must stay until the unit's backward hook drops them
        if torch._C._current_graph_task_id() == -1:
            self.offload(unit)

    def after_backward(self) -> None:
        """After ``backward`` and before ``optimizer.step``: every frozen weight back to its CPU copy and, with the
        optimizer on the CPU, the trainable parameters and their gradients to the CPU."""
        for p in self._frozen_params:
            p.data = self.resting(p)
        if self.optimizer_on_cpu:
            for p in self.trainable:
                p.data = p.data.to("cpu")
                if p.grad is not None:
                    p.grad = p.grad.to("cpu")

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
