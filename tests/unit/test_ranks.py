"""Rank arithmetic of a transfer group with engines of any worker count (transport.ranks)."""

from __future__ import annotations

import pytest

from weightsync.engine.vllm_compat import cpu_threads_bind
from weightsync.errors import ConfigError, TransferError
from weightsync.transport.ranks import GroupRanks, worker_group_rank


def test_offsets_advance_by_each_engines_worker_count():
    ranks = GroupRanks.of({"a": 2, "b": 1, "c": 4})
    assert ranks.world_size == 1 + 2 + 1 + 4
    assert [ranks.offset(n) for n in "abc"] == [1, 3, 4]
    assert [list(ranks.ranks(n)) for n in "abc"] == [[1, 2], [3], [4, 5, 6, 7]]
    # every worker of every engine gets a rank of its own, and together they fill the group
    every = [worker_group_rank(ranks.offset(n), w, dict(ranks.workers)[n], ranks.world_size)
             for n in "abc" for w in range(dict(ranks.workers)[n])]
    assert every == list(range(1, ranks.world_size))
    assert ranks.owner(5) == ("c", 1)


def test_two_tp2_engines_do_not_collide():
    """The bug this fixes: offsets 1 + i with two-worker engines gave both rank 2."""
    ranks = GroupRanks.of({"a": 2, "b": 2})
    assert set(ranks.ranks("a")).isdisjoint(ranks.ranks("b"))
    assert ranks.world_size == 5


def test_bad_layouts_are_typed_errors():
    with pytest.raises(ConfigError):
        GroupRanks.of({})
    with pytest.raises(ConfigError):
        GroupRanks.of({"a": 0})
    with pytest.raises(TransferError, match="outside its engine"):
        worker_group_rank(1, 2, 2, 5)  # an engine of 2 workers has no worker rank 2
    with pytest.raises(TransferError, match="outside a group of 4"):
        worker_group_rank(3, 1, 2, 4)  # the sender sized the group too small
    with pytest.raises(ConfigError):
        GroupRanks.of({"a": 1}).owner(0)  # rank 0 is the trainer's


def test_cpu_threads_bind_gives_every_worker_a_core_list():
    for workers in (2, 3, 4):
        bind = cpu_threads_bind(workers)
        assert len(bind.split("|")) == workers and all(bind.split("|"))
    assert cpu_threads_bind(2, "0|1") == "0|1"  # a value that fits is kept
    assert cpu_threads_bind(2, "nobind") == "nobind"
    for misfit in ("auto", "0-1", "0|1|0"):  # auto needs a NUMA node per worker
        assert len(cpu_threads_bind(2, misfit).split("|")) == 2
