"""Which layout a sync's plan is in, and whether the engines accept it.

A sync sends the engines' kernel layout (their in-memory parameters, packed as they hold them:
no conversion on load) only when every target verified the same one and the weights cover it;
otherwise the checkpoint format, which every engine converts as it loads. Either way, every
engine checks the plan against its model before any engine begins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from weightsync.coordination.reach import Reach, raise_refusal
from weightsync.errors import ConfigError
from weightsync.messages import LayoutStatus
from weightsync.plan_wire import plan_message
from weightsync.sources.base import WeightSource
from weightsync.transport.layout import KernelLayout
from weightsync.transport.packing import plan_buckets
from weightsync.types import EngineStatus, TensorSpec, TransferPlan


class LayoutNegotiator:
    """Owns what the engines agreed on: the verified kernel layout by set of engines (dropped
    on any failure, reload or restart: ``forget_layouts``), the plan planned once per layout
    (the same bucket objects every sync let the IPC leg reuse its packing views), and which
    plan each engine accepted for the model it serves (not asked again until either
    changes)."""

    def __init__(self, reach: Reach) -> None:
        self.reach = reach
        self._layouts: dict[tuple[str, ...], KernelLayout] = {}  # engine set -> verified
        self._kernel_plan: tuple[KernelLayout, TransferPlan] | None = None
        self._accepted: dict[str, tuple[str | None, str]] = {}  # engine -> (model, body key)
        self._models: dict[str, str] = {}  # the model each engine served, as last seen

    def saw(self, statuses: Sequence[EngineStatus]) -> None:
        """The models the engines serve, as asked now."""
        self._models = {s.name: s.model for s in statuses}

    def forget_layouts(self) -> None:
        self._layouts.clear()

    def forget(self, name: str) -> None:
        """Engine ``name`` was replaced: its layout and model may differ."""
        self._layouts.clear()
        self._accepted.pop(name, None)

    def plan(self, names: list[str], source: WeightSource, specs: Sequence[TensorSpec],
             version: int, partial: bool) -> tuple[TransferPlan, Mapping[str, Any], str | None]:
        """(the plan, the tensors ``source`` feeds it, why not the kernel layout if not)."""
        layout, note = self.layout(names, {s.name for s in specs}) \
            if source.random_access else (None, "a streamed source is sent in its own order")
        if layout is not None:
            plan = self.kernel_plan(layout, version)
            return plan, source.feed(plan, {p.name: [n for n, _ in p.parts]
                                            for p in layout.params}), None
        plan = plan_buckets(specs, self.reach.transfer.bucket_bytes, version)
        plan = plan.model_copy(update={"partial": partial})
        return plan, source.feed(plan), note

    def layout(self, names: list[str], tensors: set[str]
               ) -> tuple[KernelLayout | None, str | None]:
        """The verified kernel layout every target shares, or (None, why not)."""
        mode = self.reach.transfer.layout
        if mode == "checkpoint":
            return None, "checkpoint format requested"
        cached = self._layouts.get(tuple(sorted(names)))
        if cached is not None:  # verified once; dropped on any failure, reload or restart
            if not {n for p in cached.params for n, _ in p.parts} - set(tensors):
                return cached, None
        engines = self.reach.engines
        ok, bad = engines.each(names, engines.kernel_layout, self.reach.deadlines.verify)
        statuses: list[LayoutStatus] = list(ok.values())
        note = None
        if bad:
            note = f"layout query failed on {sorted(bad)}"
        elif not all(s.verified for s in statuses):
            note = "; ".join(sorted({s.reason for s in statuses if not s.verified}))
        elif len({s.signature for s in statuses}) != 1 or statuses[0].layout is None:
            note = "engines report different kernel layouts"
        else:
            layout = statuses[0].layout
            self._layouts[tuple(sorted(names))] = layout
            missing = {n for p in layout.params for n, _ in p.parts} - set(tensors)
            if not missing:
                return layout, None
            note = f"partial update ({len(missing)} checkpoint tensors not sent)"
        if mode == "kernel":
            raise ConfigError(f"kernel layout unavailable: {note}")
        return None, note

    def kernel_plan(self, layout: KernelLayout, version: int) -> TransferPlan:
        """The plan of ``layout`` at ``version``: its buckets planned once per layout object."""
        cached = self._kernel_plan
        if cached is None or cached[0] is not layout:
            plan = plan_buckets([layout.spec(p) for p in layout.params],
                                self.reach.transfer.bucket_bytes, version)
            cached = self._kernel_plan = (layout, plan.model_copy(update={"format": "kernel"}))
        return cached[1].at(version)  # (its body, and that body's JSON, made once)

    def validate(self, names: list[str], plan: TransferPlan) -> None:
        """Every engine checks the plan against its model (``ManifestError`` before anything
        is touched). Whether a plan fits depends on the plan and the engine's model only, so
        an engine that accepted this plan's body (its version aside) is not asked again until
        it is replaced (``forget``): the kernel-layout plan is the same every sync."""
        body = plan.body().key
        key = {n: (self._models.get(n), body) for n in names}  # (the model it serves, plan)
        ask = [n for n in names if self._accepted.get(n) != key[n]]
        if not ask:
            return
        engines = self.reach.engines
        whole = plan_message(plan)  # (what an engine holds is known only once it begins)
        _, bad = engines.each(ask, lambda n: engines.validate(n, whole),
                              self.reach.deadlines.verify)
        raise_refusal(bad)
        self._accepted.update({n: key[n] for n in ask})
