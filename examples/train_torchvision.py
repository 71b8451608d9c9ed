"""Train a torchvision segmentation model from scribbles: partial cross-entropy + rloss.DenseCRFLoss.

The data is a folder made by `python -m rloss data prepare ... --out DATA_ROOT` (README, "Own data"):
list/train.txt pairs images with scribbles (255 = unlabelled), list/val.txt images with full masks,
classes.txt names the classes. With torchvision installed (the build that matches your torch):

    python examples/train_torchvision.py --data DATA_ROOT --out runs/mydata --epochs 30 --device cuda

Each epoch prints its mean loss (cross-entropy on the scribbled pixels + the weighted DenseCRF loss),
the val mIoU (whole images, per class by name) and its time; OUT/last.pt holds the last epoch and
OUT/best.pt the best val mIoU so far (both {"model": state_dict, ...}). The model starts from random
weights, with nothing to download; `--pretrained-backbone` takes torchvision's ImageNet backbone
(downloaded once, or found in torch's cache). `--densecrf-weight 0` trains with cross-entropy alone.

The DenseCRF loss sums over the pixels it sees while the cross-entropy is a mean, so its weight must
fall like 1 / (P sigma_xy^2), P and sigma_xy as the loss sees them after `--densecrf-scale` (the rule of
the README's "Own data" section). Without `--densecrf-weight`, the weight is that rule's for the crop,
scale and sigma_xy given (`rloss.presets.densecrf_weight`, anchored on the demo). The list files are not
checked here: `python -m rloss data check DATA_ROOT` checks every file first.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from rloss import DenseCRFLoss
from rloss.class_names import read_class_names
from rloss.data.listfile import read_list
from rloss.errors import RlossError
from rloss.metrics import class_iou, confusion_matrix, mean_iou, predict_labels
from rloss.presets import densecrf_weight

IGNORE = 255
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)  # the normalisation torchvision's weights expect
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


class ListDataset(Dataset):
    """The pairs of one list file: (normalised image, labels, roi); with `crop`, a random crop (images
    smaller than it padded, the padding outside the roi and unlabelled) and a random mirror."""

    def __init__(self, root: Path, name: str, crop: int | None = None) -> None:
        entries = read_list(str(root / "list" / name), need_label=True, who=name)
        self.pairs = [(root / e.image.lstrip("/"), root / e.label.lstrip("/")) for e in entries]
        self.crop = crop

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image_path, label_path = self.pairs[index]
        with Image.open(image_path) as image, Image.open(label_path) as label:
            rgb = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255
            labels = torch.from_numpy(np.array(label)).long()
        image, roi = (rgb - MEAN) / STD, torch.ones(labels.shape)
        if self.crop is None:
            return image, labels, roi
        height, width = labels.shape
        pad = (0, max(self.crop - width, 0), 0, max(self.crop - height, 0))
        image, roi = F.pad(image, pad), F.pad(roi, pad)
        labels = F.pad(labels, pad, value=IGNORE)
        top = int(torch.randint(labels.shape[0] - self.crop + 1, ()))
        left = int(torch.randint(labels.shape[1] - self.crop + 1, ()))
        window = (..., slice(top, top + self.crop), slice(left, left + self.crop))
        image, labels, roi = image[window], labels[window], roi[window]
        if torch.rand(()) < 0.5:
            image, labels, roi = image.flip(-1), labels.flip(-1), roi.flip(-1)
        return image, labels, roi


def partial_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean over the scribbled pixels; 0, not NaN, for a batch of crops without any."""
    total = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")
    return total / (labels != IGNORE).sum().clamp(min=1)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, num_classes: int, device: torch.device) -> torch.Tensor:
    """The confusion matrix over the val list, each image whole."""
    model.eval()
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for image, labels, _ in loader:
        prediction = predict_labels(model(image.to(device))["out"].cpu())
        matrix += confusion_matrix(labels, prediction, num_classes, ignore=(IGNORE,))
    return matrix


def save_atomically(state: dict, path: Path) -> None:
    """Write to a temporary file beside `path` and rename it: a crash never leaves half a checkpoint."""
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def build_model(name: str, num_classes: int, pretrained_backbone: bool) -> torch.nn.Module:
    """A torchvision model with a fresh head; weights_backbone must be given, since its default downloads."""
    try:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes,
                                            weights_backbone="DEFAULT" if pretrained_backbone else None)
    except OSError as error:  # no network: say where torch looks for the file
        raise RlossError(f"--pretrained-backbone: cannot get the backbone's weights ({error}); put the file in "
                         f"{torch.hub.get_dir()}/checkpoints") from None


def check_prepared(root: Path) -> None:
    """Say in one line what is missing, rather than fail on the first file opened."""
    missing = [name for name in ("classes.txt", "list/train.txt", "list/val.txt") if not (root / name).is_file()]
    if missing:
        raise RlossError(f"--data '{root}' is not a prepared folder (no {', '.join(missing)}): make one with "
                         f"`python -m rloss data prepare --images DIR --scribbles DIR --out {root}`")


def train(args: argparse.Namespace) -> None:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise RlossError("--device cuda: torch sees no CUDA device")
    check_prepared(args.data)
    names = read_class_names(args.data / "classes.txt")
    class_names = [names[i] for i in range(len(names))]
    train_set = ListDataset(args.data, "train.txt", crop=args.crop)
    val_set = ListDataset(args.data, "val.txt")
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if len(train_set) < args.batch:
        raise RlossError(f"{len(train_set)} training images are fewer than one batch of {args.batch}")
    train_loader = DataLoader(train_set, batch_size=args.batch, shuffle=True, drop_last=True,  # BatchNorm needs > 1
                              num_workers=args.workers, generator=torch.Generator().manual_seed(args.seed))
    val_loader = DataLoader(val_set, batch_size=1, num_workers=args.workers)

    model = build_model(args.model, len(class_names), args.pretrained_backbone).to(device)
    weight = (densecrf_weight(args.crop, args.densecrf_scale, args.sigma_xy) if args.densecrf_weight is None
              else args.densecrf_weight)
    densecrf = DenseCRFLoss(weight, args.sigma_rgb, args.sigma_xy, args.densecrf_scale)
    mean, std = MEAN.to(device), STD.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    max_iter = args.epochs * len(train_loader)
    poly = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: (1 - it / max_iter) ** 0.9)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{args.model}: {len(class_names)} classes, {len(train_set)} training and {len(val_set)} val images; "
          f"DenseCRF loss weight {weight:.3g}, sigma_rgb {args.sigma_rgb:g}, sigma_xy {args.sigma_xy:g}, "
          f"scale {args.densecrf_scale:g}", flush=True)

    # Plain values only: torch.load's default (weights_only=True) refuses a pickled Path.
    plain_args = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    best = -1.0
    for epoch in range(1, args.epochs + 1):
        start, sums = time.perf_counter(), torch.zeros(2)
        model.train()
        for image, labels, roi in train_loader:
            image, labels = image.to(device), labels.to(device)
            logits = model(image)["out"]
            ce = partial_cross_entropy(logits, labels)
            rgb = (image * std + mean) * 255  # the loss wants the RGB image in [0, 255]
            crf = densecrf(rgb, torch.softmax(logits, dim=1), roi.to(device))[0] if weight else ce.new_zeros(())
            loss = ce + crf
            if not math.isfinite(loss.item()):
                raise RlossError(f"epoch {epoch}: the loss is {loss.item()}; try a smaller --lr or --densecrf-weight")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            poly.step()
            sums += torch.tensor([ce.item(), crf.item()])
        mean_ce, mean_crf = (sums / len(train_loader)).tolist()
        matrix = evaluate(model, val_loader, len(class_names), device)
        iou, miou = class_iou(matrix), 100 * mean_iou(matrix)
        state = {"model": model.state_dict(), "model_name": args.model, "class_names": class_names,
                 "epoch": epoch, "val_miou": miou, "args": plain_args}
        save_atomically(state, args.out / "last.pt")
        improved = miou > best
        if improved:
            best = miou
            save_atomically(state, args.out / "best.pt")
        per_class = ", ".join(f"{name} {100 * v:.1f}" for name, v in zip(class_names, iou.tolist()))
        print(f"epoch {epoch}/{args.epochs}: loss {mean_ce + mean_crf:.4f} = ce {mean_ce:.4f} "
              f"+ densecrf {mean_crf:.4f}, val mIoU {miou:.2f} ({per_class}), {time.perf_counter() - start:.1f} s"
              f"{', best so far' if improved else ''}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a folder made by `python -m rloss data prepare`")
    parser.add_argument("--out", type=Path, default=Path("runs"), help="where best.pt and last.pt go")
    parser.add_argument("--model", default="deeplabv3_mobilenet_v3_large",
                        choices=torchvision.models.list_models(module=torchvision.models.segmentation))
    parser.add_argument("--pretrained-backbone", action="store_true", help="start from ImageNet backbone weights")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=321, help="square training crops of this many pixels")
    parser.add_argument("--lr", type=float, default=0.007, help="the start of the poly schedule")
    parser.add_argument("--densecrf-weight", type=float, help="default: the README's rule for crop, scale, sigma_xy")
    parser.add_argument("--sigma-rgb", type=float, default=15.0)
    parser.add_argument("--sigma-xy", type=float, default=100.0)
    parser.add_argument("--densecrf-scale", type=float, default=0.5, help="the loss's down-scaling (scale_factor)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except (RlossError, OSError) as error:
        print(f"{Path(__file__).name}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
