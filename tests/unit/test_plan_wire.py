"""A plan on the wire (``weightsync.plan_wire``): its version a value of its own beside its
body, the body dumped by pydantic once for the copies of a plan that change only the version,
kept by the plan itself (no module-global cache), and named by key to a receiver that holds
it; a receiver parses each body once."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from weightsync.errors import PlanNotHeld
from weightsync.plan_wire import HeldPlan, PlanMessage, plan_message
from weightsync.transport.packing import plan_buckets
from weightsync.types import PlanBody, TensorSpec, TransferPlan


def _plan(n: int = 30) -> TransferPlan:
    specs = [TensorSpec(name=f"t{i}", dtype="float32", shape=(8, i + 1)) for i in range(n)]
    return plan_buckets(specs, 1 << 10, 3)


def _message(text: str) -> PlanMessage:
    return PlanMessage.model_validate_json(text)


def test_the_message_carries_the_version_beside_a_body_that_parses_back_to_the_plan():
    plan = _plan()
    msg = _message(plan_message(plan))
    assert msg.version == 3 and msg.key == plan.body().key and msg.body is not None
    assert json.loads(msg.body) == json.loads(plan.model_dump_json(exclude={"version"}))
    assert PlanBody.model_validate_json(msg.body).at(3) == plan
    assert TransferPlan.model_validate_json(plan.model_dump_json()) == plan
    with pytest.raises(ValidationError):  # a version is 1 or more, on the wire too
        PlanMessage(version=0, key=msg.key)
    with pytest.raises(ValueError, match="1 or more"):
        plan.at(0)


def test_the_body_is_dumped_once_for_copies_that_change_only_the_version():
    plan = _plan()
    body = plan.body()
    text, key = body.json_text, body.key
    later = plan.at(9)
    assert later.version == 9 and later.body() is body and later.body().json_text is text
    assert plan.model_copy(update={"version": 9}).body() is body
    assert _message(plan_message(later)).version == 9 and body.json_text is text
    partial = plan.model_copy(update={"partial": True})  # anything else: its own body
    assert partial.body() is not body and partial.body().key != key
    assert json.loads(partial.body().json_text)["partial"] is True
    assert plan.body() is body and body.key == key  # (and the original's is still right)
    assert later == plan.model_copy(update={"version": 9})  # the kept body is no part of ==
    assert later.at(3) == plan and hash(later.at(3)) == hash(plan)


def test_a_repeat_sync_names_the_body_by_key_and_a_changed_one_is_sent_whole():
    plan = _plan()
    held = plan.body().key
    again = _message(plan_message(plan.at(4), held))
    assert (again.version, again.key, again.body) == (4, held, None)
    changed = plan.model_copy(update={"chain_chunk": 1 << 20}).at(5)
    whole = _message(plan_message(changed, held))
    assert whole.body is not None and whole.key != held and whole.version == 5
    assert _message(plan_message(plan, None)).body is not None  # nothing known: whole


def test_a_receiver_parses_each_body_once_and_makes_each_version_from_it():
    plan = _plan()
    held = HeldPlan()
    first = held.plan(plan_message(plan))
    assert first == plan and held.key == plan.body().key
    again = held.plan(plan_message(plan.at(7), held.key))
    assert again == plan.at(7) and again.buckets is first.buckets  # not parsed again
    assert held.plan(plan_message(plan.at(8))).buckets is first.buckets  # whole, same body
    other = plan.model_copy(update={"partial": True})
    assert held.plan(plan_message(other.at(9), held.key)) == other.at(9)  # sent whole
    assert held.key == other.body().key


def test_a_body_named_that_is_not_held_is_refused_and_nothing_held_changes():
    plan = _plan()
    with pytest.raises(PlanNotHeld, match="not held"):
        HeldPlan().plan(plan_message(plan, plan.body().key))
    held = HeldPlan()
    held.plan(plan_message(plan))
    other = plan.model_copy(update={"partial": True})
    with pytest.raises(PlanNotHeld, match="not held"):
        held.plan(plan_message(other, other.body().key))
    bad = PlanMessage(version=2, key="k" * 24, body='{"buckets": 1}').model_dump_json()
    with pytest.raises(ValidationError):  # a malformed body is not held either
        held.plan(bad)
    assert held.key == plan.body().key
    assert held.plan(plan_message(plan.at(6), held.key)) == plan.at(6)


def test_a_host_forwards_the_body_it_holds_without_parsing_it():
    plan = _plan()
    held = HeldPlan()
    whole = held.read(plan_message(plan))
    assert whole.body == plan.body().json_text and held.key == whole.key
    named = held.read(plan_message(plan.at(5), held.key))
    assert named == whole.model_copy(update={"version": 5})  # the held body, filled in
    assert named.by_key().body is None and named.by_key().key == held.key
    with pytest.raises(PlanNotHeld):
        HeldPlan().read(named.by_key().model_dump_json())
    unparsed = PlanMessage(version=1, key="k" * 24, body="not JSON: a host never parses it")
    assert held.read(unparsed.model_dump_json()) == unparsed and held.key == "k" * 24
