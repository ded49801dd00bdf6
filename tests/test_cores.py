"""A node's cores shared by demand (serving.runtime.cores): a replica runs wide only while the others on its
node are idle, sees a busy one at once, and a slot left by a dead process is taken again."""
import multiprocessing
import os
import time

import pytest

from serving.runtime import threads_for
from serving.runtime.cores import HOLD_S, SHARE_ENV, NodeCores, usable_cores


@pytest.fixture
def node(tmp_path):
    return dict(node_id="test", directory=str(tmp_path))


def test_alone_until_another_replica_is_busy(node):
    a, b = NodeCores(**node), NodeCores(**node)
    assert a.slot != b.slot
    assert a.alone() and b.alone()
    with b.busy():
        assert not a.alone()
        assert b.alone()  # its own forward does not count against it
    assert not a.alone()  # b is still busy for HOLD_S: the gap between two engine steps
    time.sleep(HOLD_S * 2)
    assert a.alone()


def _hold_a_slot(node, ready, release):
    cores = NodeCores(**node)
    with cores.busy():
        ready.set()
        release.wait(10)


def test_another_process_is_seen_and_its_slot_reused_when_it_is_gone(node):
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    other = ctx.Process(target=_hold_a_slot, args=(node, ready, release))
    other.start()
    assert ready.wait(30)
    mine = NodeCores(**node)
    assert not mine.alone()  # the other process is in a forward
    release.set()
    other.join(10)
    time.sleep(HOLD_S * 2)
    assert mine.alone()
    again = NodeCores(**node)  # takes the dead process's slot, not a new one
    assert again.slot in {0, 1} and again.slot != mine.slot


def test_threads_reserve_one_per_cpu_and_may_use_the_node(monkeypatch):
    monkeypatch.setenv(SHARE_ENV, "1")
    t = threads_for(1)
    assert t.reserved == 1 and t.node == max(1, usable_cores())
    monkeypatch.delenv(SHARE_ENV)  # off by default
    assert threads_for(1).node == 1 and not threads_for(1).shared
    assert usable_cores() <= len(os.sched_getaffinity(0))


def test_the_table_of_a_node_whose_replicas_are_all_gone_is_removed(node, tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    other = ctx.Process(target=_hold_a_slot, args=(dict(node, node_id="old"), ready, release))
    other.start()
    assert ready.wait(30)
    NodeCores(**node)
    assert (tmp_path / "genserve-cores-old").exists()  # its replica still runs
    release.set()
    other.join(10)
    NodeCores(**node)
    assert not (tmp_path / "genserve-cores-old").exists() and (tmp_path / "genserve-cores-test").exists()
