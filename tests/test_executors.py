"""Executors: chosen by name, they run the same rounds and give the in-process result; Ray through a local instance."""

from __future__ import annotations

import os

import pytest

from ptutils.errors import ConfigError
from ptutils.executors import InProcess, LocalPool, make_executor
from ptutils.nest import Tuning

from .support.tuningkit import result, same, tuning


def test_an_executor_is_chosen_by_name_or_settings_and_refuses_what_it_does_not_know():
    assert isinstance(make_executor(None), InProcess) and isinstance(make_executor("inprocess"), InProcess)
    pool = make_executor({"kind": "pool", "workers": 3})
    try:
        assert isinstance(pool, LocalPool) and pool.capacity == 3
        assert make_executor(pool.settings()).settings() == pool.settings()
    finally:
        pool.close()
    with pytest.raises(ConfigError, match="executor.kind.*slurm"):
        make_executor("slurm")
    with pytest.raises(ConfigError, match="executor.workers"):
        make_executor({"kind": "pool", "workers": 0})
    with pytest.raises(ConfigError, match="executor.*unexpected keyword"):
        make_executor({"kind": "pool", "cores": 2})


def test_a_pool_on_a_machine_without_gpus_runs_children_on_the_cpu(monkeypatch):
    from ptutils import executors

    monkeypatch.setattr(executors, "local_gpus", lambda: [])
    pool = LocalPool(workers=1, gpus_per_child=1)
    try:
        assert [slot.env()["CUDA_VISIBLE_DEVICES"] for slot in pool._slots] == [""]  # hides every GPU: the CPU
    finally:
        pool.close()


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for the module (its start-up takes seconds), as Ray's own tests share one."""
    ray = pytest.importorskip("ray") if not os.environ.get("PTUTILS_REQUIRE_SERVICES") else __import__("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_gives_the_in_process_result(tmp_path, ray_local):
    reference = (tmp_path / "reference").as_uri()
    with tuning(reference) as t:
        t.run()
    url = (tmp_path / "ray").as_uri()
    with tuning(url, executor={"kind": "ray", "cpus_per_child": 1}) as t:
        t.run()
        assert t.session.state == "complete"
    want, got = result(reference), result(url)
    assert got[0] == want[0] and same(got[1], want[1])
    assert ray_local.is_initialized()  # the executor leaves a Ray it did not start running


@pytest.mark.slow
def test_a_ray_driver_killed_mid_round_resumes_on_ray_to_the_same_result(tmp_path, ray_local):
    from .support.tuningkit import claims_alternate, kill_session, run_killed

    reference = (tmp_path / "reference").as_uri()
    with tuning(reference) as t:
        t.run()
    url = (tmp_path / "ray").as_uri()
    sid = run_killed(url, "round", 2, "ray", group=True, step_sleep=0.05)
    kill_session(sid)  # Ray's dashboard and runtime-env agents outlive a killed driver (Ray's behaviour)
    with Tuning.resume(url, "pbt", executor={"kind": "ray"}) as t:
        t.run()
    want, got = result(reference), result(url)
    assert got[0] == want[0] and same(got[1], want[1])
    claims_alternate(url, t.children)
