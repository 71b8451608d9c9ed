"""Seconds per forward+backward of DeepLab-LargeFOV (our exper/ train.prototxt, its ImageSegData layer
replaced by fed tensors) in each precision, with and without activation checkpointing, in one process
on the same weights and input; also the forward alone (no grad, as `test` and `infer` run it).

    python bench/bench_precision.py [--crop 321] [--batch 1] [--repeats 5] [--threads 2]
                                    [--precisions fp32,bf16] [--checkpoint] [--net train]

Repeats go round the configurations in turn (a machine whose speed drifts slows them alike); medians
are reported, with the ratio to the first precision listed. fp16 is not in the default list: on the CPU torch's float16
convolution backward takes a slow path (minutes per iteration at crop 321); add it with
--precisions fp32,bf16,fp16 (and --repeats 1) to see.
"""

from __future__ import annotations

import functools
import statistics
from pathlib import Path

import torch
from harness import size_parser, timed

from rloss.net import Net
from rloss.proto import caffe_pb2

CONFIG = Path(__file__).resolve().parents[1] / "exper" / "pascal_scribble" / "config" / "deeplab_largeFOV"
VALUES = {"NUM_LABELS": "21", "DATA_ROOT": "/unused/", "EXP": "pascal_scribble", "TRAIN_SET": "train",
          "NET_ID": "deeplab_largeFOV", "DENSECRF_LOSS_WEIGHT": "1e-8"}


def build(net_name: str) -> Net:
    net = Net.from_prototxt(CONFIG / f"{net_name}.prototxt", caffe_pb2.TRAIN, values=VALUES, feed_data_layers=True)
    with torch.no_grad():  # the file's convolutions have no fillers (they expect an init model)
        for entry in net.learnable:
            entry.tensor.normal_(0, 0.01)
    return net


def main() -> None:
    parser = size_parser(__doc__.splitlines()[0], repeats=5)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--checkpoint", action="store_true", help="also time each precision with checkpointing")
    parser.add_argument("--net", default="train", choices=("train", "trainwithdensecrfloss"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = build(args.net)
    image = torch.randn(args.batch, 3, args.crop, args.crop) * 50
    label = torch.randint(0, 21, (args.batch, 1, args.crop, args.crop)).float()
    label[:, :, ::3] = 255
    feeds = {"data": image, "label": label}
    configs = [(p, c) for p in args.precisions.split(",") for c in ((False, True) if args.checkpoint else (False,))]

    def train_step(config) -> None:
        net.precision, net.checkpoint_activations = config
        net.zero_grad(set_to_none=False)
        net.forward(feeds).backward()

    def forward(config) -> None:
        net.precision = config[0]
        with torch.no_grad():
            net.forward(feeds)

    for config in configs:  # warm-up (oneDNN picks its kernels on a first call)
        train_step(config)
    train = {config: [] for config in configs}
    infer = {config: [] for config in configs}
    for _ in range(args.repeats):
        for config in configs:
            train[config].append(timed(functools.partial(train_step, config)))
            if not config[1]:
                infer[config].append(timed(functools.partial(forward, config)))
    print(f"DeepLab-LargeFOV ({args.net}.prototxt), batch {args.batch}, crop {args.crop}, {args.threads} threads, "
          f"median of {args.repeats}")
    versus = f"vs {configs[0][0]}"
    print(f"{'precision':<10}{'checkpoint':<12}{'fwd+bwd s/it':>14}{versus:>9}{'forward s':>11}{versus:>9}")
    base_train = statistics.median(train[configs[0]])
    base_infer = statistics.median(infer[configs[0]])
    for config in configs:
        step = statistics.median(train[config])
        line = f"{config[0]:<10}{'yes' if config[1] else 'no':<12}{step:>14.3f}{step / base_train:>9.2f}"
        if infer[config]:
            alone = statistics.median(infer[config])
            line += f"{alone:>11.3f}{alone / base_infer:>9.2f}"
        print(line)


if __name__ == "__main__":
    main()
