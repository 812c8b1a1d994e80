"""Official-layout FeatUp checkpoints: loading rules and reproduction of the published outputs."""

from __future__ import annotations

import pytest
import torch

from featup.checkpoint import load_featup_checkpoint
from featup.errors import CheckpointError, InputError

CASES = ["jbu_c64_14x14_to_224x224", "jbu_c16_10x14_to_160x224"]


@pytest.mark.parametrize("method", ["composed", "upsample"])
# Every case on the eager kernels; the compiled kernels on one case (one compile per kernel, the sizes are dynamic).
@pytest.mark.parametrize("case,backend", [(case, "eager") for case in CASES] + [(CASES[0], "compiled")])
def test_reproduces_published_outputs(official_fixtures, case, backend, method):
    model = load_featup_checkpoint(str(official_fixtures / f"{case}.ckpt"), backend=backend)
    model.upsampler.method = method  # the composed kernel (CPU default) and the upsample-then-filter one
    io = torch.load(official_fixtures / f"{case}.io.pt", weights_only=True)
    # The compiled case runs the sample twice in one batch: the batch-of-2 variant the other kernel tests compile.
    batch = 2 if backend == "compiled" else 1
    with torch.inference_mode():
        lr_feats, guidance = io["raw_lr_feats"].repeat(batch, 1, 1, 1), io["guidance"].repeat(batch, 1, 1, 1)
        normed = model.normalize(lr_feats)
        stages = model.forward_stages(lr_feats, guidance)
        output = model(lr_feats, guidance)
    for i in range(batch):
        torch.testing.assert_close(normed[i : i + 1], io["normed_lr_feats"], atol=1e-4, rtol=0)
        for s, stage in enumerate(stages, start=1):
            torch.testing.assert_close(stage[i : i + 1], io[f"stage{s}"], atol=1e-4, rtol=0)
        torch.testing.assert_close(output[i : i + 1], io["output"], atol=1e-4, rtol=0)


def _official(official_fixtures, case=CASES[1]):
    return torch.load(official_fixtures / f"{case}.ckpt", weights_only=True)


def test_checkpoint_without_norm_and_with_backbone_loads(official_fixtures, tmp_path):
    ckpt = _official(official_fixtures)
    state = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("model.1.")}
    state["model.0.model.blocks.0.weight"] = torch.zeros(3)
    path = tmp_path / "no_norm.ckpt"
    torch.save({"state_dict": state}, path)
    model = load_featup_checkpoint(str(path))
    assert model.norm is None
    assert list(model.backbone_state) == ["model.blocks.0.weight"]
    io = torch.load(official_fixtures / f"{CASES[1]}.io.pt", weights_only=True)
    with torch.inference_mode():  # without the norm, the stack sees the features as given
        stages = model.forward_stages(io["normed_lr_feats"], io["guidance"])
    torch.testing.assert_close(stages[-1], io["stage4"], atol=1e-4, rtol=0)


def test_loads_through_an_fsspec_url(official_fixtures):
    import fsspec

    with fsspec.open("memory://ckpts/c16.ckpt", "wb") as f:
        f.write((official_fixtures / f"{CASES[1]}.ckpt").read_bytes())
    model = load_featup_checkpoint("memory://ckpts/c16.ckpt")
    assert model.dim == 16 and model.sha256 and len(model.sha256) == 64


def test_unknown_keys_are_refused(official_fixtures, tmp_path):
    ckpt = _official(official_fixtures)
    ckpt["state_dict"]["extra_head.weight"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / "extra.ckpt")
    with pytest.raises(CheckpointError, match=r"not a FeatUp JBU checkpoint.*extra_head\.weight"):
        load_featup_checkpoint(str(tmp_path / "extra.ckpt"))


def test_missing_stage_entry_is_refused(official_fixtures, tmp_path):
    ckpt = _official(official_fixtures)
    del ckpt["state_dict"]["upsampler.up3.range_temp"]
    torch.save(ckpt, tmp_path / "partial.ckpt")
    with pytest.raises(CheckpointError, match="up3.range_temp"):
        load_featup_checkpoint(str(tmp_path / "partial.ckpt"))


def test_non_checkpoints_are_refused(tmp_path):
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(CheckpointError, match="image.png: not a readable PyTorch checkpoint"):
        load_featup_checkpoint(str(tmp_path / "image.png"))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="plain.pt: not a FeatUp checkpoint: expected a dict with a 'state_dict'"):
        load_featup_checkpoint(str(tmp_path / "plain.pt"))
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_featup_checkpoint(str(tmp_path / "missing.ckpt"))


class Payload:
    """An arbitrary class: unpickling it would mean executing code named by the file."""


def test_pickled_objects_are_not_executed(tmp_path):
    torch.save({"state_dict": {"upsampler.x": Payload()}}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_featup_checkpoint(str(tmp_path / "evil.ckpt"))


def test_wrong_channel_count_names_the_checkpoint(official_fixtures):
    path = str(official_fixtures / f"{CASES[0]}.ckpt")
    model = load_featup_checkpoint(path)
    with pytest.raises(InputError, match=r"expects 64-channel features .*got shape \(1, 32, 14, 14\)"):
        model(torch.randn(1, 32, 14, 14), torch.randn(1, 3, 224, 224))
