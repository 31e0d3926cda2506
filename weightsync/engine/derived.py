"""What the model computes with, recorded at start and checked after every load.

A sync that verified its bytes has not proved that the engine computes with them. vLLM keeps
state derived from the parameters after loading (CPU GEMM packs of every linear layer, tied
heads' packs of the embedding, repacked experts, quantized copies and scales), and CUDA graphs
replay reads of whatever storage was there when they were captured. So at engine start the
worker records (``ModelStorage.record``):

- every parameter's and buffer's storage (the tensor, its address, shape, dtype, stride);
- every group of modules that share a parameter (ties: ``lm_head`` and ``embed_tokens``);
- which modules keep derived state (they have a post-load hook, ``vllm_compat.post_load``).

After each load (``after_load``):

- every parameter and buffer is still its recorded storage, written in place. One that vLLM
  re-created with the same shape, dtype and stride is copied back into the recorded storage
  and put back (so a captured graph reads the new values); one re-created with another shape
  is a ``ReloadError`` on an engine whose graphs read it (the host fences it), and re-recorded
  on an eager one;
- every module that reads a written parameter through a tie had its derived state rebuilt:
  vLLM's reload rebuilds what a checkpoint tensor names, and no tensor names a tied head, so
  the head of a group whose other member was rebuilt is rebuilt here.

What had to be restored or rebuilt is returned as notes for the sync's report.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from weightsync.errors import ReloadError

logger = logging.getLogger(__name__)

_MODULE_SLOTS = ("_parameters", "_buffers", "_modules", "training")


@dataclass
class Slot:
    """A parameter or buffer as recorded: its owner, its name there, and its storage."""

    owner: torch.nn.Module
    attr: str
    kind: str  # "parameter" or "buffer"
    tensor: torch.Tensor  # the parameter (or buffer) object itself
    data: torch.Tensor  # its ``.data`` then: the storage graphs captured
    shape: tuple[int, ...]
    dtype: torch.dtype
    stride: tuple[int, ...]


def _derived_marks(module: torch.nn.Module) -> dict[str, Any]:
    """The objects a post-load hook leaves on a module besides its parameters and buffers
    (e.g. ``cpu_linear``, the CPU GEMM over a packed copy). Held, not only their ids: an id
    could be reused by the hook's new object once the old one is freed."""
    return {k: v for k, v in vars(module).items() if k not in _MODULE_SLOTS}


def _changed(now: dict[str, Any], before: dict[str, Any]) -> bool:
    """Whether a post-load hook ran: it set other objects than those recorded (identity)."""
    return now.keys() != before.keys() or any(now[k] is not before[k] for k in now)


class ModelStorage:
    """The model's storage, ties and derived state, as recorded at start; one per worker.

    ``post_load(module)`` is the module's post-load hook if it has one (None otherwise), and
    ``graphs`` whether captured graphs read the storage (CUDA graphs: a re-created tensor
    cannot be tolerated there).
    """

    def __init__(self, model: torch.nn.Module, post_load: Callable[[torch.nn.Module], Any],
                 *, graphs: bool) -> None:
        self.graphs = graphs
        self._post_load = post_load
        self.slots: dict[str, Slot] = {}
        self.ties: list[list[tuple[str, torch.nn.Module]]] = []
        self.hooked: dict[str, torch.nn.Module] = {}
        self._record(model)

    def _record(self, model: torch.nn.Module) -> None:
        by_storage: dict[int, list[tuple[str, torch.nn.Module]]] = {}
        for mname, module in model.named_modules(remove_duplicate=False):
            if self._post_load(module) is not None:
                self.hooked.setdefault(mname, module)
            for kind, table in (("parameter", module._parameters), ("buffer", module._buffers)):
                for attr, t in table.items():
                    if t is None:
                        continue
                    key = f"{mname}.{attr}" if mname else attr
                    self.slots[key] = Slot(owner=module, attr=attr, kind=kind, tensor=t,
                                           data=t.data, shape=tuple(t.shape), dtype=t.dtype,
                                           stride=tuple(t.stride()))
                    if kind == "parameter" and t.numel():
                        members = by_storage.setdefault(t.untyped_storage().data_ptr(), [])
                        if all(m is not module for _, m in members):
                            members.append((mname, module))
        self.ties = [g for g in by_storage.values() if len(g) > 1]

    def tie_names(self) -> list[list[str]]:
        return [[n for n, _ in g] for g in self.ties]

    def marks(self) -> dict[str, dict[str, Any]]:
        """Before a load: the derived state of every tied module with a post-load hook."""
        return {n: _derived_marks(m) for g in self.ties for n, m in g if n in self.hooked}

    def after_load(self, marks: dict[str, dict[str, Any]]) -> list[str]:
        """Check (and where it can, restore) the storage invariant and rebuild tied modules'
        derived state after a load; returns what was restored or rebuilt."""
        notes = self._restore_storage()
        notes += self._rebuild_ties(marks)
        return notes

    def _restore_storage(self) -> list[str]:
        notes: list[str] = []
        for key, slot in self.slots.items():
            table = slot.owner._parameters if slot.kind == "parameter" else slot.owner._buffers
            now = table.get(slot.attr)
            if now is None:
                raise ReloadError(f"{key}: the load removed this {slot.kind}")
            same_object = now is slot.tensor
            if same_object and now.data_ptr() == slot.data.data_ptr() and \
                    tuple(now.shape) == slot.shape:
                continue
            if tuple(now.shape) == slot.shape and now.dtype == slot.dtype and \
                    tuple(now.stride()) == slot.stride and now.device == slot.data.device:
                with torch.no_grad():
                    slot.data.copy_(now.data)
                    slot.tensor.data = slot.data
                table[slot.attr] = slot.tensor
                notes.append(f"restored storage: {key} (vLLM re-created it; copied back in "
                             "place)")
                continue
            if self.graphs and slot.data.numel():
                raise ReloadError(f"{key}: the load re-created this {slot.kind} as "
                                  f"{tuple(now.shape)} {now.dtype} (recorded {slot.shape} "
                                  f"{slot.dtype}): captured CUDA graphs would read the old "
                                  "storage")
            notes.append(f"re-recorded: {key} is now {tuple(now.shape)} {now.dtype}")
            self.slots[key] = Slot(owner=slot.owner, attr=slot.attr, kind=slot.kind, tensor=now,
                                   data=now.data, shape=tuple(now.shape), dtype=now.dtype,
                                   stride=tuple(now.stride()))
        return notes

    def _rebuild_ties(self, marks: dict[str, dict[str, Any]]) -> list[str]:
        notes: list[str] = []
        for group in self.ties:
            hooked = [(n, m) for n, m in group if n in marks]
            rebuilt = [n for n, m in hooked if _changed(_derived_marks(m), marks[n])]
            if not rebuilt:
                continue  # no member was loaded (or none keeps derived state)
            for name, module in hooked:
                if name in rebuilt:
                    continue
                hook = self._post_load(module)
                with torch.no_grad():
                    hook(module)
                notes.append(f"rebuilt derived state: {name} (tied to {', '.join(rebuilt)}, "
                             "which the load wrote; vLLM's reload does not rebuild it)")
        return notes
