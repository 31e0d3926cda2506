"""Trainer-side weight sources: what a sync sends, known before any data moves.

A ``WeightSource`` gives its tensors' checkpoint names, dtypes and shapes first (``specs``; the
coordinator plans buckets from them and every engine validates the plan before it is touched),
then, once the plan is known, a ``feed``: the mapping the transfer legs pack buckets from
(``pack_bucket(bucket, feed, ...)``). A source that holds every tensor (a module, a state dict)
feeds a plain dict of them; one that produces tensors (a stream, a sharded module gathered per
bucket, a module whose checkpoint layout differs from its in-memory one) feeds a ``BucketFeed``,
which makes one bucket's tensors when the leg first asks for one of them and lets the previous
bucket's go, so a sync holds about one bucket of produced tensors at a time.

``as_source`` turns what ``SyncCoordinator.sync`` accepts (a module, a mapping, an iterable of
pairs, or a source) into a source.
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from weightsync.errors import ConfigError, TransferError, WeightSyncError
from weightsync.sources.hf_names import CheckpointNames, Group, Slice
from weightsync.transport.feed import HeldFeed
from weightsync.transport.packing import dtype_name, named_tensors, spec_of
from weightsync.types import TensorSpec, TransferPlan

Parts = Mapping[str, Sequence[str]]  # kernel-layout slot -> the checkpoint tensors stacked in it


class WeightSource(ABC):
    """Tensors to sync: metadata first, data only once the plan is made."""

    #: tensors can be produced in any order (the kernel layout regroups them); a stream cannot
    random_access: bool = True

    @abstractmethod
    def specs(self) -> list[TensorSpec]:
        """Every tensor's checkpoint name, dtype and shape, in this source's order. Moves no
        data."""

    @abstractmethod
    def feed(self, plan: TransferPlan, parts: Parts | None = None) -> Mapping[str, Any]:
        """What the legs pack ``plan``'s buckets from: slot name -> tensor (or, with
        ``parts``, the list of tensors stacked in that kernel-layout slot)."""


def order_of(plan: TransferPlan, parts: Parts | None) -> list[list[str]]:
    """The checkpoint tensors each bucket of ``plan`` needs, in packing order."""
    return [[n for s in b.slots for n in (parts[s.name] if parts else (s.name,))]
            for b in plan.buckets]


class TensorsSource(WeightSource):
    """Named tensors all held already (a module's parameters, a state dict): the feed is a
    dict of them, as the legs always packed from. ``held``: the tensors stay where they are
    while this source is reused (then its kernel-layout feed is a ``HeldFeed``)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor],
                 specs: Sequence[TensorSpec] | None = None, *, held: bool = False) -> None:
        self.tensors = dict(tensors)
        self._specs = list(specs) if specs is not None else None
        self._held = held
        self._fed: tuple[Parts, HeldFeed] | None = None

    def specs(self) -> list[TensorSpec]:
        if self._specs is not None:
            return list(self._specs)
        return [spec_of(n, t) for n, t in self.tensors.items()]

    def feed(self, plan: TransferPlan, parts: Parts | None = None) -> Mapping[str, Any]:
        if parts is None:
            return self.tensors
        if self._fed is not None and self._fed[0] == parts:
            return self._fed[1]
        fed = {slot: [self.tensors[n] for n in names] for slot, names in parts.items()}
        if not self._held:
            return fed
        self._fed = (parts, HeldFeed(fed))
        return self._fed[1]


class Producer(ABC):
    """Makes checkpoint tensors on demand, a bucket's worth at a time, in the order asked."""

    @abstractmethod
    def produce(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names``, which are the next ones the sync needs."""

    def restart(self) -> None:
        """The sync reads its tensors again from the first bucket (a second wave)."""


class BucketFeed(Mapping):
    """The legs' mapping over a ``Producer``: asking for a slot of bucket k makes all of bucket
    k (``produce``) and drops bucket k-1's tensors; asking again within bucket k is free (a
    leg reads each slot more than once while packing). ``announce(k)`` runs before bucket k is
    made (a sharded source tells its other ranks). A failure to produce is a ``TransferError``
    naming the bucket, which the legs turn into a failed sync like any other."""

    transient = True  # a bucket's tensors live only while it is current (no graph replays them)

    def __init__(self, order: list[list[str]], producer: Producer, parts: Parts | None = None,
                 announce: Callable[[int], None] | None = None) -> None:
        self.order, self.producer, self.parts, self.announce = order, producer, parts, announce
        self.bucket_of = {n: k for k, names in enumerate(order) for n in names}
        if parts:
            self.bucket_of.update({slot: self.bucket_of[names[0]]
                                   for slot, names in parts.items() if names})
        self.current: int | None = None
        self.tensors: dict[str, torch.Tensor] = {}

    def load(self, k: int) -> dict[str, torch.Tensor]:
        """Make bucket ``k``'s tensors (the previous bucket's are dropped first)."""
        if self.current == k:
            return self.tensors
        self.tensors = {}  # let the previous bucket's tensors go before making the next
        if self.current is not None and k <= self.current:
            self.producer.restart()
        self.current = k
        try:
            if self.announce is not None:
                self.announce(k)
            with torch.no_grad():
                self.tensors = self.producer.produce(self.order[k])
        except WeightSyncError:
            raise
        except Exception as e:
            raise TransferError(f"the weight source failed making bucket {k}: "
                                f"{type(e).__name__}: {e}") from e
        return self.tensors

    def __getitem__(self, name: str) -> Any:
        """The slot's tensor, or a list of tensors stacked along dim 0 into it (kernel-layout
        parts; a sharded tensor's per-rank row blocks)."""
        k = self.bucket_of.get(name)
        if k is None:
            raise KeyError(name)
        tensors = self.load(k)
        if self.parts and name in self.parts:  # row blocks of the parts, stacked along dim 0
            return [b for n in self.parts[name]
                    for b in (tensors[n] if isinstance(tensors[n], list) else [tensors[n]])]
        return tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.bucket_of)

    def __len__(self) -> int:
        return len(self.bucket_of)


Gather = Callable[[Mapping[str, torch.Tensor], Sequence[str]], tuple[dict[str, Any], int]]


def _local(named: Mapping[str, torch.Tensor], srcs: Sequence[str]) -> tuple[dict[str, Any], int]:
    return {n: named[n] for n in srcs}, 0


def whole(value: Any) -> torch.Tensor:
    """A tensor given as row blocks (stacked along dim 0), as one tensor."""
    return torch.cat(value) if isinstance(value, list) else value


class ModuleTensors(Producer):
    """A module's in-memory tensors as checkpoint tensors: each conversion group (transformers'
    own, ``hf_names``) is converted when its first output is due and kept until every output
    was handed out. ``gather(named, names)`` makes the in-memory tensors a bucket needs whole
    (a sharded module's shards, gathered; every rank calls it with the same names in the same
    order) and returns them — a tensor, a list of row blocks, or None on a rank that only
    contributes its shards — with the bytes it allocated to do so. A gather whose ``borrowed``
    is true reuses its buffers for the next bucket: outputs kept past the bucket are copied."""

    def __init__(self, named: Mapping[str, torch.Tensor], names: CheckpointNames | None,
                 gather: Gather = _local) -> None:
        self.named, self.names, self.gather = dict(named), names, gather
        if names is None:
            self.groups = {n: Group((n,), (None,), (spec_of(n, t),), None, n)
                           for n, t in self.named.items()}
        else:
            self.groups = names.group_of
        self._ready: dict[str, Any] = {}  # converted, not handed out yet
        self._live: dict[int, tuple[Group, int]] = {}  # id -> (group, bytes it allocated)
        self.peak_held = 0  # the most bytes gathered and held at once (counted until the
        # bucket that took the last of a group's outputs is dropped)

    def specs(self) -> list[TensorSpec]:
        if self.names is not None:
            return self.names.specs
        return [g.outputs[0] for g in self.groups.values()]

    def produce(self, names: Sequence[str]) -> dict[str, Any]:
        # the previous bucket was dropped: only groups with outputs still to hand out hold memory
        self._live = {k: (g, b) for k, (g, b) in self._live.items()
                      if any(o.name in self._ready for o in g.outputs)}
        need: dict[int, Group] = {}
        for name in names:
            if name not in self._ready:
                need.setdefault(id(self.groups[name]), self.groups[name])
        srcs = [n for g in need.values() for n in g.sources]
        full, allocated = self.gather(self.named, srcs)
        for g in need.values():
            got = {n: full[n] for n in g.sources}
            if any(v is None for v in got.values()):  # this rank only sent its shards
                outputs = {o.name: None for o in g.outputs}
            elif self.names is not None:
                outputs = self.names.convert(g, {n: whole(v) for n, v in got.items()})
            else:
                outputs = {g.outputs[0].name: got[g.sources[0]]}
            self._ready.update(outputs)
            self._live[id(g)] = (g, 0)
        if need:  # the bucket's allocation, charged to its first new group
            first = next(iter(need))
            self._live[first] = (need[first], allocated)
        self.peak_held = max(self.peak_held, sum(b for _, b in self._live.values()))
        out = {name: self._ready.pop(name) for name in names}
        if getattr(self.gather, "borrowed", False):  # its buffers serve the next bucket too:
            for g in need.values():  # a group's outputs left for a later bucket get their own
                for o in g.outputs:
                    if self._ready.get(o.name) is not None:
                        self._ready[o.name] = whole(self._ready[o.name]).clone()
        return out

    def restart(self) -> None:
        self._ready.clear()
        self._live.clear()


@dataclass
class _Kept:
    """A module's checkpoint tensors as views of its own: where they lie (found and checked
    against transformers' conversion once per shape) and the views (while nothing moved)."""

    shapes: tuple  # the module's tensors' names, shapes, strides, dtypes: what slices depend on
    names: CheckpointNames
    slices: dict[str, Slice]
    where: tuple  # their addresses: what the views depend on
    source: TensorsSource


#: per module, its kept views (a module whose tensors are replaced, not updated in place, keeps
#: the old ones referenced here until its next sync)
_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _shapes(named: Mapping[str, torch.Tensor]) -> tuple:
    return tuple((n, t.shape, t.stride(), t.dtype) for n, t in named.items())


def _where(named: Mapping[str, torch.Tensor]) -> tuple:
    return tuple(t.data_ptr() for t in named.values())


class ModuleSource(WeightSource):
    """A module's parameters and persistent buffers (tied ones once), under checkpoint names:
    a transformers model whose in-memory layout differs from its checkpoint (fused MoE experts,
    renamed towers) is converted with transformers' own save-time transforms, a group at a
    time; any other module feeds its tensors as they are."""

    def __init__(self, module: torch.nn.Module, *, convert: bool = True) -> None:
        self.module = module
        named = dict(named_tensors(module))
        sharded = next((n for n, t in named.items() if type(t).__name__ == "DTensor"), None)
        if sharded is not None:  # its shards are not the tensors: every rank must take part
            raise ConfigError(f"{sharded} is sharded (a DTensor): sync a sharded module with "
                              "weightsync.sources.sharded.ShardedSync on every rank")
        self.producer: ModuleTensors | None = None
        self._plain: TensorsSource | None = None
        kept = _VIEWS.get(module) if convert else None
        if kept is not None and kept.shapes == _shapes(named):
            where = _where(named)
            if where != kept.where:  # moved (offloaded and back), same shapes: new views
                kept.where = where
                kept.source = TensorsSource(kept.names.views(kept.slices, named),
                                            kept.names.specs, held=True)
            self._plain = kept.source
            return
        specs = [spec_of(n, t) for n, t in named.items()]  # once: the plain path reuses them
        names = CheckpointNames.of(module, specs) if convert else None
        if names is None:
            self._plain = TensorsSource(named, specs)
            return
        slices = names.slices(named)
        views = names.views(slices, named) if slices is not None else None
        if views is not None and names.verify_views(views, named) is None:
            # checkpoint tensors as views of the module's own: no conversion, no copy; an
            # optimizer updates the module's tensors in place, so they stay valid
            self._plain = TensorsSource(views, names.specs, held=True)
            _VIEWS[module] = _Kept(_shapes(named), names, slices, _where(named), self._plain)
        else:
            self.producer = ModuleTensors(named, names)

    def specs(self) -> list[TensorSpec]:
        return self._plain.specs() if self._plain else self.producer.specs()

    def feed(self, plan: TransferPlan, parts: Parts | None = None) -> Mapping[str, Any]:
        if self._plain is not None:
            return self._plain.feed(plan, parts)
        self.producer.restart()
        return BucketFeed(order_of(plan, parts), self.producer, parts)


class IteratorSource(WeightSource):
    """A stream of ``(name, tensor)`` pairs, never collected: ``specs`` up front, then the
    tensors in exactly that order. ``tensors``: an iterable, or a callable returning a fresh
    iterator (needed when the stream is read twice: rolling waves)."""

    random_access = False

    def __init__(self, specs: Sequence[TensorSpec],
                 tensors: Iterable[tuple[str, torch.Tensor]]
                 | Callable[[], Iterable[tuple[str, torch.Tensor]]]) -> None:
        if not specs:
            raise ConfigError("a streamed source needs the specs of its tensors up front")
        self._specs = list(specs)
        self._tensors = tensors

    def specs(self) -> list[TensorSpec]:
        return list(self._specs)

    def feed(self, plan: TransferPlan, parts: Parts | None = None) -> Mapping[str, Any]:
        order = order_of(plan, parts)
        if [n for names in order for n in names] != [s.name for s in self._specs]:
            raise ConfigError("a streamed source is sent in its own order only")
        return BucketFeed(order, _Stream(self._specs, self._tensors), parts)


class _Stream(Producer):
    def __init__(self, specs: list[TensorSpec], tensors) -> None:
        self.specs = {s.name: s for s in specs}
        self.tensors = tensors
        self.passes = 0
        self.it: Iterator | None = None

    def _iterator(self) -> Iterator:
        if self.it is None:
            if self.passes and not callable(self.tensors):
                raise ConfigError("a one-shot iterator cannot be read twice (rolling waves): "
                                  "pass a callable that returns a fresh one")
            self.passes += 1
            self.it = iter(self.tensors() if callable(self.tensors) else self.tensors)
        return self.it

    def produce(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        out = {}
        it = self._iterator()
        for want in names:
            try:
                name, t = next(it)
            except StopIteration:
                raise ConfigError(f"the stream ended before {want!r}") from None
            spec = self.specs[want]
            if name != want or tuple(t.shape) != spec.shape or dtype_name(t.dtype) != spec.dtype:
                raise ConfigError(f"the stream gave {name!r} {dtype_name(t.dtype)}"
                                  f"{tuple(t.shape)} where its specs promised {want!r} "
                                  f"{spec.dtype}{spec.shape}")
            out[name] = t
        return out

    def restart(self) -> None:
        self.it = None


def as_source(weights: Any) -> WeightSource:
    """A ``WeightSource`` for what ``sync`` accepts: a source, a module, a mapping of name ->
    tensor, or an iterable of ``(name, tensor)`` pairs (collected: give an ``IteratorSource``
    with specs to stream instead)."""
    if isinstance(weights, WeightSource):
        return weights
    if isinstance(weights, torch.nn.Module):
        return ModuleSource(weights)
    return TensorsSource(dict(named_tensors(weights)))
