"""Forward+backward time of DeepLab-LargeFOV built from the original prototxt by rloss, against the same
network written directly in PyTorch, same weights, same input, same process (issue: ratio <= 1.05).

    python bench/bench_net.py [--crop 321] [--batch 1] [--repeats 7]

The net file is the original experiment's train.prototxt (../shared/reference), its ImageSegData layer
replaced by fed tensors. Runs alternate between the two models; medians are reported.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import size_parser, timed
from torch import nn

from rloss.net import Net
from rloss.proto import caffe_pb2

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "rloss-exper" / "exper" / "pascal_scribble"
VGG_BLOCKS = [(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]


class LargeFOV(nn.Module):
    """DeepLab-LargeFOV as one would write it in PyTorch (the baseline)."""

    def __init__(self, num_labels: int = 21):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for block, (width, count) in enumerate(VGG_BLOCKS):
            dilation = 2 if block == 4 else 1
            for _ in range(count):
                layers += [nn.Conv2d(channels, width, 3, padding=dilation, dilation=dilation), nn.ReLU(inplace=True)]
                channels = width
            stride = 2 if block < 3 else 1
            layers.append(nn.MaxPool2d(3, stride, 1, ceil_mode=True))
        layers += [
            nn.AvgPool2d(3, 1, 1, ceil_mode=True, count_include_pad=True),
            nn.Conv2d(512, 1024, 3, padding=12, dilation=12), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Conv2d(1024, 1024, 1), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Conv2d(1024, num_labels, 1),
        ]
        self.body = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        scores = self.body(image)
        small = F.interpolate(label, size=scores.shape[2:], mode="bilinear", align_corners=True)
        target = small[:, 0].long()
        torch.bincount((target * 21 + scores.argmax(1)).flatten().clamp(0, 21 * 21 - 1), minlength=441)
        return F.cross_entropy(scores, target, ignore_index=255)


def copy_weights(net: Net, model: LargeFOV) -> None:
    convs = [m for m in model.body if isinstance(m, nn.Conv2d)]
    layers = [layer for layer in net.layers if layer.type_name == "Convolution"]
    assert len(convs) == len(layers) == 16
    with torch.no_grad():
        for conv, layer in zip(convs, layers):
            conv.weight.copy_(layer.blobs[0])
            conv.bias.copy_(layer.blobs[1])


def main() -> None:
    parser = size_parser(__doc__.splitlines()[0], repeats=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    path = REFERENCE / "config" / "deeplab_largeFOV" / "train.prototxt"
    values = {"NUM_LABELS": "21", "DATA_ROOT": "/unused/", "EXP": "pascal_scribble", "TRAIN_SET": "train",
              "NET_ID": "deeplab_largeFOV"}
    net = Net.from_prototxt(path, caffe_pb2.TRAIN, values=values, feed_data_layers=True)
    with torch.no_grad():
        for entry in net.learnable:
            entry.tensor.normal_(0, 0.01)
    model = LargeFOV()
    copy_weights(net, model)

    image = torch.randn(args.batch, 3, args.crop, args.crop) * 50
    label = torch.randint(0, 21, (args.batch, 1, args.crop, args.crop)).float()
    label[:, :, ::3] = 255

    def run_net() -> None:
        net.zero_grad(set_to_none=False)
        net.forward({"data": image, "label": label}).backward()

    def run_model() -> None:
        model.zero_grad(set_to_none=False)
        model(image, label).backward()

    run_net(), run_model()  # warm-up
    ours, baseline = [], []
    for _ in range(args.repeats):
        ours.append(timed(run_net))
        baseline.append(timed(run_model))
    ours_median, base_median = statistics.median(ours), statistics.median(baseline)
    print(f"DeepLab-LargeFOV forward+backward, batch {args.batch}, crop {args.crop}, {args.threads} threads, "
          f"median of {args.repeats}")
    print(f"  rloss Net from prototxt : {ours_median * 1000:8.1f} ms")
    print(f"  hand-written PyTorch    : {base_median * 1000:8.1f} ms")
    print(f"  ratio (rloss / PyTorch) : {ours_median / base_median:8.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
