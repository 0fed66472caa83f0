"""Evaluation presets (input size, mean/std, crop fraction) of the models shipped for each dataset.

Statistics are per channel over the training split, on pixel values scaled to ``[0,1]`` (std with
1/N), rounded to 4 digits:

- ``mnist5k``: the usual full-MNIST statistics (0.1307 / 0.3081), repeated over 3 channels
  (the mnist5k train split itself gives 0.1309 / 0.3080).
- ``digits``: computed once from the ``digits`` train split (grayscale, repeated over 3 channels).
- ``shapes``: computed once from the ``shapes`` train split with ``seed=0``.
- ``cifar10`` / ``cifar100``: the usual train-set statistics.
- ``stl10`` / ``imagefolder``: ImageNet statistics.
- long-tailed versions (``mnist5k_lt100``, ...): their base dataset's preset.
"""

from __future__ import annotations

from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _preset(
    size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    num_classes: int | None,
    crop_pct: float = 1.0,
) -> dict[str, Any]:
    return {
        "input_size": (3, size, size),
        "mean": mean,
        "std": std,
        "crop_pct": crop_pct,
        "interpolation": "bilinear",
        "num_classes": num_classes,
    }


DATASET_PRESETS: dict[str, dict[str, Any]] = {
    "mnist5k": _preset(28, (0.1307,) * 3, (0.3081,) * 3, 10),
    "digits": _preset(8, (0.3052,) * 3, (0.3760,) * 3, 10),
    "shapes": _preset(32, (0.4938, 0.4898, 0.4944), (0.4105, 0.4105, 0.4105), 4),
    "shapes_captions": _preset(32, (0.4938, 0.4898, 0.4944), (0.4105, 0.4105, 0.4105), 4),  # the shapes images
    "cifar10": _preset(32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 10),
    "cifar100": _preset(32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 100),
    "stl10": _preset(96, IMAGENET_MEAN, IMAGENET_STD, 10),
    "imagefolder": _preset(224, IMAGENET_MEAN, IMAGENET_STD, None, crop_pct=0.875),
}

# Long-tailed versions (``mnist5k_lt100``, ...; zoo/data/longtail.py) share their base dataset's preset.
from zoo.data.longtail import longtail_names, parse_longtail_name  # noqa: E402

for _name in longtail_names():
    DATASET_PRESETS[_name] = dict(DATASET_PRESETS[parse_longtail_name(_name)[0]])
