"""Checkpoint names for transformers models, from transformers' own save-time conversion.

transformers 5 holds some models in memory in another layout than their checkpoints — fused
MoE experts (``mlp.experts.gate_up_proj``, 3-D), Qwen2-VL's ``model.visual.*`` — and converts
back only when it saves (``save_pretrained`` -> ``core_model_loading.revert_weight_conversion``).
The engines validate against checkpoint names, so a trainer's in-memory module is converted the
same way here, with transformers' own reversed transforms: no table per model.

``revert_weight_conversion`` converts a whole state dict at once, which a trainer that gathers
a bucket at a time cannot hold. So the same work is split in two: ``CheckpointNames.of`` groups
the in-memory names exactly as that function does (the tensors one reversed transform needs
together) and derives the checkpoint specs on meta tensors (no data moves); ``convert`` applies
the same transform to one group's real tensors when its bucket is due. This is the only module
that imports transformers' conversion internals (read in transformers 5.19; the unit test
``test_hf_names`` compares the result with ``revert_weight_conversion`` itself and with
``save_pretrained``'s files, so a drift shows there).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from weightsync.errors import ManifestError
from weightsync.transport.packing import spec_of, torch_dtype
from weightsync.types import TensorSpec


@dataclass(frozen=True)
class Slice:
    """A checkpoint tensor as rows ``start:stop`` of an in-memory tensor (viewed as rows of its
    last dimension) in ``shape``; the whole tensor, renamed, when ``start`` is None."""

    source: str
    start: int | None
    stop: int | None
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Group:
    """In-memory tensors one reversed transform turns into checkpoint tensors."""

    sources: tuple[str, ...]  # in-memory names, in the order transformers feeds them
    patterns: tuple[str | None, ...]  # the transform's source pattern each one matched
    outputs: tuple[TensorSpec, ...]  # checkpoint names, shapes and dtypes
    transform: Any  # a reversed ``WeightTransform`` (a template: copied per use), or None
    key: str  # the name transformers keys the group by (its first target)

    @property
    def renames_only(self) -> bool:
        return self.transform is None


def _reversed_transforms(model: torch.nn.Module) -> list | None:
    """The reversed transforms ``revert_weight_conversion`` would apply to ``model``, or None."""
    from transformers.core_model_loading import PrefixChange

    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:  # built, not loaded: the model type's default mapping
        from transformers.conversion_mapping import get_model_conversion_mapping

        conversions = get_model_conversion_mapping(model, add_legacy=False)
        conversions = [c for c in conversions if not isinstance(c, PrefixChange)] or None
    if not conversions:
        return None
    return [c.reverse_transform() for c in conversions[::-1]]  # sub-models' first


class CheckpointNames:
    """How a transformers model's in-memory tensors map to its checkpoint tensors."""

    def __init__(self, model: torch.nn.Module, groups: list[Group]) -> None:
        self.model = model
        self.groups = groups
        self.group_of = {o.name: g for g in groups for o in g.outputs}

    @classmethod
    def of(cls, model: torch.nn.Module, specs: Sequence[TensorSpec]) -> CheckpointNames | None:
        """The conversion of ``specs`` (``model``'s tensors, in its order), or None when
        transformers saves them under the same names (no conversion known for the model, or
        ``model`` is not a transformers model)."""
        if not hasattr(model, "config") or not _is_transformers_model(model):
            return None
        reversed_ = _reversed_transforms(model)
        if reversed_ is None:
            return None
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )

        renamings = [t for t in reversed_ if isinstance(t, WeightRenaming)]
        converters = [t for t in reversed_ if isinstance(t, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        # grouping as in revert_weight_conversion: sorted keys, one group per renamed key
        members: dict[str, list[tuple[str, str | None]]] = {}
        for name in sorted((s.name for s in specs), key=dot_natural_key):
            renamed, pattern = rename_source_key(name, renamings, converters, reverse=True)
            members.setdefault(renamed, []).append((name, pattern))
        by_name = {s.name: s for s in specs}
        first = {s.name: i for i, s in enumerate(specs)}
        groups = []
        for key, srcs in members.items():
            pattern = srcs[0][1]
            if pattern is None:  # a renaming: the same tensor under the checkpoint's name
                if len(srcs) > 1:
                    raise ManifestError(f"{[n for n, _ in srcs]} would all be saved as {key!r}")
                outputs = (by_name[srcs[0][0]].model_copy(update={"name": key}),)
                groups.append(Group((srcs[0][0],), (None,), outputs, None, key))
                continue
            template = by_pattern[pattern]
            metas = {n: torch.empty(by_name[n].shape, dtype=torch_dtype(by_name[n].dtype),
                                    device="meta") for n, _ in srcs}
            group = Group(tuple(n for n, _ in srcs), tuple(p for _, p in srcs), (), template,
                          key)
            out = _apply(model, group, metas)
            groups.append(Group(group.sources, group.patterns,
                                tuple(spec_of(n, t) for n, t in out.items()), template, key))
        names = [o.name for g in groups for o in g.outputs]
        if len(names) != len(set(names)):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ManifestError(f"checkpoint names produced twice by the conversion: {dup[:5]}")
        if all(g.renames_only and g.outputs[0].name == g.sources[0] for g in groups):
            return None  # nothing is renamed or converted
        groups.sort(key=lambda g: min(first[n] for n in g.sources))  # the model's own order
        return cls(model, groups)

    @property
    def specs(self) -> list[TensorSpec]:
        return [o for g in self.groups for o in g.outputs]

    def convert(self, group: Group, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The checkpoint tensors of ``group`` from its in-memory ``tensors`` (views where the
        transform slices, e.g. per-expert weights of a fused expert tensor)."""
        if group.renames_only:
            return {group.outputs[0].name: tensors[group.sources[0]]}
        out = _apply(self.model, group, tensors)
        want = {o.name: o for o in group.outputs}
        if set(out) != set(want):
            raise ManifestError(f"the conversion of {group.sources[0]!r} produced {sorted(out)[:4]}"
                                f", expected {sorted(want)[:4]}")
        return out

    def slices(self, named: dict[str, torch.Tensor]) -> dict[str, Slice] | None:
        """Where each checkpoint tensor lies in the in-memory tensor it comes from, when the
        conversion only renames or slices whole rows out of one tensor (fused MoE experts
        split per expert, renamed towers) — else None, and ``convert`` makes them per bucket.
        Depends on the tensors' shapes only (``views`` applies it to the tensors at hand).

        transformers' own ops copy (``Chunk`` makes its chunks contiguous): a whole fused
        expert tensor per layer and sync. Which rows each output takes is found by running
        the same reversed transform on a probe — the source with its last dimension cut to 2,
        holding each element's index — so no table per model is needed; an output whose probe
        is not one run of consecutive rows (or whose shape does not follow) means no slices.
        Check the result once against transformers' real conversion (``verify_views``).
        """
        out: dict[str, Slice] = {}
        for group in self.groups:
            if group.renames_only:
                o = group.outputs[0]
                out[o.name] = Slice(group.sources[0], None, None, o.shape)
                continue
            if len(group.sources) != 1:
                return None
            src = named[group.sources[0]]
            if src.dim() < 1 or not src.is_contiguous():
                return None
            width = src.shape[-1] if src.dim() > 1 else 1
            rows = src.numel() // width if width else 0
            # the probe: 2 columns (a size-1 dimension could be squeezed), each element its
            # index in a [rows, 2] matrix; an output taking whole rows holds a run of them
            lead = tuple(src.shape[:-1]) if src.dim() > 1 else (rows,)
            probe = torch.arange(rows * 2, dtype=torch.float64).view(*lead, 2)
            try:
                got = _apply(self.model, group, {group.sources[0]: probe})
            except ManifestError:
                return None
            for o in group.outputs:
                p = got.get(o.name)
                want = (*o.shape[:-1], 2) if src.dim() > 1 else (*o.shape, 2)
                if p is None or tuple(p.shape) != want or (src.dim() > 1 and
                                                           o.shape[-1] != width):
                    return None
                idx = p.reshape(-1)
                first = int(idx[0]) if idx.numel() else 0
                if first % 2 or not torch.equal(
                        idx, torch.arange(first, first + idx.numel(), dtype=torch.float64)):
                    return None
                out[o.name] = Slice(group.sources[0], first // 2, (first + idx.numel()) // 2,
                                    o.shape)
        return out

    @staticmethod
    def views(slices: dict[str, Slice], named: dict[str, torch.Tensor]
              ) -> dict[str, torch.Tensor]:
        """The checkpoint tensors as views of ``named`` (contiguous, of the shapes ``slices``
        was found for)."""
        out = {}
        for name, sl in slices.items():
            src = named[sl.source]
            if sl.start is None:
                out[name] = src
            else:
                width = src.shape[-1] if src.dim() > 1 else 1
                out[name] = src.view(-1, width)[sl.start:sl.stop].view(sl.shape)
        return out

    def verify_views(self, views: dict[str, torch.Tensor], named: dict[str, torch.Tensor]
                     ) -> str | None:
        """Compare ``views`` with transformers' own conversion of ``named``, a group at a time;
        the first difference, or None."""
        for group in self.groups:
            if group.renames_only:
                continue
            real = self.convert(group, {n: named[n] for n in group.sources})
            for name, t in real.items():
                if not torch.equal(views[name], t):
                    return f"{name} differs from transformers' conversion"
        return None


def _apply(model, group: Group, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``group``'s reversed transform on ``tensors``, as ``revert_weight_conversion`` runs it
    (a fresh copy of the transform per group, tensors added in sorted-name order)."""
    transform = copy.deepcopy(group.transform)
    for name, pattern in zip(group.sources, group.patterns, strict=True):
        transform.add_tensor(group.key, name, pattern, tensors[name])
    try:
        realized = transform.convert(group.key, model=model, config=model.config)
    except Exception as e:
        raise ManifestError(f"transformers cannot convert {group.sources[0]!r} to its checkpoint "
                            f"names: {type(e).__name__}: {e}") from e
    return {k: (v[0] if isinstance(v, list) else v) for k, v in realized.items()}


def _is_transformers_model(model: torch.nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)
