"""Exactly one creator per store: two real processes create one new store (and overwrite one) at the same moment, round
after round, on local folders and moto's S3 server; each round one creates it, the other writes nothing."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pipeline.store.features import ArraySpec, FeatureStore
from pipeline.store.location import LOCK_FILE

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
# Two jobs with different settings: other rows, arrays, dtypes, keys and attributes.
SETTINGS = {
    "a": {"num_rows": 3, "arrays": [["features", [2, 4, 4], "float16"]], "attrs": {"creator": "a"},
          "keys": ["a0", "a1", "a2"]},
    "b": {"num_rows": 5, "arrays": [["features", [3, 2, 2], "float32"], ["lowres", [3, 1, 1], "float32"]],
          "attrs": {"creator": "b", "upsampler": "bilinear"}, "keys": [f"b{i}" for i in range(5)]},
}
NEW_ROUNDS, OVERWRITE_ROUNDS = 20, 4

# One process per job, started once: each round it reads a task, says "ready", waits for "go" (sent to both at
# once), creates the store and says "created <run>" or "refused: <error>". A "job" task holds the lock, as
# precompute does for its whole run, until the next line; a "create" task holds it for the creation alone.
_WORKER = """
import json, sys, uuid
from featup.errors import FeatUpError
from pipeline.store.features import ArraySpec, FeatureStore
name, s = sys.argv[1], json.loads(sys.argv[2])
specs = [ArraySpec(n, tuple(shape), dtype, ("channel", n + "_y", n + "_x")) for n, shape, dtype in s["arrays"]]
print("ready", flush=True)
for line in sys.stdin:
    task = json.loads(line)
    run_id = f"run-{name}-{uuid.uuid4().hex[:6]}"
    print("ready", flush=True)
    sys.stdin.readline()  # go
    lock = None
    try:
        if task["mode"] == "job":
            lock = FeatureStore.lock_output(task["url"], run_id, task["options"], overwrite=task["overwrite"])
        FeatureStore.create(task["url"], num_rows=s["num_rows"], arrays=specs, attrs=s["attrs"], keys=s["keys"],
                            storage_options=task["options"], overwrite=task["overwrite"], lock=lock)
        print("created", run_id, flush=True)
    except FeatUpError as e:
        print("refused:", str(e).replace("\\n", " "), flush=True)
    sys.stdin.readline()  # done: a job releases its lock
    if lock is not None:
        lock.release()
    print("released", flush=True)
"""


@pytest.fixture(scope="module")
def workers():
    procs = {name: subprocess.Popen([sys.executable, "-c", _WORKER, name, json.dumps(s)], cwd=ROOT, text=True,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE) for name, s in SETTINGS.items()}
    for proc in procs.values():
        assert proc.stdout.readline().strip() == "ready"
    yield procs
    for proc in procs.values():
        proc.stdin.close()
        proc.wait(30)


def _round(workers, url, options, mode, overwrite=False) -> dict[str, str]:
    """Both workers create ``url`` at the same moment; name -> their answer."""
    task = json.dumps({"url": url, "options": options, "mode": mode, "overwrite": overwrite}) + "\n"
    for proc in workers.values():
        proc.stdin.write(task)
        proc.stdin.flush()
    for proc in workers.values():
        assert proc.stdout.readline().strip() == "ready"
    for proc in workers.values():
        proc.stdin.write("go\n")
    for proc in workers.values():
        proc.stdin.flush()
    answers = {name: proc.stdout.readline().strip() for name, proc in workers.items()}
    for proc in workers.values():
        proc.stdin.write("done\n")
        proc.stdin.flush()
    for proc in workers.values():
        assert proc.stdout.readline().strip() == "released"
    return answers


def _assert_entirely(url, options, name) -> None:
    """The store at ``url`` is whole and exactly the one ``name`` creates: nothing of the other job in it."""
    s = SETTINGS[name]
    store = FeatureStore.open(url, options, mode="r")
    assert store.attrs == s["attrs"] and store.num_rows == s["num_rows"] and store.sample_keys() == s["keys"]
    assert store.array_names == tuple(a[0] for a in s["arrays"])
    for array, shape, dtype in s["arrays"]:
        assert store.array(array).shape == (s["num_rows"], *shape) and store.array(array).dtype == np.dtype(dtype)
    entries = {e.rstrip("/").rsplit("/", 1)[-1] for e in store.fs.ls(store.root, detail=False)}
    assert entries == {"zarr.json", "sample", "_featup", *store.array_names}
    assert store.lock_holder() is None and store.read_index().num_rows == 0


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_processes_creating_one_store_at_once_give_one_creator_each_round(workers, where, tmp_path, request):
    if where == "local":
        urls, options = [str(tmp_path / f"store-{i}.zarr") for i in range(NEW_ROUNDS)], None
    else:
        s3 = request.getfixturevalue("s3_server")
        urls, options = [s3.url(f"race-{i}") for i in range(NEW_ROUNDS)], s3.storage_options
    raced = 0  # "create" rounds in which the loser met the winner's lock (not only its finished store)
    for i, url in enumerate(urls):  # a new store; every other round as a job that holds the lock for its whole run
        mode = "job" if i % 2 else "create"
        answers = _round(workers, url, options, mode)
        creators = [name for name, answer in answers.items() if answer.startswith("created")]
        assert len(creators) == 1, (i, answers)
        winner, loser = creators[0], next(n for n in answers if n != creators[0])
        refusal, run = answers[loser], answers[winner].split()[1]
        if mode == "job":
            assert refusal.startswith(f"refused: output {url}: expected no other job writing to it, got run {run} ("), refusal
        elif "expected no other job writing to it" in refusal:  # create() alone holds a lock of its own while it writes
            assert refusal.startswith(f"refused: output {url}: expected no other job writing to it, got run create-"), refusal
            raced += 1
        else:  # the winner had made the store and let go of its lock before the loser asked
            assert "expected a new store, got an existing FeatUp store" in refusal, refusal
        _assert_entirely(url, options, winner)
    print(f"{where}: {raced} of {NEW_ROUNDS // 2} create() rounds met the other's lock")
    for i, url in enumerate(urls[:OVERWRITE_ROUNDS]):  # --overwrite of an existing store by both at once
        answers = _round(workers, url, options, "job", overwrite=True)
        creators = [name for name, answer in answers.items() if answer.startswith("created")]
        assert len(creators) == 1, (i, answers)
        _assert_entirely(url, options, creators[0])


def test_an_interrupted_creation_is_made_again_and_a_lock_alone_is_no_data(tmp_path):
    """A creation that died half-way (root group without its final attributes) is no store and no foreign data: the next
    creator makes the store again; a location holding only a released lock's files counts as new."""
    import zarr

    url = str(tmp_path / "half.zarr")
    zarr.create_group(url, attributes={"featup_creating": {"format": 2}}).create_array("features", shape=(9,), dtype="uint8")
    assert not FeatureStore.exists(url)
    spec = [ArraySpec("features", (1, 2, 2), "float16", ("channel", "y", "x"))]
    store = FeatureStore.create(url, num_rows=2, arrays=spec, attrs={"n": 1}, keys=["a", "b"])
    assert store.array("features").shape == (2, 1, 2, 2) and FeatureStore.exists(url)

    bare = tmp_path / "bare.zarr"
    FeatureStore.lock_output(str(bare), "run-a").release()  # a job refused after taking the lock leaves its guard file
    assert (bare / os.path.dirname(LOCK_FILE)).is_dir() and not (bare / LOCK_FILE).exists()
    FeatureStore.create(str(bare), num_rows=1, arrays=spec, attrs={}, keys=["a"])
    assert FeatureStore.open(str(bare), mode="r").sample_keys() == ["a"]
