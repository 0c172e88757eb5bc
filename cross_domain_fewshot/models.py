"""Few-shot ResNet backbones with feature-wise transformation (FWT) layers, and metric heads.

Follows Tseng et al. (ICLR 2020, "Cross-Domain Few-Shot Classification via Learned Feature-Wise
Transformation") and the few-shot ResNets of Chen et al. (ICLR 2019, "A Closer Look at Few-shot
Classification"): a 7×7/2 stem, 3×3 max-pool, four stages of basic blocks (64, 128, 256, 512
channels), no final pooling, so a 224×224 image gives a 512×7×7 feature map (RelationNet compares
maps; ProtoNet and the linear classifier average-pool it to a 512-d vector).

The FWT layer sits after the second BatchNorm of every residual block and after the shortcut
BatchNorm (as in the LFT code). In training mode with FWT on, the normalised features become

    γ·x + β,   γ = 1 + N(0,1)·softplus(θ_γ),   β = N(0,1)·softplus(θ_β)

with one noise draw per channel (shared by all images and positions of the forward pass),
θ_γ = 0.3 and θ_β = 0.5 at initialisation, softplus with β = 100 (≈ identity for positive θ).
FWT is switched on and off per forward pass with ``feature_transform(model, enabled, seed)``; a
seed makes the noise of a forward pass reproducible. ``cross_domain_fewshot.lft`` chooses the seeds:
a fresh one for every EvoGrad candidate (the LFT/EvoGrad code draws new noise in every forward
pass), or one per iteration shared by all passes (common random numbers).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FWT_PARAM_PREFIX = "fwt_"
SOFTPLUS_BETA = 100.0
BLOCKS_PER_STAGE = {"ResNet10": (1, 1, 1, 1), "ResNet18": (2, 2, 2, 2), "ResNet34": (3, 4, 6, 3)}


def is_fwt_param(name: str) -> bool:
    """True for the FWT parameters θ_γ, θ_β (the hyperparameters of LFT)."""
    return name.rsplit(".", 1)[-1].startswith(FWT_PARAM_PREFIX)


class FeatureWiseBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d followed by a learned, noisy feature-wise affine transformation (when enabled)."""

    def __init__(self, num_features: int, gamma_init: float = 0.3, beta_init: float = 0.5) -> None:
        super().__init__(num_features)
        self.fwt_gamma = nn.Parameter(torch.full((1, num_features, 1, 1), gamma_init))
        self.fwt_beta = nn.Parameter(torch.full((1, num_features, 1, 1), beta_init))
        self.fwt_enabled = False
        self.fwt_seed: int | None = None  # set by feature_transform; None draws from the global RNG

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        if not (self.fwt_enabled and self.training):
            return out
        generator = None
        if self.fwt_seed is not None:
            generator = torch.Generator(device=x.device).manual_seed(self.fwt_seed)
        shape = (1, self.num_features, 1, 1)
        noise_gamma = torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
        noise_beta = torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
        gamma = 1 + noise_gamma * F.softplus(self.fwt_gamma, beta=SOFTPLUS_BETA)
        beta = noise_beta * F.softplus(self.fwt_beta, beta=SOFTPLUS_BETA)
        return gamma * out + beta


@contextlib.contextmanager
def feature_transform(model: nn.Module, enabled: bool, seed: int | None = None) -> Iterator[None]:
    """Switch the FWT layers of ``model`` on or off for the forward passes inside the block.

    Args:
        model: any module holding ``FeatureWiseBatchNorm2d`` layers.
        enabled: FWT on (training mode only) or off.
        seed: if given, layer i draws its noise from a generator seeded with ``seed + i``, so
            every forward pass inside the block sees the same transformation.
    """
    layers = [m for m in model.modules() if isinstance(m, FeatureWiseBatchNorm2d)]
    saved = [(m.fwt_enabled, m.fwt_seed) for m in layers]
    for i, m in enumerate(layers):
        m.fwt_enabled, m.fwt_seed = enabled, (None if seed is None else seed + i)
    try:
        yield
    finally:
        for m, (on, s) in zip(layers, saved):
            m.fwt_enabled, m.fwt_seed = on, s


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` inside the block, the previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class BasicBlock(nn.Module):
    """Residual block: conv-BN-ReLU-conv-BN(+FWT) plus (1×1 conv-BN(+FWT)) shortcut, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = FeatureWiseBatchNorm2d(out_channels)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          FeatureWiseBatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNetBackbone(nn.Module):
    """Few-shot ResNet10/18/34 returning the last feature map, [B, 8·width, H/32, W/32]."""

    def __init__(self, depth: str = "ResNet10", width: int = 64) -> None:
        super().__init__()
        if depth not in BLOCKS_PER_STAGE:
            raise ValueError(f"unknown backbone {depth!r}; choose from {sorted(BLOCKS_PER_STAGE)}")
        self.stem = nn.Sequential(nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1))
        blocks, in_channels = [], width
        for stage, n_blocks in enumerate(BLOCKS_PER_STAGE[depth]):
            out_channels = width * 2 ** stage
            for j in range(n_blocks):
                blocks.append(BasicBlock(in_channels, out_channels, stride=2 if stage > 0 and j == 0 else 1))
                in_channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.out_channels = in_channels
        for m in self.modules():  # fan-out He init as in the few-shot ResNets
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.stem(x))

    def feature_size(self, image_size: int) -> int:
        """Side of the output feature map for a square input of side ``image_size``."""
        side = (image_size + 2 * 3 - 7) // 2 + 1      # stem conv
        side = (side + 2 * 1 - 3) // 2 + 1           # max-pool
        for _ in range(3):                            # three stride-2 stages
            side = (side + 2 * 1 - 3) // 2 + 1
        return side


# The authors' encoder files (``methods/backbone.py``: ``ResNet.trunk`` = conv, BatchNorm, ReLU,
# max-pool, then the blocks; ``SimpleBlock``: C1, BN1, C2, BN2, shortcut, BNshortcut; the FWT
# layer's own parameters ``gamma``, ``beta``), saved under ``feature.`` by ``BaselineTrain``.
AUTHORS_STEM = {"0": "stem.0", "1": "stem.1"}
AUTHORS_BLOCK = {"C1": "conv1", "BN1": "bn1", "C2": "conv2", "BN2": "bn2", "shortcut": "shortcut.0",
                 "BNshortcut": "shortcut.1"}
AUTHORS_FIRST_BLOCK = 4  # trunk index of the first residual block
AUTHORS_FWT = {"gamma": "fwt_gamma", "beta": "fwt_beta"}


def backbone_state_from_authors(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our ``ResNetBackbone`` state-dict keys for the ``feature.*`` entries of an authors' encoder
    state (other entries, e.g. the pretraining ``classifier.*``, are left out).

    ``feature.trunk.0.weight`` -> ``stem.0.weight``, ``feature.trunk.1.*`` -> ``stem.1.*``,
    ``feature.trunk.<4+b>.C1.weight`` -> ``blocks.<b>.conv1.weight``, ``BN1`` -> ``bn1``, ``C2`` ->
    ``conv2``, ``BN2`` -> ``bn2``, ``shortcut`` -> ``shortcut.0``, ``BNshortcut`` -> ``shortcut.1``,
    and an FWT layer's ``gamma``/``beta`` -> ``fwt_gamma``/``fwt_beta``.

    Raises:
        KeyError: for a ``feature.`` key outside that layout (the message names it).
    """
    out = {}
    for key, value in state.items():
        if not key.startswith("feature."):
            continue
        parts = key.split(".")
        if len(parts) < 4 or parts[1] != "trunk" or not parts[2].isdigit():
            raise KeyError(key)
        index, rest = parts[2], parts[3:]
        if index in AUTHORS_STEM and len(rest) == 1:
            name = f"{AUTHORS_STEM[index]}.{rest[0]}"
        elif int(index) >= AUTHORS_FIRST_BLOCK and len(rest) == 2 and rest[0] in AUTHORS_BLOCK:
            name = f"blocks.{int(index) - AUTHORS_FIRST_BLOCK}.{AUTHORS_BLOCK[rest[0]]}.{AUTHORS_FWT.get(rest[1], rest[1])}"
        else:
            raise KeyError(key)
        out[name] = value
    return out


RELATION_BN = ("batch", "running")
RELATION_INIT = ("fan_out", "pytorch")


class RelationModule(nn.Module):
    """g(concat(support map, query map)) -> relation score; two conv blocks and two linear layers.

    As in RelationNet for ResNets (Chen et al.): padding 1 when the map is smaller than 10×10;
    a 2×2 max-pool per block, skipped where the map is already 1×1 (small images in quick runs).

    Args:
        channels, side: channels and side of one backbone feature map.
        hidden: units of the first linear layer (8).
        bn: "batch": the BatchNorm layers normalise with the statistics of the current batch of
            pairs in training and in eval mode and keep no running statistics (the LFT/EvoGrad
            code, ``track_running_stats=False``); "running": PyTorch's default BatchNorm (running
            statistics, used in eval mode).
        init: "fan_out": conv weights ~ N(0, 2 / (k·k·out_channels)) (the few-shot code's
            ``init_layer``; BatchNorm γ = 1, β = 0; linear layers and conv biases PyTorch's
            default); "pytorch": PyTorch's default initialisation everywhere.
    """

    def __init__(self, channels: int, side: int, hidden: int = 8, bn: str = "batch", init: str = "fan_out") -> None:
        super().__init__()
        if bn not in RELATION_BN:
            raise ValueError(f"unknown relation-module BatchNorm {bn!r}; choose from {RELATION_BN}")
        if init not in RELATION_INIT:
            raise ValueError(f"unknown relation-module init {init!r}; choose from {RELATION_INIT}")
        padding = 1 if side < 10 else 0
        layers = []
        for in_channels in (2 * channels, channels):
            side = side + 2 * padding - 2
            layers += [nn.Conv2d(in_channels, channels, 3, padding=padding),
                       nn.BatchNorm2d(channels, track_running_stats=bn == "running"), nn.ReLU(inplace=True)]
            if side >= 2:
                layers.append(nn.MaxPool2d(2))
                side //= 2
        self.convs = nn.Sequential(*layers)
        self.fc1 = nn.Linear(channels * side * side, hidden)
        self.fc2 = nn.Linear(hidden, 1)
        if init == "fan_out":
            for m in self.convs:
                if isinstance(m, nn.Conv2d):  # std = sqrt(2 / fan_out), fan_out = k·k·out_channels
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, pairs: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(self.convs(pairs).flatten(1))))


def mlp_classifier(in_features: int, n_classes: int) -> nn.Sequential:
    """Three-layer MLP head, in → in → in → n_classes with ReLUs (the LFT code's auxiliary classifier)."""
    return nn.Sequential(nn.Linear(in_features, in_features), nn.ReLU(inplace=True),
                         nn.Linear(in_features, in_features), nn.ReLU(inplace=True),
                         nn.Linear(in_features, n_classes))


class FewShotModel(nn.Module):
    """Backbone + metric head; ``forward(episode, n_shot)`` returns query logits [n_way·n_query, n_way].

    ``episode`` is [n_way, n_shot + n_query, 3, H, W] (support images first in every class row).
    The whole episode goes through the backbone as one batch (BatchNorm statistics over support
    and query, as in the reference code). Heads: ``relationnet_softmax`` (relation scores used as
    logits with the softmax cross-entropy) or ``protonet`` (negative squared Euclidean distance to
    the class means of the pooled features).
    """

    def __init__(self, backbone: ResNetBackbone, head: str, image_size: int, relation_hidden: int = 8,
                 relation_bn: str = "batch", relation_init: str = "fan_out") -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        if head == "relationnet_softmax":
            self.relation = RelationModule(backbone.out_channels, backbone.feature_size(image_size), relation_hidden,
                                           relation_bn, relation_init)
        elif head != "protonet":
            raise ValueError(f"unknown head {head!r}; choose relationnet_softmax or protonet")

    def forward(self, episode: Tensor, n_shot: int) -> Tensor:
        n_way, per_class = episode.shape[:2]
        n_query = per_class - n_shot
        maps = self.backbone(episode.flatten(0, 1))                    # [n_way·per_class, C, h, w]
        maps = maps.view(n_way, per_class, *maps.shape[1:])
        support, query = maps[:, :n_shot], maps[:, n_shot:].flatten(0, 1)  # query: [n_way·n_query, C, h, w]
        if self.head == "protonet":
            prototypes = support.mean(dim=(1, 3, 4))                     # [n_way, C]
            # explicit squared distance: cdist has no double backward (needed by lft_second_order)
            return -(query.mean(dim=(2, 3)).unsqueeze(1) - prototypes.unsqueeze(0)).pow(2).sum(-1)
        prototypes = support.mean(dim=1)                                 # [n_way, C, h, w]
        n_queries = n_way * n_query
        pairs = torch.cat([prototypes.unsqueeze(0).expand(n_queries, *prototypes.shape),
                           query.unsqueeze(1).expand(n_queries, n_way, *query.shape[1:])], dim=2)
        return self.relation(pairs.flatten(0, 1)).view(n_queries, n_way)


def episode_labels(n_way: int, n_query: int, device: torch.device | str = "cpu") -> Tensor:
    """Query labels in episode order: [0]*n_query + [1]*n_query + ... (shape [n_way·n_query])."""
    return torch.arange(n_way, device=device).repeat_interleave(n_query)


def build_model(backbone: str, head: str, image_size: int, width: int = 64, relation_bn: str = "batch",
                relation_init: str = "fan_out") -> FewShotModel:
    """A ``FewShotModel`` with a fresh ``ResNetBackbone``; see the class docs for the options."""
    return FewShotModel(ResNetBackbone(backbone, width), head, image_size, relation_bn=relation_bn,
                        relation_init=relation_init)
