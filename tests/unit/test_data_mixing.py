"""DM's mixing (pipeline.data.mixing): disjoint pairs, MixUp half and CutMix half, then
RandAugment; per-sample seeding that does not depend on how a batch is split."""

from __future__ import annotations

import pytest
import torch

from pipeline.data.mixing import (
    _RECIPE,
    CUTMIX,
    MIXUP,
    TrainRecipe,
    cutmix_box,
    mix_pair,
    mixup_ratio,
)
from pipeline.seeds import sample_seed


def flat_images(count: int, size: int = 8) -> list[torch.Tensor]:
    """Image i is uniformly grey level 10 + 20 i: every pixel names the image it came from."""
    return [torch.full((3, size, size), 10 + 20 * i, dtype=torch.uint8) for i in range(count)]


def sources(pixels: torch.Tensor, count: int) -> set[int]:
    """Which flat images the pixels of one CutMix output came from."""
    return {(int(v) - 10) // 20 for v in pixels.unique()} & set(range(count))


@pytest.mark.parametrize("layers", [0, 1])
def test_dm_order_mixes_disjoint_pairs_mixup_half_then_cutmix_half(layers):
    # With RandAugment the mixed image is truncated to uint8 first, as in DM's _augment_image
    # (its ops change the pixels, so only the pairing is checked); without, DM normalises the
    # float mix as it is.
    recipe = TrainRecipe(layers, 0, mixup_alpha=0.2, cutmix=True)
    assert recipe.images_per_output == 2 and recipe.kinds(4) == [MIXUP] * 2 + [CUTMIX] * 2
    images, labels = flat_images(8), list(range(8))
    pixels, targets = recipe(images, labels, seeds=list(range(100, 108)))
    assert pixels.shape == (4, 3, 8, 8)
    assert pixels.dtype == (torch.uint8 if layers else torch.float32)
    # Output k is image k (its own label) mixed with image 4 + k: each image used exactly once.
    assert targets.labels.tolist() == [0, 1, 2, 3]
    assert targets.mix_labels.tolist() == [4, 5, 6, 7]
    if layers:
        return
    for k in (0, 1):  # MixUp: r * own + (1 - r) * partner in float32, r the own label's share
        r = targets.ratio[k]
        expected = torch.tensor(10.0 + 20 * k) * r + (10.0 + 20 * (4 + k)) * (1 - r)
        assert bool((pixels[k] == expected).all())
    for k in (2, 3):  # CutMix: only the pair's pixels; the ratio is the own image's area
        assert sources(pixels[k], 8) <= {k, 4 + k}
        own_share = (pixels[k] == 10 + 20 * k).double().mean().item()
        assert targets.ratio[k].item() == pytest.approx(own_share, abs=1e-6)


def test_augment_before_mix_reads_one_image_per_output_and_mixes_within_each_half():
    recipe = TrainRecipe(0, 0, mixup_alpha=0.2, cutmix=True, augment_before_mix=True)
    assert recipe.images_per_output == 1
    assert recipe.partners(5) == [1, 2, 0, 4, 3]  # MixUp block 0-2, CutMix block 3-4, cyclic
    pixels, targets = recipe(flat_images(5), list(range(5)), seeds=list(range(5)))
    assert pixels.dtype == torch.float32 and targets.mix_labels.tolist() == [1, 2, 0, 4, 3]
    for k, partner in ((3, 4), (4, 3)):
        assert sources(pixels[k].to(torch.uint8), 5) <= {k, partner}


@pytest.mark.parametrize(
    ("alpha", "cutmix", "kind"), [(0.2, False, MIXUP), (0.0, True, CUTMIX), (0.0, False, None)]
)
def test_one_mixing_on_mixes_every_output_that_way_as_dm(alpha, cutmix, kind):
    # DM dataset.py: my_mixup or my_cutmix on the whole batch when only one is named.
    recipe = TrainRecipe(0, 0, mixup_alpha=alpha, cutmix=cutmix)
    assert recipe.kinds(3) == [kind] * 3
    assert recipe.images_per_output == (1 if kind is None else 2)
    count = 3 * recipe.images_per_output
    pixels, targets = recipe(flat_images(count), list(range(count)), seeds=list(range(count)))
    if kind is None:  # unmixed: the images themselves, ratio 1, partner = itself
        assert torch.equal(pixels, torch.stack(flat_images(3)))
        assert targets.ratio.tolist() == [1.0] * 3 and targets.mix_labels.tolist() == [0, 1, 2]


def test_each_output_depends_only_on_its_images_and_its_own_seed():
    """However a batch is split (workers, accumulation), an output with the same images and seed
    is the same tensor: 4 outputs at once equal 2 + 2, and the partner's seed plays no part.
    (MixUp only: with both on, an output's kind is its place in the micro-batch, as in DM.)"""
    recipe = TrainRecipe(2, 9, mixup_alpha=0.2, cutmix=False)
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=generator)]
    images = [images[0].roll(i, -1) for i in range(8)]
    seeds = [1000 + i for i in range(8)]
    whole, whole_targets = recipe(images, list(range(8)), seeds)
    pairs = [(0, 4), (1, 5), (2, 6), (3, 7)]
    for first, second in ((0, 1), (2, 3)):
        chosen = [pairs[first][0], pairs[second][0], pairs[first][1], pairs[second][1]]
        part, targets = recipe([images[i] for i in chosen], chosen, [seeds[i] for i in chosen])
        assert torch.equal(part, whole[[first, second]])
        assert torch.equal(targets.ratio, whole_targets.ratio[[first, second]])
    other_partner_seeds = seeds[:4] + [7, 7, 7, 7]
    assert torch.equal(recipe(images, list(range(8)), other_partner_seeds)[0], whole)
    assert not torch.equal(recipe(images, list(range(8)), [s + 1 for s in seeds])[0], whole)


def test_randaugment_runs_on_the_mixed_image_in_dms_order():
    # DM dataset.py: mix, then _augment_image (clip, truncate to uint8, RandAugment).
    recipe = TrainRecipe(3, 10, mixup_alpha=0.2, cutmix=True)
    images = flat_images(4, size=12)
    mixed_only = TrainRecipe(0, 0, mixup_alpha=0.2, cutmix=True)(images, [0, 1, 2, 3], [5, 6, 7, 8])
    pixels, _ = recipe(images, [0, 1, 2, 3], [5, 6, 7, 8])
    for k in range(2):
        generator = torch.Generator().manual_seed(sample_seed(_RECIPE, 5 + k))
        mix_pair(images[k], images[2 + k], [MIXUP, CUTMIX][k], 0.2, generator)  # same draws
        truncated = mixed_only[0][k].clamp(0, 255).to(torch.uint8)
        assert torch.equal(pixels[k], recipe.randaugment(truncated, generator))


def test_mixup_ratios_follow_beta_point_two():
    generator = torch.Generator().manual_seed(0)
    ratio = torch.stack([mixup_ratio(0.2, generator) for _ in range(20000)]).double()
    # Beta(0.2, 0.2): mean 0.5, variance 0.2^2 / (0.4^2 * 1.4) = 0.17857, and 58.2 % of the
    # mass below 0.05 or above 0.95 (scipy.stats.beta.cdf(0.05, 0.2, 0.2) = 0.2910).
    assert ratio.mean().item() == pytest.approx(0.5, abs=0.01)
    assert ratio.var().item() == pytest.approx(0.17857, abs=0.006)
    tails = ((ratio < 0.05) | (ratio > 0.95)).double().mean().item()
    assert tails == pytest.approx(0.58205, abs=0.015)


def dm_cutmix_box(height: int, width: int, r_x: int, r_y: int, u: float) -> tuple:
    """DM dataset.py cutmix_padding from its formula, given its three draws."""
    side = (1.0 - u) ** 0.5
    r_w, r_h = int(side * width), int(side * height)
    clip = lambda v, hi: min(max(v, 0), hi)  # noqa: E731
    x1, x2 = clip(r_x - r_w // 2, width), clip(r_x + r_w // 2, width)
    y1, y2 = clip(r_y - r_h // 2, height), clip(r_y + r_h // 2, height)
    return y1, y2, x1, x2


def test_cutmix_box_is_dms_cutmix_padding():
    generator = torch.Generator().manual_seed(1)
    shares = []
    for _ in range(2000):
        draws = torch.Generator().set_state(generator.get_state())
        r_x = int(torch.randint(0, 30, (), generator=draws))
        r_y = int(torch.randint(0, 20, (), generator=draws))
        u = torch.rand((), dtype=torch.float32, generator=draws).item()
        top, bottom, left, right = cutmix_box(20, 30, generator)
        assert (top, bottom, left, right) == dm_cutmix_box(20, 30, r_x, r_y, u)
        shares.append(u)
    # DM: "Beta dist in paper, but they used Beta(1,1) which is just uniform."
    assert sum(shares) / len(shares) == pytest.approx(0.5, abs=0.02)


def test_bad_batches_are_refused_naming_the_counts():
    recipe = TrainRecipe(0, 0, mixup_alpha=0.2, cutmix=True)
    with pytest.raises(ValueError, match="need 2 image"):
        recipe(flat_images(3), [0, 1, 2], [0, 1, 2])
    with pytest.raises(ValueError, match="mixup_alpha must be >= 0"):
        TrainRecipe(0, 0, mixup_alpha=-1)


def test_recipe_pickles_for_spawned_loader_workers():
    import pickle

    recipe = TrainRecipe(2, 10, mixup_alpha=0.2, cutmix=True)
    copy = pickle.loads(pickle.dumps(recipe))
    images, labels, seeds = flat_images(4, size=12), [0, 1, 2, 3], [9, 8, 7, 6]
    assert torch.equal(copy(images, labels, seeds)[0], recipe(images, labels, seeds)[0])
    assert copy == recipe and repr(copy) == (
        "TrainRecipe(randaugment_layers=2, randaugment_magnitude=10, mixup_alpha=0.2, "
        "cutmix=True, augment_before_mix=False)"
    )
