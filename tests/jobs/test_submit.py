"""``featup submit``: the command checks, and real two-node Ray clusters on 127.0.0.1 running precompute through the Jobs API.

Each cluster node is a ``ray start --block`` process in its own session; teardown kills exactly the processes of those
sessions and their descendants (never ``ray stop``, which would kill every Ray of this user on the machine).
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.helpers import corpus
from tests.helpers import precompute as helpers

from featup.errors import ConfigError  # noqa: E402
from jobs import precompute, submit  # noqa: E402
from pipeline.store.features import FeatureStore  # noqa: E402

BIN = Path(sys.executable).parent
N_SHARDS, PER_SHARD = 12, 8  # with the slow flag, one actor alone needs ~15 s: time for the other node's actor to start
NODE_START_TRIES = 2  # a node that timed out in Ray's own start-up wait is started once more (Cluster._start_node)
START_TIMEOUT_S, JOB_TIMEOUT_S = 90, 240


def test_the_remote_command_is_checked_here_and_precompute_joins_the_cluster():
    base = ["precompute", "a.tar", "--output", "s3://b/x.zarr", "--backbone", "dino16"]
    assert submit.check_command(["--", *base]) == [*base, "--address", "auto"]
    parser = argparse.ArgumentParser()
    precompute.add_arguments(parser)
    remote = precompute.build_config(parser.parse_args(submit.check_command(base)[1:]))
    assert remote.address == "auto" and remote.actors == "auto"  # on the cluster: every GPU node's actors, as they join
    assert submit.check_command([*base, "--address", "ray://h:10001"]) == [*base, "--address", "ray://h:10001"]
    assert submit.check_command(["inspect", "x.zarr"]) == ["inspect", "x.zarr"]  # no --address option: left alone
    with pytest.raises(ConfigError, match=r"submit: expected a featup command after -- \(.*precompute.*\), got 'nope'"):
        submit.check_command(["--", "nope"])
    with pytest.raises(ConfigError, match="got 'nothing'"):
        submit.check_command([])
    with pytest.raises(SystemExit):  # --backbone is missing: refused before anything is uploaded
        submit.check_command(["precompute", "a.tar", "--output", "x.zarr"])


def test_the_runtime_env_uploads_the_project_without_environments_or_outputs(tmp_path):
    args = SimpleNamespace(env=["AWS_REGION=us-west-2"], no_working_dir=False, working_dir=None)
    env = submit.build_runtime_env(args)
    assert Path(env["working_dir"]) == Path(submit.__file__).resolve().parents[1]
    assert {".venv", ".git", "*.zarr", "*.tar"} <= set(env["excludes"])
    assert env["env_vars"] == {"AWS_REGION": "us-west-2"}
    assert submit.build_runtime_env(SimpleNamespace(env=[], no_working_dir=True, working_dir=None)) == {}
    with pytest.raises(ConfigError, match=r"--working-dir: expected the featup-pipeline project folder .* --no-working-dir"):
        submit.build_runtime_env(SimpleNamespace(env=[], no_working_dir=False, working_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="--env: expected KEY=VALUE, got a value without a name and '=' \\(not shown: it may be a secret\\)"):
        submit.build_runtime_env(SimpleNamespace(env=["AWS_REGION"], no_working_dir=True, working_dir=None))


def test_an_unreachable_cluster_is_an_error_naming_the_address(capsys):
    port = _free_port()
    from jobs.cli import main

    code = main(["submit", "--address", f"http://127.0.0.1:{port}", "--", "inspect", "x.zarr"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"featup: error: --address: expected a reachable Ray dashboard (Jobs API), got http://127.0.0.1:{port}" in err


# ---- two nodes on 127.0.0.1 ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports() -> list[str]:
    """Explicit free ports for everything a node listens on, so two nodes (and other Rays here) never collide."""
    names = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
             "--runtime-env-agent-port", "--metrics-export-port")
    return [arg for name in names for arg in (name, str(_free_port()))]


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, session id) of every process on this machine."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            table[int(entry.name)] = (int(fields[1]), int(fields[3]))
    return table


class LocalNode:
    """One Ray node: a ``ray start --block`` in a new session; ``stop`` kills its session and everything it started."""

    def __init__(self, args: list[str], env: dict, log: Path) -> None:
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "ray"), "start", "--block", *args], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def pids(self) -> set[int]:
        """The processes of this node: its session and their descendants (the job's driver runs in a session of its own)."""
        table = _processes()
        pids = {pid for pid, (_, sid) in table.items() if sid == self.proc.pid}
        grown = True
        while grown:
            more = {pid for pid, (ppid, _) in table.items() if ppid in pids} - pids
            pids |= more
            grown = bool(more)
        return pids

    def busy_actor(self) -> bool:
        """Whether an actor of this node is computing a shard (Ray titles the process after the running method; the
        driver asks only busy actors for their progress)."""
        for pid in self.pids():
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith((b"ray::NodeWorker.process_shard", b"ray::NodeWorker.progress")):
                    return True
            except OSError:
                continue
        return False

    def stop(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(30)


class Cluster:
    """A head (dashboard and Jobs API on 127.0.0.1) and second nodes, sharing one token; each node has 1 CPU."""

    def __init__(self, root: Path, env: dict) -> None:
        self.root, self.env = root, env
        self.temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths live under it
        self.gcs, self.dashboard = _free_port(), _free_port()
        self.address = f"http://127.0.0.1:{self.dashboard}"
        self.nodes: list[LocalNode] = []

    def start_head(self) -> None:
        def head_args() -> list[str]:
            self.gcs, self.dashboard = _free_port(), _free_port()
            self.address = f"http://127.0.0.1:{self.dashboard}"
            return ["--head", "--port", str(self.gcs), "--temp-dir", self.temp_dir, "--include-dashboard", "true",
                    "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard),
                    "--ray-client-server-port", str(_free_port()), *self._common("node_a"), *_node_ports()]

        self._start_node(head_args, "node_a", self.root / "head.log")

    def add_node(self, resource: str) -> LocalNode:
        return self._start_node(lambda: ["--address", f"127.0.0.1:{self.gcs}", *self._common(resource), *_node_ports()],
                                resource, self.root / f"{resource}.log")

    def _start_node(self, make_args, resource: str, log: Path) -> LocalNode:
        """Starts a node and waits for it. Ray gives a node's raylet a fixed 30 s to register, which a loaded machine
        (the other test workers busy) can exceed: a node that gave up so is started once more, on fresh ports."""
        for attempt in range(NODE_START_TRIES):
            node = LocalNode(make_args(), self.env, log)
            self.nodes.append(node)
            try:
                self.wait_for_node(resource)
                return node
            except AssertionError:
                if attempt + 1 == NODE_START_TRIES or "timed out during startup" not in log.read_text():
                    raise
                node.stop()
                self.nodes.remove(node)
        raise AssertionError("unreachable")

    def _common(self, resource: str) -> list[str]:
        return ["--num-cpus", "1", "--num-gpus", "0", "--object-store-memory", str(100 * 2**20),
                "--node-ip-address", "127.0.0.1", "--disable-usage-stats", "--resources", json.dumps({resource: 1})]

    def alive_nodes(self) -> list[dict]:
        """The live nodes, from the dashboard's state API (with the cluster's token); [] while it is not up."""
        request = urllib.request.Request(f"{self.address}/api/v0/nodes", headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                nodes = json.load(response)["data"]["result"]["result"]
        except (OSError, ValueError, KeyError):
            return []
        return [n for n in nodes if n.get("state") == "ALIVE"]

    def wait_for_node(self, resource: str) -> None:
        """Waits until the node holding ``resource`` is alive; fails with the nodes' logs if it does not come up."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while not any(resource in n.get("resources_total", {}) for n in self.alive_nodes()):
            if self.nodes[-1].proc.poll() is not None or time.monotonic() > deadline:
                logs = "\n".join(f"--- {n.log.name}\n{n.log.read_text()[-3000:]}" for n in self.nodes)
                raise AssertionError(f"the Ray node with resource {resource} did not come up\n{logs}")
            time.sleep(0.5)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head node of the two-node tests (torn down at the end, even on failure), the shards and their reference store."""
    root = tmp_path_factory.mktemp("submit")
    modules = helpers.write_tiny_module(root / "mods")
    flag = root / "slow.flag"
    shards = corpus.make_good_shards(root / "in", n_shards=N_SHARDS, per_shard=PER_SHARD)
    reference = helpers.tiny_config(shards, root / "reference.zarr")  # batch size 4: the jobs' 2 gives the same rows
    sys.path.insert(0, str(modules))
    try:
        helpers.reference_store(reference)  # the single-node result: plain workers, shard after shard
    finally:
        sys.path.remove(str(modules))
    token = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update({
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,  # head, nodes and the submitting client agree
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", helpers.SLOW_FLAG_ENV: str(flag),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(modules), os.environ.get("PYTHONPATH")])),  # a checkout on the path wins
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",  # a lost node is seen in seconds
        "RAY_health_check_timeout_ms": "1000",
    })
    ray_cluster = Cluster(root, env)
    try:
        ray_cluster.start_head()
        yield SimpleNamespace(cluster=ray_cluster, env=env, shards=shards, reference=reference.output, flag=flag, root=root)
    finally:
        ray_cluster.stop()


def _submit_command(c, output: Path) -> list[str]:
    """``featup submit`` of a precompute job with the tiny backbone, as a user types it (the console script)."""
    return [
        str(BIN / "featup"), "submit", "--address", c.cluster.address, "--", "precompute", *c.shards, "--output", str(output),
        "--backbone", helpers.TINY_BACKBONE, "--weights", "random", "--image-size", str(helpers.IMAGE_SIZE), "--dtype", "float32",
        "--kernel-backend", "eager", "--batch-size", "2", "--device", "cpu", "--save-lowres", "--actors", "auto",
    ]


def _job_id(stdout: str) -> str:
    return next(line.split()[3] for line in stdout.splitlines() if line.startswith("featup: submitted job "))


def _nodes_by_resource(report: dict) -> dict[str, dict]:
    """The report's per-node work, keyed by the custom resource that tells the test's nodes apart."""
    return {
        next(r for r in ("node_a", "node_b", "node_c") if r in node["resources"]): {**node, "id": node_id}
        for node_id, node in report["actors"]["nodes"].items()
    }


@pytest.mark.slow
def test_a_precompute_job_submitted_to_two_nodes_runs_actors_on_both_and_equals_a_single_node_run(cluster, tmp_path):
    second = cluster.cluster.add_node("node_b")
    cluster.flag.touch()  # every model call sleeps: shards take long enough for both actors to be up and take some
    env_secret, option_secret = f"env-{uuid.uuid4().hex}", f"option-{uuid.uuid4().hex}"  # credentials given to the job
    try:
        output = tmp_path / "two-nodes.zarr"
        command = _submit_command(cluster, output)
        command[2:2] = ["--env", f"FEATUP_TEST_SECRET_TOKEN={env_secret}"]
        command += ["--storage-option", f"token={option_secret}"]  # no remote output here: taken, and never stored
        done = subprocess.run(command, env=cluster.env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    finally:
        cluster.flag.unlink()
        second.stop()
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    job_id = _job_id(done.stdout)
    _assert_secrets_kept(cluster, job_id, output, done, env_secret, option_secret)
    assert f"featup: job {job_id} SUCCEEDED" in done.stdout
    total = N_SHARDS * PER_SHARD
    assert f"| {total}/{total} img [" in done.stdout  # the job's own progress bar: its logs were followed to the end
    assert f"{total} ok, 0 failed of {total}" in done.stdout  # and its end-of-run summary
    assert "polling the logs instead" not in done.stderr  # streamed through the Jobs API's websocket
    helpers.assert_same_store(cluster.reference, str(output))
    report = FeatureStore.open(str(output), mode="r").read_report()
    assert report["status"] == "complete" and report["actors"]["count"] == "auto"
    nodes = _nodes_by_resource(report)
    assert sorted(nodes) == ["node_a", "node_b"], report["actors"]  # actors ran on the head and on the second node
    assert nodes["node_a"]["id"] != nodes["node_b"]["id"] and all(n["shards"] >= 1 for n in nodes.values())
    assert sum(n["samples"] for n in nodes.values()) == N_SHARDS * PER_SHARD


def _assert_secrets_kept(cluster, job_id: str, output: Path, done, env_secret: str, option_secret: str) -> None:
    """--env reached the job only through its runtime environment (the entrypoint `ray job list` shows lacks it); submit
    warned that both are readable on the cluster; neither is on screen, in the report or in any file of the store."""
    from ray.job_submission import JobSubmissionClient

    token = {"Authorization": f"Bearer {cluster.env['RAY_AUTH_TOKEN']}"}
    info = JobSubmissionClient(cluster.cluster.address, headers=token).get_job_info(job_id)
    assert env_secret not in info.entrypoint and info.runtime_env["env_vars"]["FEATUP_TEST_SECRET_TOKEN"] == env_secret
    assert "featup: warning: --env FEATUP_TEST_SECRET_TOKEN=***, --storage-option token=*** can be read on the cluster" in done.stderr
    stored = b"".join(p.read_bytes() for p in sorted(output.rglob("*")) if p.is_file())
    for secret in (env_secret, option_secret):
        assert secret not in done.stdout + done.stderr and secret.encode() not in stored, secret
    assert "token=***" in FeatureStore.open(str(output), mode="r").read_report()["command_line"]


@pytest.mark.slow
def test_stopping_the_second_node_mid_job_still_gives_a_complete_correct_store(cluster, tmp_path):
    second = cluster.cluster.add_node("node_c")
    output = tmp_path / "node-lost.zarr"
    cluster.flag.touch()  # every model call sleeps: the job is still running when the node goes
    log = tmp_path / "submit.log"
    with open(log, "w") as out:  # a file, not a pipe: a full pipe would block the command while the test waits
        job = subprocess.Popen(_submit_command(cluster, output), env=cluster.env, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        helpers.wait_for(second.busy_actor, JOB_TIMEOUT_S, "an actor on the second node computing a shard", interval=0.2)
        second.stop()  # abrupt: its raylet, agents and actor processes are killed at once, mid-shard
        cluster.flag.unlink()
        job.wait(timeout=JOB_TIMEOUT_S)
    finally:
        cluster.flag.unlink(missing_ok=True)
        second.stop()
        if job.poll() is None:
            job.kill()
    stdout = log.read_text()
    assert job.returncode == 0, stdout[-8000:]
    assert f"featup: job {_job_id(stdout)} SUCCEEDED" in stdout
    helpers.assert_same_store(cluster.reference, str(output))
    report = FeatureStore.open(str(output), mode="r").read_report()
    assert report["status"] == "complete" and report["samples"]["ok"] == N_SHARDS * PER_SHARD, report["actors"]
    assert report["shards"]["retries"] >= 1 and "will be redone: its worker died" in stdout  # the lost node's shard
    assert report["actors"]["restarts"] >= 1
    nodes = _nodes_by_resource(report)
    assert nodes["node_a"]["shards"] >= 1 and set(nodes) <= {"node_a", "node_c"}


@pytest.mark.slow
def test_a_job_that_fails_on_the_cluster_makes_submit_exit_1_with_the_jobs_error(cluster, tmp_path):
    command = _submit_command(cluster, tmp_path / "never.zarr")
    missing = str(tmp_path / "missing-{000000..000001}.tar")
    command[command.index(cluster.shards[0]): command.index(cluster.shards[-1]) + 1] = [missing]
    done = subprocess.run(command, env=cluster.env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert done.returncode == 1, done.stdout[-5000:] + done.stderr[-5000:]
    assert f"featup: job {_job_id(done.stdout)} FAILED: " in done.stdout
    assert "missing-000000.tar" in done.stdout  # the remote command's own error, in the followed logs
    assert not (tmp_path / "never.zarr").exists()
