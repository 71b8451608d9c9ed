"""What the DenseCRF loss asks of the network: one training step of a net with DenseCRF loss, then, for
every class, the probability map and the DenseCRF-loss gradient of the upsampled scores as figures.

This is the original `exper/visualize_densecrf_gradient.py` on rloss's pycaffe-style API. It needs
matplotlib, which rloss itself does not depend on (`pip install matplotlib`).

As the original (from `exper/`, after phase 1 of deeplab_largeFOV; DATA_ROOT in the environment):

    python visualize_densecrf_gradient.py [--solver S] [--weights W] [--out_dir visualization]

builds the solver of `pascal_scribble/config/deeplab_largeFOV/solverwithdensecrfloss_train.prototxt`
(found as rloss.paths says: the template `solverwithdensecrfloss.prototxt` stands in for the
generated file), copies `pascal_scribble/model/deeplab_largeFOV/train_iter_9000.caffemodel`, runs
`solver.step(1)` (forward, backward, the display log, one update) and reads the blobs of that step.

On any image and its scribble (a label PNG, 255 = unlabelled), without the PASCAL set-up:

    python exper/visualize_densecrf_gradient.py --image IMG --scribble PNG [--weights W]
        [--net small_fcn|deeplab_largeFOV] [--num_labels K] [--crop C] [--out_dir D]

writes a one-image list in a temporary folder and a solver and net made from the net's files
(prototxt/small_fcn or exper/pascal_scribble/config/deeplab_largeFOV) with batch 1, no shuffle, no
mirror and crop C (default: the smallest size the net accepts that holds the whole image). Without
--weights the net keeps its filler (random) weights, and the figures show an untrained net.

Output, as the original: `<out_dir>/<i>prob.png` (probability of class i for the first image of the
batch, viridis, 0..1) and `<out_dir>/<i>scorediff.png` (the gradient of the loss with respect to
the upsampled scores of class i, colormap hot), 640x480 with a colour bar, for every class; plus
`<out_dir>/image.png`, the input reconstructed as RGB (the original only showed it). Because the
upsampled scores feed nothing but the softmax of the DenseCRF loss, that gradient is the DenseCRF-loss
gradient -2 w/N A(S)*m pulled back through the softmax (A the
bilateral lattice filter, S the softmax, m the ROI mask of non-black pixels, N the batch size).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:
    import rloss  # noqa: F401
except ImportError:  # run from a clone without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from google.protobuf import text_format

from rloss import caffe
from rloss.caffe_log import setup_logging
from rloss.errors import DataError, NetError, RlossError
from rloss.paths import resolve_input
from rloss.proto.text import read_net, read_solver

HERE = Path(__file__).resolve().parent
MEAN_BGR = (104.008, 116.669, 122.675)
ORIGINAL_SOLVER = "pascal_scribble/config/deeplab_largeFOV/solverwithdensecrfloss_train.prototxt"
ORIGINAL_WEIGHTS = "pascal_scribble/model/deeplab_largeFOV/train_iter_9000.caffemodel"
FIGURE_SIZE, FIGURE_DPI = (6.4, 4.8), 100  # matplotlib's defaults: 640 x 480 pixels


@dataclass(frozen=True)
class NetFiles:
    """A net with DenseCRF loss that --image mode can use: its files, the `${VAR}` values they need
    besides the ones set here, the crop rule and the DenseCRF loss weight of its experiments."""

    solver: Path
    net: Path
    variables: dict
    crop_multiple: int  # (crop - 1) must be a multiple of this (the output stride)
    loss_weight: float


NETS = {
    "small_fcn": NetFiles(
        HERE.parent / "prototxt" / "small_fcn" / "solverwithdensecrfloss.prototxt",
        HERE.parent / "prototxt" / "small_fcn" / "trainwithdensecrfloss.prototxt",
        {"CONFIG_DIR": ".", "MODEL_DIR": ".", "LIST_DIR": ".", "STEPSIZE2": "100", "BASE_LR2": "0.001",
         "MAX_ITER2": "1", "BATCH_SIZE": "1", "BI_XY_STD": "30", "BI_RGB_STD": "15",
         "DENSECRF_SCALE": "1"},
        4, 2e-6),
    "deeplab_largeFOV": NetFiles(
        HERE / "pascal_scribble" / "config" / "deeplab_largeFOV" / "solverwithdensecrfloss.prototxt",
        HERE / "pascal_scribble" / "config" / "deeplab_largeFOV" / "trainwithdensecrfloss.prototxt",
        {}, 8, 1e-8),
}


@dataclass
class GradientFigures:
    """What the figures show, from one solver step: `prob` and `score_diff` (C, H, W) of the first
    image of the batch, `image` (H, W, 3) uint8 RGB, `data` (3, H, W) its data blob (mean-subtracted
    BGR), the DenseCRF loss (before its weight) and the settings needed to recompute the gradient."""

    prob: np.ndarray
    score_diff: np.ndarray
    image: np.ndarray
    data: np.ndarray
    loss: float
    loss_weight: float
    sigma_xy: float
    sigma_rgb: float
    batch_size: int
    blob_names: dict


# ---- the solver step --------------------------------------------------------------------------------

def densecrf_blobs(net: caffe.Net) -> tuple[str, dict]:
    """(DenseCRFLoss layer name, blob names): its image, probabilities and loss, and the scores the
    softmax reads (the blob whose diff is drawn)."""
    names = list(net._layer_names)
    crf = [name for name, layer in zip(names, net.layers) if layer.type == "DenseCRFLoss"]
    if len(crf) != 1:
        raise NetError(f"the train net must have one DenseCRFLoss layer, it has {len(crf)}")
    image, prob = net.bottom_names[crf[0]][:2]
    softmax = [name for name, layer in zip(names, net.layers)
               if layer.type == "Softmax" and prob in net.top_names[name]]
    if not softmax:
        raise NetError(f"the DenseCRFLoss layer '{crf[0]}' does not read the output of a Softmax layer")
    blobs = {"image": image, "prob": prob, "loss": net.top_names[crf[0]][0],
             "scores": net.bottom_names[softmax[0]][0]}
    return crf[0], blobs


def step_and_read(solver: caffe.SGDSolver) -> GradientFigures:
    """One solver step, then the blobs the figures show (printing what the original printed)."""
    layer_name, names = densecrf_blobs(solver.net)
    solver.step(1)
    blobs = solver.net.blobs
    loss = blobs[names["loss"]].data
    prob = blobs[names["prob"]].data
    score_diff = blobs[names["scores"]].diff
    print(f"{names['loss']} (before its loss weight):", loss)
    print(f"{names['prob']} shape:", prob.shape)
    print("one probability map:", type(prob[0, 0]), prob[0, 0].shape, prob[0, 0].dtype)
    if prob.shape[1] > 1:
        print(f"{names['scores']}.diff[0, 1]: max {score_diff[0, 1].max()}, min {score_diff[0, 1].min()}")
    data = blobs[names["image"]].data
    param = solver.net.layers[list(solver.net._layer_names).index(layer_name)].param
    return GradientFigures(
        prob=prob[0].copy(), score_diff=score_diff[0].copy(), image=rgb_image(data[0]), data=data[0].copy(),
        loss=float(loss.ravel()[0]), loss_weight=float(param.loss_weight[0]) if param.loss_weight else 0.0,
        sigma_xy=float(param.densecrf_loss_param.bi_xy_std), sigma_rgb=float(param.densecrf_loss_param.bi_rgb_std),
        batch_size=int(data.shape[0]), blob_names=names)


def rgb_image(data: np.ndarray) -> np.ndarray:
    """The data blob of one image (mean-subtracted BGR) as RGB uint8, as the original rebuilt it
    (adding the mean back, then truncating to uint8)."""
    rgb = np.zeros(data.shape[1:] + (3,), dtype=np.uint8)
    for channel in range(3):
        rgb[:, :, 2 - channel] = data[channel] + MEAN_BGR[channel]
    return rgb


# ---- figures ----------------------------------------------------------------------------------------

def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("visualize_densecrf_gradient.py needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_map(plt, values: np.ndarray, path: Path, **imshow) -> None:
    figure = plt.figure(figsize=FIGURE_SIZE, dpi=FIGURE_DPI)
    plt.imshow(values, **imshow)
    plt.axis("off")
    plt.colorbar()
    figure.savefig(path, dpi=FIGURE_DPI)
    plt.close(figure)


def save_figures(figures: GradientFigures, out_dir: Path) -> None:
    from PIL import Image

    plt = pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    for i in range(figures.prob.shape[0]):
        save_map(plt, figures.prob[i], out_dir / f"{i}prob.png", vmin=0, vmax=1)
        save_map(plt, figures.score_diff[i], out_dir / f"{i}scorediff.png", cmap="hot")
    Image.fromarray(figures.image).save(out_dir / "image.png")
    print(f"wrote {2 * figures.prob.shape[0] + 1} figures to {out_dir}")


# ---- the two ways to get a solver -------------------------------------------------------------------

def original_solver(solver_file: str, weights: str) -> caffe.SGDSolver:
    """The original's solver and weights; relative paths are tried from here as well (exper/)."""
    solver = caffe.SGDSolver(resolve_input(solver_file, [HERE]))
    found = resolve_input(weights, [HERE])
    if not found.exists():
        raise RlossError(f"weights '{weights}' do not exist (the model of phase 1 of deeplab_largeFOV); "
                         "give --weights, or --image and --scribble to use any image")
    solver.net.copy_from(found)
    return solver


def smallest_crop(height: int, width: int, multiple: int) -> int:
    size = max(height, width)
    return size + (-(size - 1)) % multiple


def image_solver(args: argparse.Namespace, folder: Path) -> caffe.SGDSolver:
    """A solver over one image and its scribble, written into `folder` from the net's files."""
    from PIL import Image

    files = NETS[args.net]
    for path in (Path(args.image), Path(args.scribble)):
        if not path.is_file():
            raise DataError(f"'{path}' does not exist or is not a file")
        if any(c.isspace() for c in str(path.resolve())):
            raise DataError(f"'{path}' contains whitespace, which a list file cannot hold; rename it")
    with Image.open(args.image) as image:
        height, width = image.height, image.width
    crop = args.crop or smallest_crop(height, width, files.crop_multiple)
    if (crop - 1) % files.crop_multiple:
        raise DataError(f"--crop {crop}: {args.net} needs crop - 1 to be a multiple of {files.crop_multiple}")
    list_file = folder / "image.txt"
    list_file.write_text(f"{Path(args.image).resolve()} {Path(args.scribble).resolve()}\n")
    loss_weight = args.loss_weight if args.loss_weight is not None else files.loss_weight
    values = {**files.variables, "EXP": "pascal_scribble", "NET_ID": args.net, "DATA_ROOT": "", "TRAIN_SET": "train",
              "NUM_LABELS": str(args.num_labels), "DENSECRF_LOSS_WEIGHT": repr(loss_weight), "CROP_SIZE": str(crop)}
    net = read_net(files.net, values=values)
    for layer in net.layer:
        if layer.type == "ImageSegData":
            layer.image_data_param.source = str(list_file)
            layer.image_data_param.root_folder = ""
            layer.image_data_param.batch_size = 1
            layer.image_data_param.shuffle = False
            layer.transform_param.crop_size = crop
            layer.transform_param.mirror = False
    (folder / "net.prototxt").write_text(text_format.MessageToString(net))
    solver = read_solver(files.solver, values=values)
    solver.train_net = str(folder / "net.prototxt")
    solver.snapshot = 0
    solver.ClearField("snapshot_prefix")
    (folder / "solver.prototxt").write_text(text_format.MessageToString(solver))
    built = caffe.SGDSolver(folder / "solver.prototxt")
    if args.weights:
        built.net.copy_from(resolve_input(args.weights, [HERE]))
    else:
        print(f"no --weights: {args.net} keeps its filler (random) weights, so the figures show an untrained net")
    return built


# ---- command line -----------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--solver", default=ORIGINAL_SOLVER, help=f"solver file (default {ORIGINAL_SOLVER})")
    parser.add_argument("--weights", default=None,
                        help=f"weights to start from (default {ORIGINAL_WEIGHTS}; none in --image mode)")
    parser.add_argument("--image", default="", help="an image (then --scribble is needed)")
    parser.add_argument("--scribble", default="", help="its scribble: label PNG, 255 = unlabelled")
    parser.add_argument("--net", default="deeplab_largeFOV", choices=sorted(NETS), help="net of --image mode")
    parser.add_argument("--num_labels", type=int, default=21, help="classes in --image mode (default 21)")
    parser.add_argument("--crop", type=int, default=0, help="crop size in --image mode (default: whole image)")
    parser.add_argument("--loss_weight", type=float, default=None,
                        help="DenseCRF loss weight in --image mode (default: the net's, 1e-8 or 2e-6)")
    parser.add_argument("--out_dir", default="visualization", help="where the figures go (default visualization)")
    args = parser.parse_args(argv)
    if bool(args.image) != bool(args.scribble):
        parser.error("--image and --scribble go together")
    if args.num_labels < 1:
        parser.error(f"--num_labels must be >= 1, got {args.num_labels}")
    return args


def main(argv: list[str] | None = None) -> GradientFigures:
    args = parse_args(argv)
    setup_logging()
    caffe.set_mode_cpu()
    with tempfile.TemporaryDirectory(prefix="rloss-visualize-") as folder:
        if args.image:
            solver = image_solver(args, Path(folder))
        else:
            solver = original_solver(args.solver, args.weights or ORIGINAL_WEIGHTS)
        figures = step_and_read(solver)
    save_figures(figures, Path(args.out_dir))
    return figures


if __name__ == "__main__":
    try:
        main()
    except RlossError as error:
        sys.exit(f"visualize_densecrf_gradient.py: error: {error}")
