"""A plan's wire text: its version written first by its writer (not by pydantic's field
order), its body dumped once for the copies of a plan that change only the version, kept by
the plan itself (no module-global cache)."""

from __future__ import annotations

import json

from weightsync.transport.packing import plan_buckets
from weightsync.types import (
    HeldPlan,
    TensorSpec,
    TransferPlan,
    plan_json,
    plan_text_for,
    plan_version,
    versionless,
)


def _plan(n: int = 30) -> TransferPlan:
    specs = [TensorSpec(name=f"t{i}", dtype="float32", shape=(8, i + 1)) for i in range(n)]
    return plan_buckets(specs, 1 << 10, 3)


def test_the_wire_text_parses_back_to_the_plan_and_names_its_version():
    plan = _plan()
    text = plan_json(plan)
    assert TransferPlan.model_validate_json(text) == plan
    assert plan_version(text) == 3 and json.loads(versionless(text)) == \
        json.loads(plan.model_dump_json(exclude={"version"}))


def test_the_body_is_dumped_once_for_copies_that_change_only_the_version():
    plan = _plan()
    body, key = plan.body()
    later = plan.model_copy(update={"version": 9})
    assert later.body()[0] is body and later.body()[1] == key  # not dumped again
    assert plan_version(plan_json(later)) == 9 and versionless(plan_json(later)) == body
    partial = plan.model_copy(update={"partial": True})  # anything else: its own body
    assert partial.body()[0] != body and json.loads(plan_json(partial))["partial"] is True
    assert plan.body()[0] == body  # (and the original's is still right)
    assert later == plan.model_copy(update={"version": 9})  # the kept body is no part of ==


def test_a_plan_written_in_another_field_order_is_held_whole():
    plan = _plan()
    other = json.dumps({**json.loads(plan.model_dump_json(exclude={"version"})), "version": 3})
    held = HeldPlan()
    assert held.text(other) == other and held.key is not None
    assert TransferPlan.model_validate_json(held.text(other)) == plan
    assert plan_text_for(plan, held.key) == plan_json(plan)  # not the same key: sent whole
