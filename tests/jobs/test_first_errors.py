"""The first errors a new user meets end in one ``featup: error:`` line naming the URL or path and what to do, before
any work (no model loaded, no Ray started, nothing written): outputs that cannot be created, and storage without
credentials, with rejected credentials, with no such bucket, or with access denied, for inputs and outputs alike.

S3 is moto's server (``s3_server``), behind the fault proxy where it must answer as AWS does to a refused key or a
denied action (moto accepts any credentials and applies no bucket policy unless its IAM emulation is switched on
for the whole process). Tests run as root, so "no permission" and "read-only" are made real: the capabilities that
let root pass file modes are dropped (``setpriv``), and a read-only tmpfs is mounted in a private mount namespace.
"""

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.helpers import corpus
from tests.helpers.faultproxy import FaultProxy
from tests.helpers.precompute import ray_paused

from jobs.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MODEL = ["--backbone", "featup_tiny_net:tiny", "--weights", "random", "--image-size", "32"]  # never loaded: refused first
AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
           "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE",
           "AWS_ROLE_ARN")


@pytest.fixture(scope="module", autouse=True)
def no_ray_in_this_process():
    """A refused command must start no Ray: the check means something only where none runs yet (under xdist an
    earlier module on this worker may have started the session's Ray; it is paused for this module)."""
    with ray_paused():
        yield


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return corpus.make_good_shards(tmp_path_factory.mktemp("first-errors"), n_shards=1, per_shard=2)[0]


def _refused(capsys, *args) -> str:
    """Runs ``featup precompute ARGS``: it must exit 2 with one ``featup: error:`` line and start nothing."""
    import ray

    code = main(["precompute", *map(str, args), *MODEL])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("featup: error: "), captured.err
    assert not ray.is_initialized() and captured.out == ""
    return lines[0]


# ---- local outputs ------------------------------------------------------------------------------------------------


def test_an_output_that_cannot_be_created_is_refused_naming_it(shard, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    cases = {  # output -> what the line says
        "/proc/featup-test.zarr": "got /proc, where no new file can be made",  # a special file system: the parent can't be made
        a_file / "out.zarr": f"expected a path through folders, got {a_file}, which is a file",
        a_file: "expected a folder for the store (or nothing there yet), got a file",
        "/sys/featup-test/out.zarr": "got no permission to write in /sys",  # sysfs refuses root too
    }
    for output, words in cases.items():
        line = _refused(capsys, shard, "--output", output)
        assert f"--output {output}: " in line and words in line, line
    assert not (tmp_path / "a-file" / "out.zarr").exists() and a_file.read_text() == "not a folder"


def test_train_jbu_checks_its_checkpoint_path_and_inputs_first_too(shard, tmp_path, capsys):
    train = ["train-jbu", shard, "--backbone", "featup_tiny_net:tiny", "--weights", "random", "--image-size", "32"]
    for output, words in {"/proc/jbu.ckpt": "got /proc, where no new file can be made", tmp_path: "expected a file path, got a folder"}.items():
        assert main([*train, "--output", str(output)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"featup: error: --output {output}: ") and words in lines[0], lines


_ROOTLESS = """
import sys
from jobs.cli import main
code = main(["precompute", sys.argv[1], "--output", sys.argv[2], "--backbone", "featup_tiny_net:tiny", "--weights", "random"])
sys.exit(code)
"""


def _isolated(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})


@pytest.mark.skipif(not shutil.which("setpriv") or not shutil.which("unshare"), reason="needs setpriv and unshare (util-linux)")
def test_read_only_and_unwritable_outputs_are_refused_for_root_too(shard, tmp_path):
    """One child process each: a folder of mode 555 with root's file-mode override dropped, and a read-only tmpfs."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--inh-caps=-all"]
    try:
        done = _isolated([*drop, sys.executable, "-c", _ROOTLESS, shard, str(locked / "new" / "out.zarr")])
    finally:
        locked.chmod(0o755)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert f"featup: error: --output {locked}/new/out.zarr: " in done.stderr
    assert f"no permission to write in {locked}" in done.stderr and not (locked / "new").exists()

    mount = tmp_path / "ro"
    mount.mkdir()
    script = f'mount -t tmpfs -o ro tmpfs "{mount}" && exec "$0" "$@"'
    done = _isolated(["unshare", "--mount", "sh", "-c", script, sys.executable, "-c", _ROOTLESS, shard, str(mount / "out.zarr")])
    if done.returncode != 2 and "featup" not in done.stderr:
        pytest.skip(f"no private mount namespace here: {done.stderr.strip()[:200]}")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert f"featup: error: --output {mount}/out.zarr: " in done.stderr and f"{mount} on a read-only file system" in done.stderr


# ---- object stores ------------------------------------------------------------------------------------------------


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    """No AWS credentials anywhere botocore looks: environment, config files, instance metadata (never queried)."""
    for name in AWS_ENV:
        monkeypatch.delenv(name, raising=False)
    empty = tmp_path / "empty-aws-config"
    empty.write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # a real machine would ask 169.254.169.254: not from a test


def _endpoint(url: str) -> list[str]:
    """Storage options reaching ``url`` with no credentials of their own (a fresh s3fs instance: no cached client)."""
    return ["--storage-option", f"client_kwargs.endpoint_url={url}", "--storage-option", "skip_instance_cache=true"]


@pytest.mark.parametrize("side", ["output", "input"])
def test_no_credentials_is_one_line_saying_how_to_give_them(s3_server, no_credentials, shard, tmp_path, capsys, side):
    remote = s3_server.url("no-credentials")
    inputs, output = (shard, f"{remote}/out.zarr") if side == "output" else (f"{remote}/shard-000000.tar", tmp_path / "out.zarr")
    line = _refused(capsys, inputs, "--output", output, *_endpoint(s3_server.endpoint_url))
    named = f"--output {output}" if side == "output" else f"input {inputs}"
    assert f"featup: error: {named}: expected storage credentials, got none (NoCredentialsError" in line
    assert "instance profile" in line and "--storage-option key=" in line
    assert not (tmp_path / "out.zarr").exists()


@pytest.mark.parametrize("side", ["output", "input"])
def test_an_unknown_bucket_is_named(s3_server, shard, tmp_path, capsys, side):
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    options = ["--storage-option", f"client_kwargs.endpoint_url={s3_server.endpoint_url}"]
    inputs, output = (shard, f"s3://{bucket}/out.zarr") if side == "output" else (f"s3://{bucket}/shard-{{0..3}}.tar", tmp_path / "o.zarr")
    line = _refused(capsys, inputs, "--output", output, *options)
    named = f"--output {output}" if side == "output" else f"input s3://{bucket}/shard-0.tar"
    assert f"featup: error: {named}: expected an existing bucket, got none named '{bucket}'" in line, line
    assert "correct the bucket name" in line


@pytest.mark.parametrize("answer, words", [
    ("deny", "expected a location these credentials may {verb}, got access denied (PermissionError"),
    ("reject_credentials", "expected credentials the storage accepts, got ones it rejects (PermissionError"),
])
def test_access_denied_and_rejected_credentials_are_told_apart(s3_server, shard, tmp_path, capsys, answer, words):
    """The proxy answers every request as AWS answers a denied action or an unknown access key (with its body)."""
    host, port = s3_server.endpoint_url.rsplit("/", 1)[1].split(":")
    remote = s3_server.url("refused")
    with FaultProxy(host, int(port)) as proxy:
        getattr(proxy, answer)(1000)
        options = ["--storage-option", f"client_kwargs.endpoint_url={proxy.url}", "--io-retry-seconds", "5"]
        out_line = _refused(capsys, shard, "--output", f"{remote}/out.zarr", *options)
        in_line = _refused(capsys, f"{remote}/shard-000000.tar", "--output", tmp_path / "out.zarr", *options)
    assert f"--output {remote}/out.zarr: {words.format(verb='write')}" in out_line, out_line
    assert f"input {remote}/shard-000000.tar: {words.format(verb='read')}" in in_line, in_line
    assert ("s3:PutObject" in out_line and "s3:GetObject" in in_line) if answer == "deny" else "access key and secret" in in_line
