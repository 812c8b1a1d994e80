"""Every Python example of README.md and docs/ runs, and every ``<!-- run -->`` shell block's ``featup`` lines exit 0,
against a tiny store made in process (no Ray, no model): ``train.zarr`` in the current folder.

A page's blocks run in order in one namespace, as a reader pastes them into one session; a failure names the page and
the line (the traceback's file and line numbers are the Markdown file's).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import docs as doc_helpers

KNOWN_LANGS = {"python", "bash", "text", "json", "yaml"}
ROWS, CHANNELS, SIZE, LOW, CLASSES = 8, 64, 128, 8, 27
FAILED_ROW = 6  # one error row, as a real run has: the reader serves 7 samples
ATTRS = {"backbone": "dino16", "backbone_weights": "random", "upsampler": "jbu", "image_size": SIZE, "dtype": "float16",
         "made_by": "tests/docs/test_examples.py (a fixture, not a model)"}


def _runnable(page: Path) -> bool:
    return any(b.marker is None and b.lang == "python" or b.marker == "run" for b in doc_helpers.blocks(page))


PAGES = [p for p in doc_helpers.pages() if _runnable(p)]


def write_store(url: str, noise: float, seed: int = 0) -> None:
    """A store as ``featup precompute --save-image --save-lowres --labels seg.png`` lays it out (default codec, 64-pixel
    tiles, two committed shards, one failed row) whose features are a noisy embedding of the labels, so a linear probe
    learns something."""
    from pipeline.store.codecs import StorageCodec
    from pipeline.store.features import ArraySpec, FeatureStore
    from tests.helpers.store import index_table

    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    seg = np.stack([((yy // 32) * 5 + (xx // 32) * 3 + r) % CLASSES for r in range(ROWS)]).astype(np.uint8)
    embedding = rng.standard_normal((CLASSES, CHANNELS)).astype(np.float32)
    feats = embedding[seg].transpose(0, 3, 1, 2) + noise * rng.standard_normal((ROWS, CHANNELS, SIZE, SIZE), np.float32)
    lowres = feats.reshape(ROWS, CHANNELS, LOW, SIZE // LOW, LOW, SIZE // LOW).mean((3, 5))
    image = np.stack([seg * 9, np.broadcast_to(xx * 2, seg.shape), np.full_like(seg, 128)], -1).astype(np.uint8)
    specs = [
        ArraySpec("features", (CHANNELS, SIZE, SIZE), "float16", ("channel", "y", "x"), spatial_axes=(1, 2)),
        ArraySpec("lowres", (CHANNELS, LOW, LOW), "float16", ("channel", "lowres_y", "lowres_x"), spatial_axes=(1, 2)),
        ArraySpec("image", (SIZE, SIZE, 3), "uint8", ("image_y", "image_x", "rgb"), spatial_axes=(0, 1)),
        ArraySpec("seg.png", (SIZE, SIZE), "uint8", ("image_y", "image_x"), spatial_axes=(0, 1)),
    ]
    keys = [f"photo-{r:04d}" for r in range(ROWS)]
    store = FeatureStore.create(url, num_rows=ROWS, arrays=specs, attrs=ATTRS, keys=keys, codec=StorageCodec())
    ok = [r for r in range(ROWS) if r != FAILED_ROW]
    data = {"features": feats, "lowres": lowres, "image": image, "seg.png": seg}
    for r in ok:
        store.write_rows(r, {name: value[r : r + 1] for name, value in data.items()})
    half = ROWS // 2
    for s, rows in enumerate((range(half), range(half, ROWS))):
        store.commit_shard(s, index_table(list(rows), [FAILED_ROW], shard=f"train-{s:06d}.tar", keys=keys))


@pytest.fixture(scope="module")
def docs_folder(tmp_path_factory) -> Path:
    """A folder holding ``train.zarr``, the store the examples name."""
    folder = tmp_path_factory.mktemp("docs")
    write_store(str(folder / "train.zarr"), noise=0.5)
    return folder


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # the README's num_workers=4, on 2 cores
@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(doc_helpers.ROOT)))
def test_the_examples_of_the_page_run(page, docs_folder, monkeypatch, one_torch_thread):
    from jobs.cli import main

    monkeypatch.chdir(docs_folder)
    namespace: dict = {"__name__": "__docs__"}
    for block in doc_helpers.blocks(page):
        if block.marker == "illustrative":
            continue
        if block.lang == "python":
            code = compile("\n" * (block.line - 1) + block.text, str(block.path), "exec")  # tracebacks point at the page
            with contextlib.redirect_stdout(io.StringIO()):
                exec(code, namespace)
        elif block.marker == "run":
            for line, command in doc_helpers.shell_commands(block):
                words = doc_helpers.words(command)
                assert words[0] == "featup", f"{block.path.name}:{line}: only featup commands run in process, got {command!r}"
                assert main(words[1:]) == 0, f"{block.path.name}:{line}: {command!r} failed"


def test_every_block_is_run_checked_or_illustrative_with_a_reason():
    problems = []
    for page in doc_helpers.pages():
        for block in doc_helpers.blocks(page):
            if block.lang not in KNOWN_LANGS:
                problems.append(f"{block.where}: fence language {block.lang!r}, expected one of {sorted(KNOWN_LANGS)}")
            if block.marker == "illustrative" and not block.reason:
                problems.append(f"{block.where}: <!-- illustrative --> needs a reason")
            if block.marker == "run" and block.lang != "bash":
                problems.append(f"{block.where}: <!-- run --> is for bash blocks (python blocks always run)")
    assert problems == []
