"""Cluster placement: actors that fit per node, decode threads per node, and the actor pool on a real local Ray (2 CPUs)."""

import io
import json
import sys
from pathlib import Path

import pytest

from tests.helpers import corpus
from tests.helpers import precompute as helpers

from pipeline.precompute.pool import NodeResources, actors_that_fit, decode_threads_for, write_threads_for  # noqa: E402
from pipeline.precompute.driver import run_precompute  # noqa: E402

N_SHARDS, PER_SHARD = 4, 5
HEAD = NodeResources("head", "10.0.0.1", cpus=8, gpus=0)
ONE_GPU = NodeResources("g5.2xlarge", "10.0.0.2", cpus=8, gpus=1)
FOUR_GPUS = NodeResources("g5.12xlarge", "10.0.0.3", cpus=48, gpus=4)


def test_node_resources_keep_custom_resources_and_drop_rays_internal_ones():
    info = {
        "NodeID": "abc", "NodeManagerAddress": "10.0.0.9", "Alive": True,
        "Resources": {"CPU": 4.0, "GPU": 1.0, "memory": 1e9, "object_store_memory": 1e8, "node:10.0.0.9": 1.0,
                      "node:__internal_head__": 1.0, "node_a": 1.0},
    }
    assert NodeResources.from_ray(info) == NodeResources("abc", "10.0.0.9", 4.0, 1.0, {"node_a": 1.0})


def test_gpu_actors_fit_one_per_gpu_and_never_on_the_cpu_head():
    nodes = [HEAD, ONE_GPU, FOUR_GPUS]
    assert actors_that_fit(nodes, num_cpus=1, num_gpus=1) == 5
    assert actors_that_fit(nodes, num_cpus=1, num_gpus=0.5) == 10  # two actors share a GPU
    assert actors_that_fit(nodes, num_cpus=16, num_gpus=1) == 3  # the 8-CPU node cannot hold a 16-CPU actor
    assert actors_that_fit([HEAD], num_cpus=1, num_gpus=1) == 0


def test_cpu_actors_fill_every_nodes_cpus():
    assert actors_that_fit([HEAD, ONE_GPU, FOUR_GPUS], num_cpus=2, num_gpus=0) == 4 + 4 + 24
    assert actors_that_fit([NodeResources("n", "", cpus=3, gpus=0)], num_cpus=1.5, num_gpus=0) == 2


def test_decode_threads_are_the_cpus_per_gpu_less_one_within_bounds():
    assert decode_threads_for(ONE_GPU, gpus_per_actor=1) == 7
    assert decode_threads_for(FOUR_GPUS, gpus_per_actor=1) == 11
    assert decode_threads_for(ONE_GPU, gpus_per_actor=0.5) == 3  # half the GPU, half its CPUs
    assert decode_threads_for(NodeResources("small", "", cpus=2, gpus=1), gpus_per_actor=1) == 1
    assert decode_threads_for(NodeResources("big", "", cpus=96, gpus=1), gpus_per_actor=1) == 16
    assert decode_threads_for(HEAD, gpus_per_actor=0) == 2  # a CPU actor: the model needs the CPUs


def test_write_threads_are_the_cpus_of_the_actors_gpus_or_its_own_cpus():
    assert write_threads_for(ONE_GPU, gpus_per_actor=1, cpus_per_actor=1) == 8  # the GPU's CPUs encode while it computes
    assert write_threads_for(FOUR_GPUS, gpus_per_actor=1, cpus_per_actor=1) == 12
    assert write_threads_for(NodeResources("small", "", cpus=2, gpus=1), gpus_per_actor=1, cpus_per_actor=1) == 2
    assert write_threads_for(NodeResources("big", "", cpus=96, gpus=1), gpus_per_actor=1, cpus_per_actor=1) == 16
    assert write_threads_for(HEAD, gpus_per_actor=0, cpus_per_actor=4) == 4  # a CPU actor: its own share
    assert write_threads_for(HEAD, gpus_per_actor=0, cpus_per_actor=0.5) == 1


@pytest.fixture(scope="module")
def env(tmp_path_factory, ray_env):
    """The run's 2-CPU local Ray, the tiny backbone module, four good shards and their reference store (plain workers)."""
    root = tmp_path_factory.mktemp("cluster")
    shards = corpus.make_good_shards(root / "in", n_shards=N_SHARDS, per_shard=PER_SHARD)
    reference = helpers.tiny_config(shards, root / "reference.zarr")
    helpers.reference_store(reference)
    return {"shards": shards, "reference": reference.output, "modules": ray_env.modules}


def _run(config):
    out, err = io.StringIO(), io.StringIO()
    code = run_precompute(config, out=out, err=err, json_output=True)
    return code, json.loads(out.getvalue()), err.getvalue()


@pytest.mark.slow
def test_actors_auto_fill_the_local_node_and_size_their_decode_threads(env, ray_env, tmp_path):
    config = helpers.tiny_config(env["shards"], tmp_path / "auto.zarr", actors="auto", decode_threads=None, batch_size=1)
    ray_env.flag.touch()  # every model call sleeps: one actor cannot take every shard before the other is up
    try:
        code, report, err = _run(config)
    finally:
        ray_env.flag.unlink()
    assert code == 0, err
    helpers.assert_same_store(env["reference"], config.output)
    actors = report["actors"]
    assert actors["count"] == "auto" and actors["started"] == 2  # 2 CPUs, 1 CPU per actor
    assert [a["decode_threads"] for a in actors["per_actor"].values()] == [2, 2]  # CPU actors keep 2 threads
    (node_id, node), = actors["nodes"].items()  # one node, named by its Ray node id
    assert node_id and node["actors"] == 2 and node["shards"] == N_SHARDS and node["resources"]["CPU"] == 2


@pytest.mark.slow
def test_an_actor_that_cannot_be_placed_is_never_given_a_shard(env, tmp_path):
    config = helpers.tiny_config(env["shards"], tmp_path / "three.zarr", actors=3)  # only two fit on 2 CPUs
    code, report, err = _run(config)  # a shard handed to the pending actor would never come back: the run would hang
    assert code == 0, err
    helpers.assert_same_store(env["reference"], config.output)
    assert report["actors"]["started"] == 3 and 1 <= len(report["actors"]["per_actor"]) <= 2  # the third never worked
    assert report["shards"]["computed"] == N_SHARDS and report["shards"]["retries"] == 0


FAILING_SOURCE = '''
"""A backbone that loads in the driver but raises in every Ray actor (as on a node with a broken GPU driver)."""
import ray
from featup_tiny_net import tiny


def net():
    if ray.is_initialized() and ray.get_runtime_context().get_actor_id():
        raise RuntimeError("broken node: the model cannot load here")
    return tiny()
'''


@pytest.mark.slow
def test_actors_that_cannot_start_fail_the_job_with_their_error_instead_of_retrying_forever(env, tmp_path):
    (env["modules"] / "featup_failing_net.py").write_text(FAILING_SOURCE)
    config = helpers.tiny_config(env["shards"], tmp_path / "broken.zarr", backbone="featup_failing_net:net", actors=2)
    code, report, err = _run(config)
    assert code == 1
    assert report["status"] == "failed" and report["shards"]["computed"] == 0
    assert report["failure"].startswith("3 precompute actors failed to start; last error: ")
    assert "broken node: the model cannot load here" in report["failure"] and "broken node" in err
