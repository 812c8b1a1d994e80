"""``featup train-jbu`` through the CLI: a killed run resumes from its checkpoint, the result runs in ``precompute``, Ray Train."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import corpus
from tests.helpers import precompute as helpers

from featup.checkpoint import load_featup_checkpoint, read_checkpoint  # noqa: E402
from jobs.cli import main  # noqa: E402

TINY = ["--backbone", helpers.TINY_BACKBONE, "--weights", "random", "--image-size", "32", "--max-pad", "4", "--n-jitters", "2",
        "--batch-size", "2", "--device", "cpu", "--decode-threads", "1"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The tiny backbone module (importable here), the slow flag path and two good shards (no Ray yet)."""
    root = tmp_path_factory.mktemp("train-jbu-cli")
    modules = helpers.write_tiny_module(root / "mods")
    shards = corpus.make_good_shards(root / "in", n_shards=2, per_shard=3)
    sys.path.insert(0, str(modules))  # in-process runs import the tiny module too
    yield {"root": root, "modules": modules, "flag": root / "slow.flag", "pattern": str(root / "in" / "shard-{000000..000001}.tar"),
           "shards": shards}
    sys.path.remove(str(modules))


@pytest.fixture(scope="module")
def ray_env(env, ray_env):
    """The module's files with the run's local Ray (workers import the tiny module from its own folder)."""
    return {**env, "modules": ray_env.modules, "flag": ray_env.flag}


def _child(env, *args, log: Path) -> subprocess.Popen:
    """``featup train-jbu ...`` in its own process (one torch thread), output to ``log``."""
    child_env = {**os.environ, "PYTHONPATH": str(env["modules"]), helpers.SLOW_FLAG_ENV: str(env["flag"]),
                 "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:  # a file, not a pipe: a full pipe would block the child
        return subprocess.Popen([sys.executable, "-m", "jobs.cli", "train-jbu", *map(str, args)],
                                env=child_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _saved_step(path: Path) -> int:
    if not path.exists():
        return 0
    content, _ = read_checkpoint(str(path))
    return int(content["featup_training"]["step"])


def test_help_lists_train_jbu_and_its_published_defaults(capsys):
    assert main(["train-jbu", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--backbone", "--weights", "--output", "--steps", "--batch-size", "--image-size", "--workers", "--overwrite"):
        assert flag in text
    assert "NAdam learning rate (default 1e-3)" in text and "jittered views per step (default 5)" in text


def test_a_bad_setting_is_one_error_line_and_exit_code_2(env, tmp_path, capsys):
    args = ["train-jbu", env["pattern"], "--output", str(tmp_path / "x.ckpt"), *TINY, "--image-size", "36"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["featup: error: --image-size: expected a multiple of the stride 8 of backbone 'featup_tiny_net:tiny', got 36"]
    assert not (tmp_path / "x.ckpt").exists()


def test_a_killed_run_resumes_from_its_last_checkpoint_and_ends_as_an_uninterrupted_run(env, tmp_path):
    out = tmp_path / "jbu.ckpt"
    args = [env["pattern"], "--output", out, *TINY, "--steps", "6", "--checkpoint-every", "2", "--log-every", "1"]
    env["flag"].touch()  # every backbone call sleeps: the run is still going when it is killed
    try:
        child = _child(env, *args, log=tmp_path / "killed.log")
        try:
            helpers.wait_for(lambda: _saved_step(out) >= 2 or child.poll() is not None, 120, "a first checkpoint")
            assert child.poll() is None, (tmp_path / "killed.log").read_text()
            os.killpg(child.pid, signal.SIGKILL)
            child.wait(10)
        finally:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
    finally:
        env["flag"].unlink()
    saved = _saved_step(out)
    assert 2 <= saved < 6

    resumed = _child(env, *args, log=tmp_path / "resumed.log")
    assert resumed.wait(120) == 0, (tmp_path / "resumed.log").read_text()
    text = (tmp_path / "resumed.log").read_text()
    assert f"resumed from step {saved}" in text and "trained to step 6" in text
    straight_out = tmp_path / "straight.ckpt"
    straight = _child(env, *[straight_out if a == out else a for a in args], log=tmp_path / "straight.log")
    assert straight.wait(120) == 0, (tmp_path / "straight.log").read_text()

    a, _ = read_checkpoint(str(out))
    b, _ = read_checkpoint(str(straight_out))
    assert [row["step"] for row in a["featup_training"]["losses"]] == [1, 2, 3, 4, 5, 6]
    for key, value in b["state_dict"].items():
        torch.testing.assert_close(a["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    csv_rows = (tmp_path / "jbu.losses.csv").read_text().splitlines()
    assert len(csv_rows) == 7 and csv_rows[0] == "step,total,reconstruction,crf,tv"  # rows past the checkpoint were rewritten
    assert (tmp_path / "jbu.losses.png").stat().st_size > 0


def test_the_trained_checkpoint_runs_in_precompute(env, tmp_path, capsys):
    ckpt = tmp_path / "jbu.ckpt"
    assert main(["train-jbu", env["pattern"], "--output", str(ckpt), *TINY, "--steps", "2"]) == 0
    assert "trained to step 2" in capsys.readouterr().out
    store = tmp_path / "features.zarr"
    code = main(["precompute", env["pattern"], "--output", str(store), "--backbone", helpers.TINY_BACKBONE,
                 "--weights", "random", "--image-size", "32", "--kernel-backend", "eager", "--checkpoint", str(ckpt),
                 "--dtype", "float32", "--device", "cpu", "--batch-size", "2", "--in-process"])  # the checkpoint is the subject
    assert code == 0, capsys.readouterr().err
    from pipeline.store.features import FeatureStore

    opened = FeatureStore.open(str(store), None, mode="r")
    features = opened.array("features")[...]
    assert features.shape == (6, 16, 32, 32)
    assert opened.attrs["checkpoint_sha256"] == load_featup_checkpoint(str(ckpt)).sha256
    assert torch.isfinite(torch.from_numpy(features)).all() and features.std() > 0


def test_two_ray_train_workers_train_data_parallel(ray_env, tmp_path, capsys):
    ckpt = tmp_path / "ddp.ckpt"
    args = ["train-jbu", ray_env["pattern"], "--output", str(ckpt), *TINY, "--batch-size", "1", "--steps", "2",
            "--log-every", "1", "--workers", "2"]
    assert main(args) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    assert "2 Ray Train workers (CPU, gloo)" in captured.err and "trained to step 2" in captured.out
    content, _ = read_checkpoint(str(ckpt))
    state = content["featup_training"]
    assert state["world_size"] == 2 and state["step"] == 2 and [r["step"] for r in state["losses"]] == [1, 2]
    generators = [r["generator"] for r in state["ranks"]]
    assert not torch.equal(generators[0], generators[1])  # each worker draws its own views
    assert load_featup_checkpoint(str(ckpt)).upsampler.num_stages == 3
