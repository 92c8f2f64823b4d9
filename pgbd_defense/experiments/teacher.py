"""Train a clean torchvision classifier to serve as the mapping's teacher when no
pre-trained weights are at hand (no network here, so DINO and ImageNet weights are
out of reach).

    python -m pgbd_defense.teacher --dataset fashion-mnist --arch resnet18 --out teacher_resnet18.pth
    python -m pgbd_defense.run --record R --mapping torchvision:resnet18:teacher_resnet18.pth \\
        --teacher-input-size 32

The teacher sees only clean images (never the poisoned split) at ``--input-size``
pixels; it stands in for a large pre-trained model, and the numbers it gives are
not the paper's DINO numbers. The saved file is a plain state_dict that
``torchvision.models.get_model(arch, num_classes=K)`` loads.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

import torch
import torch.nn.functional as F

from .. import datasets as data_mod
from ..datasets.batches import Normalizer
from ..method.mapping import IMAGENET_MEAN, IMAGENET_STD
from ..util.atomic import atomic_torch_save
from ..util.logs import setup_logging
from ..util.progress import progress

log = logging.getLogger("pgbd_defense.teacher")


def train_teacher(arch: str, images: torch.Tensor, labels: torch.Tensor, num_classes: int, input_size: int = 32,
                  epochs: int = 1, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                  device: str = "cpu") -> torch.nn.Module:
    import torchvision

    torch.manual_seed(seed)
    net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    norm = Normalizer(IMAGENET_MEAN, IMAGENET_STD, 3)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for epoch in range(epochs):
        order = torch.randperm(len(labels), generator=gen)
        seen, correct = 0, 0
        for start in progress(range(0, len(order), batch_size), desc=f"teacher epoch {epoch + 1}/{epochs}"):
            idx = order[start : start + batch_size]
            x = images[idx]
            x = norm((x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x).to(device))
            x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False)
            y = labels[idx].to(device)
            logits = net(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(y)
            correct += int((logits.argmax(1) == y).sum())
        log.info("teacher epoch %d: train accuracy %.4f", epoch + 1, correct / max(1, seen))
    return net.eval()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pgbd_defense.teacher", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-root")
    p.add_argument("--arch", default="resnet18", help="a torchvision classification model name")
    p.add_argument("--images", type=int, default=10000, help="clean training images it learns from")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    setup_logging(False)
    info = data_mod.dataset_info(args.dataset)
    train = data_mod.load_split(args.dataset, args.data_root, train=True, channels=info.size[2])
    test = data_mod.load_split(args.dataset, args.data_root, train=False, channels=info.size[2])
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed + 17))[: args.images]
    net = train_teacher(args.arch, train.images[pick], train.labels[pick], info.num_classes, args.input_size,
                        args.epochs, seed=args.seed, device=args.device)
    norm = Normalizer(IMAGENET_MEAN, IMAGENET_STD, 3)
    correct = 0
    with torch.no_grad():
        for start in range(0, len(test), 512):
            x = test.images[start : start + 512]
            x = norm((x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x).to(args.device))
            x = F.interpolate(x, size=(args.input_size, args.input_size), mode="bilinear", align_corners=False)
            correct += int((net(x).argmax(1).cpu() == test.labels[start : start + 512]).sum())
    atomic_torch_save({k: v.cpu() for k, v in net.state_dict().items()}, args.out)
    print(f"teacher {args.arch}: clean test accuracy {correct / len(test):.4f}; saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
