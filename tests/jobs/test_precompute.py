"""``featup precompute`` through the CLI: dry run, refusals, a full run, --max-errors (on a shard read with credentials
that must stay out of the store and off the screen), a driver killed mid-run, two jobs started together.

Commands whose subject is the CLI run in this process with ``--in-process`` (no Ray); the killed driver runs in its own
process on its own embedded Ray, as a user's command would.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.helpers import corpus
from tests.helpers import precompute as helpers
from tests.helpers.fileserver import CredentialFileServer

from jobs.cli import main  # noqa: E402
from pipeline.store.features import FeatureStore  # noqa: E402

TINY = ["--backbone", helpers.TINY_BACKBONE, "--weights", "random", "--image-size", "32", "--kernel-backend", "eager"]


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_modules):
    """The tiny backbone module (importable here), a slow flag path for child jobs and four good shards."""
    root = tmp_path_factory.mktemp("precompute-cli")
    corpus.make_good_shards(root / "in", n_shards=4, per_shard=5)
    return {"root": root, "flag": root / "slow.flag", "modules": tiny_modules,
            "pattern": str(root / "in" / "shard-{000000..000003}.tar")}


# ``featup ARGS``, then whether Ray was imported on the way
NO_RAY = ("import sys; from jobs.cli import main; code = main(sys.argv[1:]); "
          "print('ray imported:', 'ray' in sys.modules, file=sys.stderr); sys.exit(code)")


def _cli(*args):
    """``featup precompute ARGS --in-process`` in this process, on one torch thread (two oversubscribe a loaded 2-core
    machine, 10x slower)."""
    return main(["precompute", *map(str, args), "--in-process", "--cpus-per-actor", "1"])


def test_in_process_refuses_a_cluster_and_more_than_one_actor(env, tmp_path, capsys):
    out = tmp_path / "out.zarr"
    assert _cli(env["pattern"], "--output", out, *TINY, "--actors", "2") == 2
    err = capsys.readouterr().err
    assert "featup: error: --in-process: expected --actors 1 (one worker in this process), got --actors 2" in err
    assert _cli(env["pattern"], "--output", out, *TINY, "--address", "auto") == 2
    assert ("featup: error: --in-process: expected no --address (it computes in this process, without Ray), got --address auto"
            in capsys.readouterr().err)
    assert not out.exists()


def test_dry_run_prints_the_plan_and_writes_nothing(env, tmp_path, capsys):
    out = tmp_path / "plan.zarr"
    assert _cli(env["pattern"], "--output", out, *TINY, "--save-lowres", "--save-image", "--dry-run") == 0
    text = capsys.readouterr().out
    assert "inputs: 4 shards, 20 samples" in text and "(new store)" in text
    assert "features   (20, 16, 32, 32)" in text and "float16" in text
    assert "lowres     (20, 16, 4, 4)" in text and "image      (20, 32, 32, 3)" in text and "uint8" in text
    raw = 20 * (16 * 32 * 32 * 2 + 16 * 4 * 4 * 2 + 32 * 32 * 3)
    estimated = int(text.split("estimated bytes on disk:")[1].split("(")[1].split(" bytes")[0])
    assert 0 < estimated <= raw * 1.01  # zstd ratios measured on a real sample; at most the raw size (+ frame overhead)
    assert not out.exists()


def test_missing_shards_are_all_listed_before_anything_starts(env, tmp_path, capsys):
    pattern = str(env["root"] / "in" / "shard-{000000..000005}.tar")
    assert _cli(pattern, "--output", tmp_path / "out.zarr", *TINY) == 2
    err = capsys.readouterr().err
    assert "got 2 missing" in err and "shard-000004.tar" in err and "shard-000005.tar" in err
    assert not (tmp_path / "out.zarr").exists()


def test_an_incompatible_store_is_refused_naming_the_differences_and_overwrite_starts_over(env, tmp_path, capsys):
    out = tmp_path / "out.zarr"
    assert _cli(env["pattern"], "--output", out, *TINY, "--dtype", "float32", "--max-errors", "1%") == 0
    first = FeatureStore.open(str(out), mode="r").attrs
    assert first["backbone_weights"] == "random" and first["featup_version"] and first["created_at"] and first["pca"] is None
    summary = capsys.readouterr().out  # the end of the run on screen: a summary, the whole report stays in report.json
    assert summary.startswith("featup precompute: complete in ") and "20 ok, 0 failed of 20" in summary
    assert "images/s" in summary and "(1 worker in this process, no Ray, 0 shard retries)" in summary
    assert f"store     {out}" in summary and f"report    {out}/_featup/run/report.json" in summary
    assert "{" not in summary

    assert _cli(env["pattern"], "--output", out, *TINY, "--dtype", "float16", "--upsampler", "bilinear") == 2
    err = capsys.readouterr().err
    assert 'dtype: store has "float32", this run has "float16"' in err
    assert 'upsampler: store has "jbu", this run has "bilinear"' in err and "--overwrite" in err

    assert _cli(env["pattern"], "--output", out, *TINY, "--upsampler", "bilinear", "--overwrite", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "complete" and report["samples"]["ok"] == 20
    assert report["actors"]["mode"] == "in-process" and report["config"]["in_process"] is True
    assert FeatureStore.open(str(out), mode="r").attrs["upsampler"] == "bilinear"


def test_exceeding_max_errors_exits_non_zero_and_no_credential_reaches_the_store_or_the_screen(env, tmp_path, capsys):
    """The bad shard is read over HTTP with a password (user-info), a token (query) and an API key (--storage-option
    header): the job reads it, stops on --max-errors, and none of the three is in any file of the store, nor printed
    by the run or by ``featup inspect``."""
    bad, expected = corpus.make_bad_shard(tmp_path / "in")
    secret = {name: f"{name}-{uuid.uuid4().hex}" for name in ("password", "token", "api-key")}
    out = tmp_path / "out.zarr"
    with CredentialFileServer(tmp_path / "in", user="reader", password=secret["password"], token=secret["token"],
                              api_key=secret["api-key"]) as server:
        code = _cli(server.url(Path(bad).name), "--output", out, *TINY, "--max-errors", "0.25",
                    "--storage-option", f"headers.X-Api-Key={secret['api-key']}")
        run = capsys.readouterr()
        assert code == 1 and server.served > 0 and server.refused == 0, run.err
    failed = sum(s == "error" for s in expected.values())
    limit, total = len(expected) // 4, len(expected)
    assert f"{failed} failed samples exceed --max-errors 0.25 (at most {limit} of {total} samples)" in run.err

    assert main(["inspect", str(out)]) == 0 and main(["inspect", str(out), "--json"]) == 0
    screen = run.out + run.err + capsys.readouterr().out
    stored = b"".join(p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file())
    for value in secret.values():
        assert value not in screen and value.encode() not in stored, value
    store = FeatureStore.open(str(out), mode="r")
    shard_url = f"http://***@127.0.0.1:{server.port}/{Path(bad).name}?token=***"
    assert {row["shard"] for row in store.read_index().to_pylist()} == {shard_url}
    report = store.read_report()
    assert report["command_line"][:2] == ["featup", "precompute"] and shard_url in report["command_line"]
    assert "headers.X-Api-Key=***" in report["command_line"] and store.attrs["command_line"] == report["command_line"]
    assert "headers.X-Api-Key=***" in screen  # inspect shows the masked command line


def test_driver_killed_mid_run_then_the_rerun_finishes_it(env, tmp_path, capsys):
    out = tmp_path / "out.zarr"
    args = [env["pattern"], "--output", out, *TINY, "--batch-size", "1"]
    shards = sorted((env["root"] / "in").glob("shard-*.tar"))
    reference = helpers.tiny_config(shards, tmp_path / "reference.zarr", batch_size=1, save_lowres=False, dtype="float16")
    helpers.reference_store(reference)

    child_env = {**os.environ, "PYTHONPATH": _pythonpath(env), helpers.SLOW_FLAG_ENV: str(env["flag"]), "HF_HUB_OFFLINE": "1"}
    child_env.pop("RAY_AUTH_MODE", None)  # as a user's shell has it: the job's embedded Ray must not print its notice
    env["flag"].touch()
    log = tmp_path / "driver.log"
    with open(log, "wb") as log_file:  # a file, not a pipe: a full pipe would block the driver
        driver = subprocess.Popen(
            [sys.executable, "-m", "jobs.cli", "precompute", *map(str, args)],
            env=child_env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        try:
            helpers.wait_for(lambda: (out / "_featup" / "run" / "lock.json").exists() or driver.poll() is not None, 90, "the job's lock")
            assert driver.poll() is None, log.read_text()
            assert _cli(*args) == 2  # a second job on the same store is refused while the first runs
            assert "expected no other job writing to it" in capsys.readouterr().err
            helpers.wait_for(lambda: list((out / "_featup" / "commits").glob("shard-*.json")) or driver.poll() is not None, 90, "a first commit")
            assert driver.poll() is None, "the job finished before it could be killed"
            os.kill(driver.pid, signal.SIGKILL)
            driver.wait(10)
        finally:
            env["flag"].unlink()
        committed = len(list((out / "_featup" / "commits").glob("shard-*.json")))
        assert 1 <= committed < 4
        assert "Token authentication" not in log.read_text()  # Ray's notices stay in its own log files

        assert _cli(*args) == 0  # the rerun takes over the dead driver's lock and computes the rest
        err = capsys.readouterr().err
        assert f"{committed} of 4 shards already committed and skipped" in err
        helpers.assert_same_store(reference.output, str(out), same_urls=True)
    finally:
        _stop_group(driver.pid)


def test_two_commands_started_together_on_a_new_output_one_runs_the_other_is_refused(env, tmp_path):
    """Two ``featup precompute`` with different settings, started at the same moment on a new output (joining this
    module's Ray): one creates the store and runs to the end, the other is refused with one line naming the holder."""
    import ray

    out = tmp_path / "out.zarr"
    child_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(env["modules"]), os.environ.get("PYTHONPATH")])),
                 "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    common = [sys.executable, "-m", "jobs.cli", "precompute", env["pattern"], "--output", str(out), *TINY,
              "--address", ray.get_runtime_context().gcs_address, "--actors", "1", "--cpus-per-actor", "1"]
    settings = {"float32": ["--dtype", "float32"], "float16": ["--dtype", "float16", "--upsampler", "bilinear"]}
    jobs = {name: subprocess.Popen([*common, *flags], env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name, flags in settings.items()}
    done = {name: (job, *job.communicate(timeout=300)) for name, job in jobs.items()}
    codes = sorted(job.returncode for job, _, _ in done.values())
    assert codes == [0, 2], {name: err[-2000:] for name, (_, _, err) in done.items()}
    winner = next(name for name, (job, _, _) in done.items() if job.returncode == 0)
    loser_err = next(err for job, _, err in done.values() if job.returncode == 2)
    store = FeatureStore.open(str(out), mode="r")
    report = store.read_report()
    assert report["status"] == "complete" and report["samples"]["ok"] == 20 and store.attrs["dtype"] == winner
    assert store.attrs["upsampler"] == ("bilinear" if winner == "float16" else "jbu")
    lines = [line for line in loser_err.splitlines() if line.strip()]
    assert len(lines) == 1, loser_err
    assert lines[0].startswith(f"featup: error: output {out}: expected no other job writing to it, got run {report['run_id']} "
                               f"(host {socket.gethostname()}, pid {jobs[winner].pid}, last heartbeat "), lines[0]


def _pythonpath(env) -> str:
    """A child job's PYTHONPATH: the tiny module's folder, then this process's (the checkout under test stays first)."""
    return os.pathsep.join(filter(None, [str(env["modules"]), os.environ.get("PYTHONPATH")]))


def _stop_group(pgid: int, grace_s: float = 5.0) -> None:
    """Waits for the killed driver's own Ray processes to exit; kills those left after ``grace_s`` (Ray leaves its node agents)."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(pgid, signal.SIGKILL)


def test_a_run_from_a_published_name_equals_the_published_math(env, tmp_path):
    """``--checkpoint featup:dino16`` alone: the backbone implied, the checkpoint downloaded from the hub (a local
    server here) with its backbone under model.0 in the DINO featurizer's layout, features equal to the published
    math (backbone -> channel norm -> the published JBU stack's arithmetic). The command runs ``--in-process`` in its
    own process, which checks that such a run never imports Ray."""
    import functools
    import http.server
    import threading

    import torch

    from featup.backbones import build_backbone
    from featup.checkpoint import load_featup_checkpoint
    from featup.upsamplers.reference import reference_stack
    from pipeline.sources.decode import decode_sample
    from pipeline.sources.shards import iter_shard_samples
    from pipeline.store.reader import open_features
    from tests.featup.conftest import featurizer_layout, training_checkpoint

    served = tmp_path / "served"
    served.mkdir()
    with torch.random.fork_rng():
        torch.manual_seed(3)
        backbone = build_backbone("dino16", "random")
    content = training_checkpoint(backbone.dim, backbone_state=featurizer_layout("dino16", backbone.model.state_dict()))
    torch.save(content, served / "dino16_jbu_stack_cocostuff.ckpt")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    shard = corpus.make_good_shards(tmp_path / "in", 1, 2, size=(120, 150))[0]
    out = tmp_path / "hub.zarr"
    child_env = {**os.environ, "FEATUP_HUB_URL": f"http://127.0.0.1:{httpd.server_address[1]}/",
                 "TORCH_HOME": str(tmp_path / "torch"), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    try:
        done = subprocess.run(
            [sys.executable, "-c", NO_RAY, "precompute", shard, "--output", str(out), "--checkpoint", "featup:dino16",
             "--image-size", "112", "--dtype", "float32", "--kernel-backend", "eager", "--batch-size", "2", "--in-process"],
            env=child_env, capture_output=True, text=True, timeout=600)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.strip().endswith("ray imported: False"), done.stderr[-3000:]
    reader = open_features(str(out))
    assert reader.attrs["backbone"] == "dino16" and reader.attrs["checkpoint"] == "featup:dino16"
    assert reader.attrs["backbone_weights"].startswith("checkpoint:")  # one download gave the whole model

    ckpt = load_featup_checkpoint(str(served / "dino16_jbu_stack_cocostuff.ckpt"), backend="eager")
    model = build_backbone("dino16", "checkpoint", checkpoint=ckpt)
    from pipeline.precompute.plan import make_plan

    spec = make_plan(helpers.tiny_config([shard], str(tmp_path / "spec.zarr"), backbone="dino16", weights="random",
                                         image_size=112)).spec
    for i, raw in enumerate(iter_shard_samples(shard)):
        image = decode_sample(raw, spec).image[None]  # (1, 3, 112, 112), as the job's workers decode it
        with torch.inference_mode():
            expected = reference_stack(ckpt.upsampler, ckpt.normalize(model(image)), image)[-1][0]  # (384, 112, 112)
        got = reader[i]["features"]
        assert float((got - expected).abs().max()) <= 1e-4 * float(expected.abs().max()), i


def test_cuda_on_a_machine_without_one_is_refused_before_ray_starts(env, tmp_path):
    """``--device cuda`` where torch sees no GPU: one clear line, exit 2, and no Ray was ever started (its temp folder,
    which every Ray start fills, stays empty)."""
    ray_tmp = tmp_path / "ray-tmp"
    ray_tmp.mkdir()
    child_env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": _pythonpath(env)}
    done = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "precompute", env["pattern"], "--output", str(tmp_path / "out.zarr"), *TINY,
         "--device", "cuda"], env=child_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert lines == ["featup: error: device: expected an available device, got 'cuda' but CUDA is not available"], lines
    assert not list(ray_tmp.iterdir())
    assert not (tmp_path / "out.zarr").exists()


def test_a_successor_read_from_a_url_runs_on_the_actors_and_the_store_records_it(env, tmp_path):
    """``--upsampler naf --checkpoint http://...``: the driver and the Ray actors read the weights from the URL; the
    store records the kind, the URL and the file's sha256 and the normalisation the guidance image was given in."""
    import hashlib

    from pipeline.store.reader import open_features
    from tests.helpers import successors

    ckpt = successors.save_successor("naf", tmp_path / "served" / "naf.pth")
    shard = str(env["root"] / "in" / "shard-000000.tar")
    out = tmp_path / "naf.zarr"
    with successors.file_server(tmp_path / "served") as server:
        code = main(["precompute", shard, "--output", str(out), "--backbone", helpers.TINY_BACKBONE, "--weights", "random",
                     "--image-size", str(successors.NAF_MIN_SIZE), "--dtype", "float32", "--upsampler", "naf",
                     "--checkpoint", server.url + "naf.pth"])  # on the run's Ray: the actors read the weights too
    assert code == 0 and "/naf.pth" in server.gets()
    reader = open_features(str(out))
    attrs = reader.attrs
    assert (attrs["upsampler"], attrs["checkpoint"]) == ("naf", server.url + "naf.pth")
    assert attrs["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert attrs["guidance_mean"] == [0.485, 0.456, 0.406] and len(reader) == 5
    assert reader[4]["features"].shape == (16, successors.NAF_MIN_SIZE, successors.NAF_MIN_SIZE)
