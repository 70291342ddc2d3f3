"""DM's MixUp and CutMix on image pairs, and the training batch recipe around them.

DM's default order (DM experiment_nfnets.py: augment_before_mix=False; DM dataset.py: load,
my_mixup_cutmix, _augment_image): for B outputs the loader reads 2B cropped images and mixes
disjoint pairs, MixUp on the first half of the batch and CutMix on the second (with only one of
them on, every output gets that one: DM dataset.py my_mixup / my_cutmix); each mixed image is then
clipped and truncated to uint8, augmented by RandAugment and normalised. Output ``k`` mixes images
``k`` (its own) and ``B + k`` (its partner). The labels are mixed in the loss, as DM's
experiment.py does: ``pipeline.optim.mixing.mixed_targets`` takes the ``MixTargets`` built here.

``augment_before_mix=True`` reads B images, augments each, then mixes each with the next image
of its own half of the batch (a cyclic shift): one decode per output instead of two, but every
image appears in two outputs.

Every random draw of output ``k`` (its MixUp ratio or CutMix box, its RandAugment ops) comes
from a generator seeded by its own image's seed, which the caller derives from the sample's
global identity: the batch is the same however the work is split over workers.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field
from typing import NamedTuple

import torch

from pipeline.data.randaugment import DMRandAugment
from pipeline.seeds import sample_seed

MIXUP, CUTMIX = "mixup", "cutmix"
_RECIPE = 0x5D7F  # keeps the recipe's draws apart from the crop's, seeded by the same sample seed


class MixTargets(NamedTuple):
    """What the loss needs of a training batch (DM dataset.py: labels, mix_labels, ratio)."""

    labels: torch.Tensor  # int64 (B,): the label of each output's own image
    mix_labels: torch.Tensor  # int64 (B,): its partner's label (its own where unmixed)
    ratio: torch.Tensor  # float32 (B,): the own label's share of the target


def mixup_ratio(alpha: float, generator: torch.Generator) -> torch.Tensor:
    """A float32 draw of Beta(alpha, alpha) (DM dataset.py: preprocess, tfp Beta), from two
    gammas in float64 so that it never underflows to 0/0."""
    concentration = torch.full((2,), float(alpha), dtype=torch.float64)
    gammas = torch._standard_gamma(concentration, generator=generator)
    total = gammas.sum()
    return (gammas[0] / total if total > 0 else torch.tensor(0.5)).to(torch.float32)


def cutmix_box(height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the box kept from the own image (DM dataset.py:
    cutmix_padding): a uniform centre pixel, side sqrt(1 - u) of the image's with u uniform
    (Beta(1, 1)), halves truncated to ints, clipped to the image."""
    centre_x = int(torch.randint(0, width, (), generator=generator))
    centre_y = int(torch.randint(0, height, (), generator=generator))
    share = torch.rand((), dtype=torch.float32, generator=generator)
    side = torch.sqrt(1.0 - share)
    half_w = int(side * torch.tensor(width, dtype=torch.float32)) // 2
    half_h = int(side * torch.tensor(height, dtype=torch.float32)) // 2
    left, right = max(0, centre_x - half_w), min(width, centre_x + half_w)
    top, bottom = max(0, centre_y - half_h), min(height, centre_y + half_h)
    return top, max(top, bottom), left, max(left, right)


def mix_pair(
    own: torch.Tensor, partner: torch.Tensor, kind: str, alpha: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mixed image, own label's share) of two same-sized uint8 CHW images.

    MixUp: ``r * own + (1 - r) * partner`` in float32, r ~ Beta(alpha, alpha) (DM dataset.py:
    my_mixup_cutmix). CutMix: the own image inside ``cutmix_box``, the partner outside, and the
    box's share of the pixels as float32 (DM: mean of the mask). MixUp gives float32, CutMix
    keeps uint8.
    """
    if kind == MIXUP:
        ratio = mixup_ratio(alpha, generator)
        return own.to(torch.float32) * ratio + partner.to(torch.float32) * (1.0 - ratio), ratio
    height, width = own.shape[-2:]
    top, bottom, left, right = cutmix_box(height, width, generator)
    mixed = partner.clone()
    mixed[..., top:bottom, left:right] = own[..., top:bottom, left:right]
    area = torch.tensor((bottom - top) * (right - left), dtype=torch.float32)
    return mixed, area / (height * width)


def _uint8(image: torch.Tensor) -> torch.Tensor:
    # DM dataset.py: _augment_image clips to [0, 255] and casts (truncates) to uint8 before
    # RandAugment (only then: without RandAugment the mixed float image is normalised as it is).
    return image if image.dtype == torch.uint8 else image.clamp(0, 255).to(torch.uint8)


@dataclass
class TrainRecipe:
    """What a training batch goes through after each image's crop and flip: MixUp/CutMix and
    DM's RandAugment, in DM's order by default (see the module docstring).

    Called with the batch's cropped uint8 images (``images_per_output`` per output), their labels
    and their sample seeds; returns the (B, 3, R, R) pixels (uint8, or float32 in [0, 255] where a
    MixUp is not followed by RandAugment), ready for ``normalize_batch``, and the batch's
    ``MixTargets``.
    """

    randaugment_layers: int
    randaugment_magnitude: float
    _: KW_ONLY
    mixup_alpha: float = 0.0
    cutmix: bool = False
    augment_before_mix: bool = False
    randaugment: DMRandAugment = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mixup_alpha < 0:
            raise ValueError(f"mixup_alpha must be >= 0, got {self.mixup_alpha}")
        self.randaugment = DMRandAugment(self.randaugment_layers, self.randaugment_magnitude)

    @property
    def mixing(self) -> bool:
        """Whether outputs are mixed at all."""
        return self.mixup_alpha > 0 or self.cutmix

    @property
    def images_per_output(self) -> int:
        """Images read per output: 2 in DM's order (disjoint pairs), else 1."""
        return 2 if self.mixing and not self.augment_before_mix else 1

    def kinds(self, count: int) -> list[str | None]:
        """How each of ``count`` outputs is mixed (DM dataset.py: the first half MixUp, the second
        CutMix with both on; the one that is on with one; None unmixed)."""
        if self.mixup_alpha > 0 and self.cutmix:
            return [MIXUP] * (count - count // 2) + [CUTMIX] * (count // 2)
        kind = MIXUP if self.mixup_alpha > 0 else CUTMIX if self.cutmix else None
        return [kind] * count

    def partners(self, count: int) -> list[int]:
        """Index of each output's partner among the images read for ``count`` outputs (its own
        index where unmixed)."""
        if not self.mixing:
            return list(range(count))
        if not self.augment_before_mix:
            return [count + k for k in range(count)]  # disjoint pairs: own k, partner B + k
        kinds = self.kinds(count)  # the next image of the same kind's block, cyclically
        first = {kind: kinds.index(kind) for kind in kinds}
        return [
            first[kind] + (k - first[kind] + 1) % kinds.count(kind) for k, kind in enumerate(kinds)
        ]

    def __call__(
        self, images: list[torch.Tensor], labels: list[int], seeds: list[int]
    ) -> tuple[torch.Tensor, MixTargets]:
        count = len(images) // self.images_per_output
        if (
            count < 1
            or len(images) % self.images_per_output
            or not len(labels) == len(seeds) == len(images)
        ):
            raise ValueError(
                f"TrainRecipe: need {self.images_per_output} image(s), label(s) and seed(s) per "
                f"output, got {len(images)}, {len(labels)} and {len(seeds)}"
            )
        generators = [torch.Generator().manual_seed(sample_seed(_RECIPE, s)) for s in seeds[:count]]
        if self.augment_before_mix:
            images = [
                self.randaugment(image, g) for image, g in zip(images, generators, strict=True)
            ]
        kinds, partners = self.kinds(count), self.partners(count)
        outputs, ratios = [], []
        for k, (kind, generator) in enumerate(zip(kinds, generators, strict=True)):
            image, ratio = images[k], torch.tensor(1.0)
            if kind is not None:
                image, ratio = mix_pair(
                    image, images[partners[k]], kind, self.mixup_alpha, generator
                )
            if not self.augment_before_mix and self.randaugment.num_layers:
                image = self.randaugment(_uint8(image), generator)
            outputs.append(image)
            ratios.append(ratio)
        dtype = torch.float32 if any(o.is_floating_point() for o in outputs) else torch.uint8
        targets = MixTargets(
            torch.tensor(labels[:count], dtype=torch.int64),
            torch.tensor([labels[p] for p in partners], dtype=torch.int64),
            torch.stack(ratios).to(torch.float32),
        )
        return torch.stack([output.to(dtype) for output in outputs]), targets
