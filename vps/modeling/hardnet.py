"""HarDNet-85 as a feature-pyramid backbone for the prompt generator g.

HarDNet (Chao et al., ICCV 2019, "HarDNet: A Low Memory Traffic Network") is the encoder AutoSAM
(Shaharabany et al., 2023) and HarDNet-MSEG use for g. This is the reference architecture of
PingoLH/Pytorch-HarDNet ``hardnet.py`` (arch 85, standard 3x3 convolutions, max-pool downsampling):

    first_ch = [48, 96], ch_list = [192, 256, 320, 480, 720, 1280], grmul = 1.7,
    gr = [24, 24, 28, 36, 48, 256], n_layers = [8, 16, 16, 16, 16, 4], downSamp = [1, 0, 1, 0, 1, 0]

The modules sit in ``self.base`` at the same indices as in the reference code, so a state dict of the
reference model (``base.<i>.…``, e.g. the ImageNet ``hardnet85-a28faa00.pth`` a user brings) loads
into it; the classifier keys (``base.19.*``) are simply not used. Nothing is downloaded: the model is
randomly initialised unless ``build_backbone(..., weights=path)`` is given a local file.

Feature levels (as taken by AutoSAM's ``models/hardnet.py``, ``self.list = [1, 4, 9, 14, 18]``):

    level  base index  stride  channels
      0        1          2        96
      1        4          4       192
      2        9          8       320
      3       14         16       720
      4       18         32      1280

``out_indices`` picks levels by that index, which is timm's ``features_only`` convention (level i has
stride 2^(i+1)); the default ``(1, 2, 3, 4)`` gives strides 4, 8, 16, 32 like the EfficientNet
default of g. Only the layers up to the deepest requested level are built.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import nn

# Level -> (index in ``base`` after which the feature is taken, stride, channels).
HARDNET85_LEVELS: Tuple[Tuple[int, int, int], ...] = ((1, 2, 96), (4, 4, 192), (9, 8, 320), (14, 16, 720),
                                                      (18, 32, 1280))
HARDNET85_CONFIG: Dict[str, Any] = dict(
    first_ch=[48, 96],
    ch_list=[192, 256, 320, 480, 720, 1280],
    grmul=1.7,
    gr=[24, 24, 28, 36, 48, 256],
    n_layers=[8, 16, 16, 16, 16, 4],
    downsamp=[1, 0, 1, 0, 1, 0],
)
# HarDNet's normalisation is ImageNet's (the reference training script uses torchvision's values).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConvLayer(nn.Sequential):
    """Conv (no bias) + BatchNorm + ReLU6; keys ``conv``/``norm`` as in the reference."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.add_module("conv", nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False))
        self.add_module("norm", nn.BatchNorm2d(out_channels))
        self.add_module("relu", nn.ReLU6(inplace=True))


class HarDBlock(nn.Module):
    """A harmonic dense block: layer k reads layers k - 2^i for every 2^i dividing k.

    The output concatenates the odd layers and the last one (the block input is not kept).
    """

    @staticmethod
    def link(layer: int, base_channels: int, growth_rate: int, grmul: float) -> Tuple[int, int, List[int]]:
        """(output channels, input channels, indices of the layers it reads) of layer ``layer``."""
        if layer == 0:
            return base_channels, 0, []
        out_channels: float = growth_rate
        links = []
        for i in range(10):
            dv = 2 ** i
            if layer % dv == 0:
                links.append(layer - dv)
                if i > 0:
                    out_channels *= grmul
        out_channels = int(int(out_channels + 1) / 2) * 2
        in_channels = sum(HarDBlock.link(k, base_channels, growth_rate, grmul)[0] for k in links)
        return out_channels, in_channels, links

    def __init__(self, in_channels: int, growth_rate: int, grmul: float, n_layers: int) -> None:
        super().__init__()
        self.links: List[List[int]] = []
        layers = []
        self.out_channels = 0
        for i in range(n_layers):
            out_ch, in_ch, links = self.link(i + 1, in_channels, growth_rate, grmul)
            self.links.append(links)
            layers.append(ConvLayer(in_ch, out_ch))
            if i % 2 == 0 or i == n_layers - 1:
                self.out_channels += out_ch
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [x]
        for layer, links in zip(self.layers, self.links):
            inputs = [outputs[i] for i in links]
            outputs.append(layer(torch.cat(inputs, 1) if len(inputs) > 1 else inputs[0]))
        last = len(outputs) - 1
        return torch.cat([t for i, t in enumerate(outputs) if i == last or i % 2 == 1], 1)


class _FeatureInfo:
    """The part of timm's ``FeatureInfo`` that vps uses: ``channels()``, ``reduction()``."""

    def __init__(self, levels: Sequence[Tuple[int, int, int]]) -> None:
        self._levels = list(levels)

    def channels(self) -> List[int]:
        return [c for _, _, c in self._levels]

    def reduction(self) -> List[int]:
        return [s for _, s, _ in self._levels]


class HarDNet85Features(nn.Module):
    """HarDNet-85 without its classifier: B x 3 x H x W -> list of feature maps, finest first.

    ``with_classifier=True`` adds the reference ImageNet head as ``base.19`` (only used to check the
    architecture's published size, 36.7M parameters); ``forward`` never runs it.
    """

    def __init__(self, out_indices: Sequence[int] = (1, 2, 3, 4), with_classifier: bool = False) -> None:
        super().__init__()
        out_indices = sorted({int(i) for i in out_indices})
        if not out_indices or out_indices[0] < 0 or out_indices[-1] >= len(HARDNET85_LEVELS):
            raise ValueError(f"hardnet85 out_indices must be in 0..{len(HARDNET85_LEVELS) - 1}, got {out_indices}")
        cfg = HARDNET85_CONFIG
        grmul = cfg["grmul"]
        base: List[nn.Module] = [
            ConvLayer(3, cfg["first_ch"][0], kernel=3, stride=2),
            ConvLayer(cfg["first_ch"][0], cfg["first_ch"][1], kernel=3),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        ]
        channels = cfg["first_ch"][1]
        blocks = len(cfg["n_layers"])
        for i in range(blocks):
            block = HarDBlock(channels, cfg["gr"][i], grmul, cfg["n_layers"][i])
            base.append(block)
            if i == blocks - 1:
                base.append(nn.Dropout(0.1))
            base.append(ConvLayer(block.out_channels, cfg["ch_list"][i], kernel=1))
            channels = cfg["ch_list"][i]
            if cfg["downsamp"][i]:
                base.append(nn.MaxPool2d(kernel_size=2, stride=2))
        if with_classifier:
            base.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
                                      nn.Linear(channels, 1000)))
        self.levels = [HARDNET85_LEVELS[i] for i in out_indices]
        self.out_indices = tuple(out_indices)
        last = self.levels[-1][0]
        self.base = nn.ModuleList(base if with_classifier else base[: last + 1])
        self._taps = {index: n for n, (index, _, _) in enumerate(self.levels)}
        self.feature_info = _FeatureInfo(self.levels)
        self.pretrained_cfg = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        features = []
        for index, layer in enumerate(self.base):
            x = layer(x)
            if index in self._taps:
                features.append(x)
                if len(features) == len(self._taps):
                    break
        return features
