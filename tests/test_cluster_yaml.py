"""cluster.yaml: valid for Ray's cluster launcher (its own schema check), GPU node types of 1 and 4 GPUs on spot, pinned setup."""

import copy
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_the_launchers_own_validation_and_a_broken_copy_does_not(config):
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs before touching the cloud
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu.1x"]["min_wrokers"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_wrokers"):
        validate_config(prepare_config(broken))


def test_head_is_cpu_only_and_gpu_workers_of_1_and_4_gpus_autoscale_on_spot(config):
    types = config["available_node_types"]
    assert config["provider"]["type"] == "aws"
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert sorted(t["resources"]["GPU"] for t in workers.values()) == [1, 4]
    for name, node_type in workers.items():
        assert node_type["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot", name
        assert node_type["max_workers"] > node_type["min_workers"] >= 0, name  # room to scale up
        assert node_type["resources"]["CPU"] >= 4 * node_type["resources"]["GPU"], name  # CPUs to decode for each GPU


def test_setup_installs_the_project_with_the_pinned_torch_and_this_ray(config):
    import ray

    pins = [d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"] if "==" in d]
    assert any(p.startswith("torch==") for p in pins)
    setup = "\n".join(config["setup_commands"])
    for pin in pins:
        assert pin in setup, pin
    assert f'"ray[default]=={ray.__version__}"' in setup  # the submitting client and the cluster must match
    assert re.search(r"pip install .*-e .*featup-pipeline\[pipeline\]", setup)
    assert config["file_mounts"]["~/featup-pipeline"] == "."
    assert "~/.ray/auth_token" in config["file_mounts"]  # one token on every node (Ray's token authentication)


def test_the_s3_credentials_notes_name_the_permissions_the_actors_need():
    text = (ROOT / "cluster.yaml").read_text()
    for word in ("IamInstanceProfile", "s3:GetObject", "s3:PutObject", "s3:ListBucket", "iam:PassRole"):
        assert word in text, word
