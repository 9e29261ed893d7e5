"""Thread settings of a query process, and background threads that yield to queries."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from explainer.background import yield_to_queries
from explainer.cli.threads import QUERY_ENV, tune_for_queries


def test_query_commands_get_quiet_thread_pools_and_a_users_choice_is_kept() -> None:
    env: dict[str, str] = {}
    assert tune_for_queries(["search", "a dog", "--json"], env) and env == QUERY_ENV
    env = {"OPENBLAS_NUM_THREADS": "4"}
    assert tune_for_queries(["--quiet", "serve"], env)
    assert env["OPENBLAS_NUM_THREADS"] == "4" and env["OMP_WAIT_POLICY"] == "PASSIVE"
    for argv in (["index", "photos"], ["--help"], [], ["searchx"]):  # indexing keeps its full pools
        env = {}
        assert not tune_for_queries(argv, env) and env == {}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_a_background_thread_lowers_only_its_own_priority() -> None:
    seen: dict[str, int] = {}

    def work() -> None:
        seen["ok"] = int(yield_to_queries(10))
        yield_to_queries(10)  # again: no further change
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    t = threading.Thread(target=work)
    t.start()
    t.join()
    if not seen["ok"]:
        pytest.skip("this sandbox does not let a thread change its priority")
    assert seen["nice"] == max(before, 10)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before
    assert not yield_to_queries(0)
