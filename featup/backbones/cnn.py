"""CNN backbones: the last feature map of a timm convolutional network (``forward_features``)."""

from __future__ import annotations

from torch import Tensor, nn

from featup.backbones.base import Backbone
from featup.backbones.registry import BACKBONES
from featup.backbones.timm_models import create_timm_model, timm_norm, timm_stride


class CNNBackbone(Backbone):
    """Last-stage feature map of a timm model; stride from ``feature_info``, channels from ``num_features``."""

    def __init__(self, name: str, model: nn.Module, weights_id: str) -> None:
        mean, std = timm_norm(model)
        super().__init__(name, timm_stride(model), model.num_features, mean, std, weights_id)
        self.model = model
        self.channels_last_output = getattr(model, "output_fmt", "NCHW") == "NHWC"

    def forward_features(self, images: Tensor) -> Tensor:
        features = self.model.forward_features(images)  # (B, C, h, w), or (B, h, w, C) for NHWC models
        if self.channels_last_output:
            features = features.permute(0, 3, 1, 2)  # (B, C, h, w)
        return features


def cnn_backbone(name: str, model_name: str, weights: str) -> CNNBackbone:
    """A CNNBackbone named ``name`` around timm model ``model_name`` with ``weights``."""
    model, weights_id = create_timm_model(model_name, weights, spec=name)
    return CNNBackbone(name, model, weights_id)


@BACKBONES.register("resnet50")
def resnet50(weights: str = "auto") -> CNNBackbone:
    """torchvision's ImageNet ResNet-50, last stage (layer4): stride 32, 2048 channels."""
    return cnn_backbone("resnet50", "resnet50.tv_in1k", weights)
