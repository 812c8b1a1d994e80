"""cluster.yaml: valid for Ray's cluster launcher (its own schema check), GPU node types of 1 and 4 GPUs on spot, setup from constraints.txt."""

import copy
import fnmatch
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


def test_setup_installs_the_pipeline_extra_with_the_synced_constraints_pinning_torch_and_this_ray(config):
    import ray

    setup = "\n".join(config["setup_commands"])
    installs = [c for c in config["setup_commands"] if re.search(r"pip install", c)]
    assert len(installs) == 2, installs  # uv, then the project: every package from the lock (nothing unpinned)
    assert all("-c ~/featup-pipeline/constraints.txt" in c for c in installs), installs
    install = re.search(r"pip install .*-c ~/featup-pipeline/constraints\.txt\s+-e \S*featup-pipeline\[pipeline\]\S*(.*)", setup)
    assert install and install[1].split() == ["boto3"]  # the project and the autoscaler's boto3, both from the lock
    # constraints.txt reaches every node with the project folder: mounted, not excluded, not git-ignored.
    assert config["file_mounts"]["~/featup-pipeline"] == "."
    assert (ROOT / "constraints.txt").is_file()
    ignored = list(config["rsync_exclude"])
    for name in config["rsync_filter"]:
        ignored += [line.strip().strip("/") for line in (ROOT / name).read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    assert not [p for p in ignored if fnmatch.fnmatch("constraints.txt", p)]
    lock = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith((" ", "#", "-")):
            name, version = line.split("==")
            lock[name] = version
    pins = [d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"] if "==" in d]
    assert any(p.startswith("torch==") for p in pins)
    for pin in pins:
        name, version = pin.split("==")
        assert lock[name] == version, pin
    assert lock["ray"] == ray.__version__  # the submitting client (installed from the same file) and the cluster match
    assert "boto3" in lock  # pinned (moto needs it too), so the nodes' boto3 matches the botocore aiobotocore pins
    assert "~/.ray/auth_token" in config["file_mounts"]  # one token on every node (Ray's token authentication)


def test_nodes_byte_compile_the_project_and_its_dependencies_at_setup(config):
    project = next(c for c in config["setup_commands"] if "featup-pipeline[pipeline]" in c)
    assert re.search(r"uv pip install\b.*--compile-bytecode", project), project  # else a node's first actors compile torch as they import


def test_nodes_bootstrap_from_the_package_registry_at_pinned_versions_and_pipe_nothing_into_a_shell(config):
    commands = [c for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                              "head_start_ray_commands", "worker_start_ray_commands") for c in config.get(key) or []]
    for command in commands:
        assert not re.search(r"\b(curl|wget)\b", command), command  # nothing fetched from a URL by hand
        assert not re.search(r"\|\s*(sudo\s+)?(ba|z|da)?sh\b|\|\s*(sudo\s+)?python", command), command  # nothing piped into a shell
    uv = next(c for c in config["setup_commands"] if re.search(r"pip install .*\buv$", c))
    assert "-c ~/featup-pipeline/constraints.txt" in uv  # the lock's version...
    lock = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if line.startswith("uv=="))
    assert lock["uv"]  # ...which the lock pins
    first_use = next(i for i, c in enumerate(config["setup_commands"]) if "~/.local/bin/uv" in c)
    assert config["setup_commands"].index(uv) < first_use  # installed before it is used


def test_the_s3_credentials_notes_name_the_permissions_the_actors_need():
    text = (ROOT / "cluster.yaml").read_text()
    for word in ("IamInstanceProfile", "s3:GetObject", "s3:PutObject", "s3:ListBucket", "iam:PassRole"):
        assert word in text, word
