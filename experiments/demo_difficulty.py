"""How hard is a data set? A weak and a strong training-free baseline, image AUROC per category.

weak:   per-pixel squared distance to the mean normal training image, Gaussian-blurred (sigma 4),
        image score = max.
strong: nearest-neighbour distance of each test position's backbone feature to all training
        positions' features (a PatchCore-style memory bank without subsampling), score = max.

    python experiments/demo_difficulty.py                      # the built-in demo set
    python experiments/demo_difficulty.py --root R --data MVTecAD --category bottle,cable
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader
from torchvision.transforms.v2.functional import gaussian_blur

from ad_lightning.data import Demo, MVTecAD
from ad_lightning.evaluation.metrics import image_auroc
from ad_lightning.features.backbone import Backbone
from ad_lightning.features.cache import extract_features


def stack(dataset, key: str) -> torch.Tensor:
    return torch.cat([batch[key] for batch in DataLoader(dataset, batch_size=64)])


def weak_scores(train_images: torch.Tensor, test_images: torch.Tensor) -> torch.Tensor:
    distance = (test_images - train_images.mean(0)).pow(2).sum(1, keepdim=True)  # [N, 1, H, W]
    return gaussian_blur(distance, kernel_size=[33, 33], sigma=[4.0, 4.0]).flatten(1).amax(1)


def strong_scores(train_features: torch.Tensor, test_features: torch.Tensor) -> torch.Tensor:
    bank = train_features.permute(0, 2, 3, 1).flatten(0, 2)  # [N, C, h, w] -> [N*h*w, C]
    queries = test_features.permute(0, 2, 3, 1).flatten(1, 2)  # [M, C, h, w] -> [M, h*w, C]
    return torch.stack([torch.cdist(q, bank).amin(1).amax() for q in queries])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["Demo", "MVTecAD"], default="Demo")
    parser.add_argument("--root", default=None)
    parser.add_argument("--category", default="all")
    args = parser.parse_args()
    data = Demo(args.root, args.category) if args.data == "Demo" else MVTecAD(args.root, args.category)
    data.setup()
    backbone = Backbone()
    rows = []
    for category in data.categories:
        train = [i for i, s in enumerate(data.train_dataset.samples) if s.category == category]
        test = [i for i, s in enumerate(data.test_dataset.samples) if s.category == category]
        train_set = torch.utils.data.Subset(data.train_dataset, train)
        test_set = torch.utils.data.Subset(data.test_dataset, test)
        labels = stack(test_set, "label")
        weak = image_auroc(weak_scores(stack(train_set, "image"), stack(test_set, "image")), labels)
        strong = image_auroc(
            strong_scores(extract_features(backbone, train_set), extract_features(backbone, test_set)), labels
        )
        rows.append((category, weak, strong))
        print(f"{category:<12} weak {weak:.3f}   strong {strong:.3f}", flush=True)
    print(f"{'mean':<12} weak {sum(r[1] for r in rows) / len(rows):.3f}   strong {sum(r[2] for r in rows) / len(rows):.3f}")


if __name__ == "__main__":
    main()
