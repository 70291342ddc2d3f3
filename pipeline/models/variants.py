"""Variant table: the one source of truth for per-variant architecture and recipe defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

# DM base.py nfnet_params: every F-variant shares these stage widths.
_F_WIDTHS = (256, 512, 1536, 1536)


@dataclass(frozen=True)
class Variant:
    """Architecture and training-recipe defaults of one registered NFNet."""

    name: str
    depths: tuple[int, ...]
    widths: tuple[int, ...]
    train_resolution: int
    test_resolution: int
    drop_rate: float
    randaugment_layers: int
    randaugment_magnitude: int
    # DM experiment_nfnets.py model_kwargs: stochdepth_rate=0.25 (the NFNet class default is 0.1).
    stochdepth_rate: float = 0.25
    # DM experiment_nfnets.py model_kwargs: alpha=0.2.
    alpha: float = 0.2
    # DM experiment_nfnets.py model_kwargs: se_ratio=0.5.
    se_ratio: float = 0.5
    # DM nfnet.py: group_pattern default [128] * 4.
    group_width: int = 128
    # DM nfnet.py: bneck_pattern default [0.5] * 4, applied to the block's output width.
    bottleneck_ratio: float = 0.5
    # DM nfnet.py stem: 16, 32, 64, then width[0] // 2 channels.
    stem_widths: tuple[int, int, int, int] = (16, 32, 64, 128)
    # DM nfnet.py: final_conv_mult=2 (final conv has 2x the last stage width).
    final_conv_mult: int = 2
    # DM experiment_nfnets.py model_kwargs: activation='gelu'.
    activation: str = "gelu"
    padding: str = "same"
    stage_strides: tuple[int, ...] = field(default=())
    # "nfnet", or "resnet_bn" for the batch-normalised baseline (pipeline.models.resnet_bn), which
    # reads depths, widths, strides, stem_widths[0] and the recipe fields, nothing NF-specific.
    family: str = "nfnet"

    def __post_init__(self) -> None:
        if len(self.depths) != len(self.widths):
            raise ValueError(f"variant {self.name}: depths and widths differ in length")
        if not self.stage_strides:
            # DM nfnet.py: stride_pattern = [1, 2, 2, 2] (first stage keeps the stem's resolution).
            strides = (1,) + (2,) * (len(self.widths) - 1)
            object.__setattr__(self, "stage_strides", strides)

    @property
    def final_conv_width(self) -> int:
        """Channels of the 1x1 conv before pooling."""
        return self.final_conv_mult * self.widths[-1]


def _f_variant(index: int, train: int, test: int, drop: float, ra_magnitude: int) -> Variant:
    # DM base.py: F_N has depths N+1 times [1, 2, 6, 3].
    n = index + 1
    return Variant(
        name=f"nfnet_f{index}",
        depths=(n, 2 * n, 6 * n, 3 * n),
        widths=_F_WIDTHS,
        train_resolution=train,
        test_resolution=test,
        drop_rate=drop,
        # DM experiment_nfnets.py: RA level '4MM' means 4 layers of magnitude MM.
        randaugment_layers=4,
        randaugment_magnitude=ra_magnitude,
    )


# DM base.py nfnet_params (train_imsize, test_imsize, drop_rate) and experiment_nfnets.py
# augment levels F0 '405', F1/F2 '410', F3..F7 '415'.
_F_TABLE = [
    (192, 256, 0.2, 5),
    (224, 320, 0.3, 10),
    (256, 352, 0.4, 10),
    (320, 416, 0.4, 15),
    (384, 512, 0.5, 15),
    (416, 544, 0.5, 15),
    (448, 576, 0.5, 15),
    (480, 608, 0.5, 15),
]

# Small variants of our own (not from the paper) so tests and demos run on a CPU; same blocks.
_SMALL = [
    Variant(
        name="nfnet_nano",
        depths=(1, 1),
        widths=(32, 64),
        train_resolution=32,
        test_resolution=32,
        drop_rate=0.1,
        randaugment_layers=2,
        randaugment_magnitude=5,
        stochdepth_rate=0.1,
        group_width=16,
        stem_widths=(8, 8, 16, 16),
    ),
    Variant(
        name="nfnet_micro",
        depths=(1, 2, 2),
        widths=(64, 128, 256),
        train_resolution=64,
        test_resolution=64,
        drop_rate=0.2,
        randaugment_layers=2,
        randaugment_magnitude=9,
        stochdepth_rate=0.1,
        group_width=32,
        stem_widths=(16, 16, 32, 32),
    ),
]

# Batch-normalised ResNet baselines (torchvision BasicBlock) sized to a small NFNet each: NF vs. BN
# comparisons train both on the same data and budget. No stochastic depth (torchvision has none).
_BASELINES = [
    Variant(
        name="resnet_bn_nano",  # 40,250 parameters at 10 classes; nfnet_nano has 40,244
        depths=(1, 1),
        widths=(24, 44),
        train_resolution=32,
        test_resolution=32,
        drop_rate=0.1,
        randaugment_layers=2,
        randaugment_magnitude=5,
        stochdepth_rate=0.0,
        stem_widths=(16, 16, 16, 16),
        family="resnet_bn",
    ),
]

VARIANTS: dict[str, Variant] = {
    **{v.name: v for v in (_f_variant(i, *row) for i, row in enumerate(_F_TABLE))},
    **{v.name: v for v in _SMALL},
    **{v.name: v for v in _BASELINES},
}


def get_variant(name: str) -> Variant:
    """The registered variant called ``name`` (a ValueError naming the choices otherwise)."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(VARIANTS)}") from None
