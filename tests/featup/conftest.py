"""Fixtures of the featup tests: random backbones (built once), their weights in the published featurizers' layouts,
and FeatUp training checkpoints assembled from them."""

from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
from torch import Tensor

from featup.backbones import Backbone, build_backbone
from featup.upsamplers.jbu import JBUStack


@pytest.fixture(scope="session")
def random_backbone() -> Callable[[str], Backbone]:
    """``get(name)``: a cached ``build_backbone(name, "random")``; tests must not modify it."""
    cache: dict[str, Backbone] = {}

    def get(name: str) -> Backbone:
        if name not in cache:
            cache[name] = build_backbone(name, "random")
        return cache[name]

    return get


@pytest.fixture
def perturbed_backbone(random_backbone) -> Callable[[str, int], Backbone]:
    """``get(name, seed)``: a copy of the random backbone with every float weight moved off its initial value.

    timm initialises norms to (1, 0) and most biases to 0; moving them makes a mapping that swaps or drops
    them visible. CLIP's projection has no bias in OpenAI's layout, so it stays 0.
    """

    def get(name: str, seed: int = 0) -> Backbone:
        backbone = copy.deepcopy(random_backbone(name))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key, value in backbone.model.state_dict().items():
                if not value.is_floating_point():
                    continue
                noise = torch.randn(value.shape, generator=gen)
                scale = 0.1 if value.ndim == 1 else 0.02  # norms and biases, then weight matrices
                value.add_(noise * scale)
                if key == "head.bias" and name in OPENAI_CLIP_NAMES:
                    value.zero_()
        return backbone

    return get


OPENAI_CLIP_NAMES = ("clip", "clip-tokens", "maskclip")
_OPENAI_NAMES = {"norm_pre": "ln_pre", "norm": "ln_post", "norm1": "ln_1", "norm2": "ln_2", "attn.proj": "attn.out_proj",
                 "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def openai_clip_model(timm_state: dict[str, Tensor], seed: int = 0) -> dict[str, Tensor]:
    """A timm CLIP ViT state dict as OpenAI's whole CLIP model: ``visual.*`` (timm's conversion inverted) + a text tower."""
    gen = torch.Generator().manual_seed(seed)
    head = timm_state.get("head.weight")
    out = {
        "visual.class_embedding": timm_state["cls_token"][0, 0],
        "visual.positional_embedding": timm_state["pos_embed"][0],
        "visual.conv1.weight": timm_state["patch_embed.proj.weight"],
        "visual.proj": head.T.contiguous() if head is not None else torch.randn(768, 512, generator=gen) * 0.03,
    }
    if "head.bias" in timm_state:
        assert not timm_state["head.bias"].any(), "OpenAI's projection has no bias"
    for key, value in timm_state.items():
        if key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            module, param = rest.rsplit(".", 1)
            name = "attn.in_proj" if module == "attn.qkv" else _OPENAI_NAMES[module]
            sep = "_" if module == "attn.qkv" else "."
            out[f"visual.transformer.resblocks.{index}.{name}{sep}{param}"] = value
        elif key.split(".")[0] in ("norm_pre", "norm"):
            module, param = key.split(".")
            out[f"visual.{_OPENAI_NAMES[module]}.{param}"] = value
    text = {  # a small text tower: the CLIP featurizers save it with the image tower
        "transformer.resblocks.0.attn.in_proj_weight": torch.randn(96, 32, generator=gen),
        "transformer.resblocks.0.ln_1.weight": torch.ones(32),
        "token_embedding.weight": torch.randn(10, 32, generator=gen),
        "positional_embedding": torch.randn(7, 32, generator=gen),
        "ln_final.weight": torch.ones(32),
        "text_projection": torch.randn(32, 512, generator=gen),
        "logit_scale": torch.ones(()),
    }
    return out | text


@pytest.fixture
def openai_clip_state() -> Callable[..., dict[str, Tensor]]:
    """The ``openai_clip_model`` helper as a fixture: a timm CLIP ViT state dict in OpenAI's layout."""
    return openai_clip_model


def featurizer_layout(name: str, timm_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``timm_state`` as the published featurizer of backbone ``name`` keeps it: the keys under ``model.0.``."""
    if name in OPENAI_CLIP_NAMES:  # CLIPFeaturizer / MaskCLIPFeaturizer: self.model = the whole OpenAI CLIP
        network = openai_clip_model(timm_state)
    elif name == "dinov2":  # DINOv2Featurizer: self.model = the DINOv2 hub ViT, with its mask token
        network = dict(timm_state) | {"mask_token": torch.zeros(1, timm_state["cls_token"].shape[-1])}
    elif name == "resnet50":  # ResNetFeaturizer: self.model = torchvision's ResNet-50, classifier included
        network = dict(timm_state) | {"fc.weight": torch.randn(1000, 2048) * 0.01, "fc.bias": torch.zeros(1000)}
    else:  # DINOFeaturizer: self.model = DINO's VisionTransformer, whose keys are timm's
        network = dict(timm_state)
    return {f"model.{k}": v for k, v in network.items()}


@pytest.fixture
def featurizer_state() -> Callable[[Backbone], dict[str, Tensor]]:
    """``get(backbone)``: its weights laid out as its published featurizer's state dict (``model.0.`` removed)."""
    return lambda backbone: featurizer_layout(backbone.name, backbone.model.state_dict())


def training_checkpoint(
    dim: int, *, backbone_state: dict[str, Tensor] | None = None, use_norm: bool = True, seed: int = 0
) -> dict:
    """A FeatUp training checkpoint: a random JBU stack for ``dim`` channels, its norm, the backbone under model.0."""
    gen = torch.Generator().manual_seed(seed)
    stack = JBUStack(dim)
    stack.reset_parameters(gen)
    state = {f"upsampler.{k}": v for k, v in stack.state_dict().items()}
    if use_norm:
        state["model.1.norm.weight"] = 1 + 0.1 * torch.randn(dim, generator=gen)
        state["model.1.norm.bias"] = 0.1 * torch.randn(dim, generator=gen)
    state |= {f"model.0.{k}": v for k, v in (backbone_state or {}).items()}
    state["scale_net.net.weight"] = torch.randn(1, dim, 1, 1, generator=gen)
    return {"state_dict": state, "hyper_parameters": {"model_type": "test"}}


@pytest.fixture
def make_checkpoint() -> Callable[..., dict]:
    """The ``training_checkpoint`` helper as a fixture."""
    return training_checkpoint


@pytest.fixture
def silent_server():
    """``http://127.0.0.1:<port>`` of a TCP server that accepts connections and never answers (a black hole)."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    listener.close()


@pytest.fixture
def closed_port_url() -> str:
    """``http://127.0.0.1:<port>`` where nothing listens (connections are refused)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
