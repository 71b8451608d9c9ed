"""Writes the MSRC-21 experiment's net and solver files (exper/msrc21/*.prototxt) from one description.

    python exper/msrc21/make_nets.py           # rewrite the files
    python exper/msrc21/make_nets.py --check   # exit 1 if a file differs from what this script writes

The net ("msrc_fov") is a narrow LargeFOV-like net trained from scratch: 3x3 convolutions with
BatchNorm + Scale + ReLU, one of 32 channels and two of 64, each group followed by a max pooling (output
stride 4), three of 128 channels at dilations 1, 2, 4, a LargeFOV fc6 (3x3, 256 channels, dilation 8), a
1x1 fc7 (256) with dropout after fc6 and fc7, a 1x1 classifier and Interp back to the input (zoom 4):
0.79 M learned parameters. Its receptive field (137 pixels) spans most of a half-size MSRC photo.

Images are read at half size (`scale_factors` 0.5 in TEST; 0.4 to 0.6 at random in TRAIN) and trained on
random CROP_SIZE crops (4k + 1 pixels, default 113); the test net scores each image whole at half size
(TEST_CROP_SIZE 161 covers a 160x106 or 106x160 image in one pass), against its label map resized the same
way (nearest). The partial cross-entropy is computed on the upsampled scores at the crop's resolution, so
that every scribbled pixel counts (a label shrunk by 4 would keep one pixel in 16 of the 3-pixel-wide
strokes).

BatchNorm runs in the fork's mode that keeps its statistics (use_global_stats + update_global_stats in
TRAIN, the stored statistics in TEST): the layer's textbook batch mode does not update them, which would
leave the test net without any.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rloss.models.regularizers import REGULARIZERS as LIBRARY_REGULARIZERS
from rloss.models.regularizers import add_regularized_loss
from rloss.netspec import NetBuilder, Var

HERE = Path(__file__).resolve().parent
HEADER = "# Written by exper/msrc21/make_nets.py; edit that script and rerun it, not this file.\n"
MEAN = "mean_value: 104.008 mean_value: 116.669 mean_value: 122.675"
TRAIN_SCALES = (0.4, 0.45, 0.5, 0.55, 0.6)
TEST_SCALE = 0.5
# (name, channels, dilation, pooled after): the convolutions before fc6.
CONVS = (("conv1", 32, 1, True),
         ("conv2_1", 64, 1, False), ("conv2_2", 64, 1, True),
         ("conv3_1", 128, 1, False), ("conv3_2", 128, 2, False), ("conv3_3", 128, 4, False))
FC6 = (256, 8)
FC7 = 256
STRIDE = 4


def data_layer(phase: str) -> str:
    if phase == "TRAIN":
        source, batch, crop, mirror, shuffle = "${TRAIN_SET}", "${BATCH_SIZE}", "${CROP_SIZE}", "true", "true"
        scales = TRAIN_SCALES
    else:
        source, batch, crop, mirror, shuffle = "${TEST_SET}", "1", "${TEST_CROP_SIZE}", "false", "false"
        scales = (TEST_SCALE,)
    factors = " ".join(f"scale_factors: {s:g}" for s in scales)
    return f"""layer {{
  name: "data" type: "ImageSegData" top: "data" top: "label" top: "data_dim"
  include {{ phase: {phase} }}
  image_data_param {{
    root_folder: "${{DATA_ROOT}}" source: "${{LIST_DIR}}/{source}.txt"
    label_type: PIXEL batch_size: {batch} shuffle: {shuffle}
  }}
  transform_param {{
    {MEAN}
    crop_size: {crop} mirror: {mirror}
    {factors}
  }}
}}
"""


def conv_bn_relu(name: str, bottom: str, channels: int, kernel: int, dilation: int) -> str:
    pad = dilation * (kernel // 2)
    dilated = f" dilation: {dilation}" if dilation > 1 else ""
    return f"""layer {{
  name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}"
  param {{ lr_mult: 1 decay_mult: 1 }}
  convolution_param {{ num_output: {channels} kernel_size: {kernel} pad: {pad}{dilated} bias_term: false
    weight_filler {{ type: "msra" }} }}
}}
layer {{ name: "{name}_bn" type: "BatchNorm" bottom: "{name}" top: "{name}"{BN_PARAM}}}
layer {{
  name: "{name}_scale" type: "Scale" bottom: "{name}" top: "{name}"
  param {{ lr_mult: 1 decay_mult: 0 }} param {{ lr_mult: 1 decay_mult: 0 }}
  scale_param {{ bias_term: true }}
}}
layer {{ name: "{name}_relu" type: "ReLU" bottom: "{name}" top: "{name}" }}
"""


BN_PARAM = "${BN_PARAM}"  # filled per phase in body()


FC_TAIL = """layer { name: "fc6_drop" type: "Dropout" bottom: "fc6" top: "fc6" dropout_param { dropout_ratio: 0.5 } }
layer {
  name: "fc7" type: "Convolution" bottom: "fc6" top: "fc7"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  convolution_param { num_output: FC7_CHANNELS kernel_size: 1
    weight_filler { type: "msra" } bias_filler { type: "constant" value: 0 } }
}
layer { name: "fc7_relu" type: "ReLU" bottom: "fc7" top: "fc7" }
layer { name: "fc7_drop" type: "Dropout" bottom: "fc7" top: "fc7" dropout_param { dropout_ratio: 0.5 } }
layer {
  name: "fc8" type: "Convolution" bottom: "fc7" top: "fc8"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  convolution_param { num_output: ${NUM_LABELS} kernel_size: 1
    weight_filler { type: "gaussian" std: 0.01 } bias_filler { type: "constant" value: 0 } }
}
layer { name: "fc_interp" type: "Interp" bottom: "fc8" top: "fc_interp" interp_param { zoom_factor: STRIDE } }
"""


def body(phase: str) -> str:
    """The layers from the data to `fc_interp` (the scores at the input's size)."""
    bn = ("\n  batch_norm_param { use_global_stats: true update_global_stats: true moving_average_fraction: 0.99 }\n"
          if phase == "TRAIN" else " ")
    text, bottom, pools = "", "data", 0
    for name, channels, dilation, pooled in CONVS:
        text += conv_bn_relu(name, bottom, channels, 3, dilation)
        bottom = name
        if pooled:
            pools += 1
            text += (f'layer {{ name: "pool{pools}" type: "Pooling" bottom: "{bottom}" top: "pool{pools}"\n'
                     f'  pooling_param {{ pool: MAX kernel_size: 3 stride: 2 pad: 1 }} }}\n')
            bottom = f"pool{pools}"
    text += conv_bn_relu("fc6", bottom, FC6[0], 3, FC6[1])
    text += FC_TAIL.replace("FC7_CHANNELS", str(FC7)).replace("STRIDE", str(STRIDE))
    return text.replace(BN_PARAM, bn)


def library_layer(name: str) -> str:
    """The layer of rloss's regularizer `name` as the generated phase-2 nets of the original networks carry
    it (rloss/models/regularizers.py: same kernel, bounds and weight variable), on fc_softmax."""
    builder = NetBuilder()
    regularizer = LIBRARY_REGULARIZERS[name]
    add_regularized_loss(builder, regularizer, "fc_softmax", regularizer.weight, Var("BI_XY_STD"), Var("BI_RGB_STD"))
    text = builder.text()
    return text[text.index("layer {"):]


REGULARIZERS = {
    "densecrfloss": """layer {
  name: "densecrf_loss" type: "DenseCRFLoss" bottom: "data" bottom: "fc_softmax" top: "densecrf_loss"
  propagate_down: false propagate_down: true
  loss_weight: ${DENSECRF_LOSS_WEIGHT}
  densecrf_loss_param { bi_xy_std: ${BI_XY_STD} bi_rgb_std: ${BI_RGB_STD} scale_factor: ${DENSECRF_SCALE} }
}
""",
    "normalizedcutloss": """layer {
  name: "normalized_cut_loss" type: "NormalizedCutLoss" bottom: "data" bottom: "fc_softmax"
  top: "normalized_cut_loss"
  propagate_down: false propagate_down: true
  loss_weight: ${NORMALIZED_CUT_LOSS_WEIGHT}
  normalized_cut_loss_param { bi_xy_std: ${NC_XY_STD} bi_rgb_std: ${NC_RGB_STD} scale_factor: ${DENSECRF_SCALE} }
}
""",
    "gatedcrfloss": library_layer("gated_crf"),
    "sizeconstraintloss": library_layer("size_constraint"),
}
PHASE2 = tuple(f"trainwith{regularizer}" for regularizer in REGULARIZERS)

SOFTMAX = 'layer { name: "fc_softmax" type: "Softmax" bottom: "fc_interp" top: "fc_softmax" }\n'
SILENCE_DIM = 'layer { name: "silence" type: "Silence" bottom: "data_dim" }\n'
LOSS = """layer {
  name: "loss" type: "SoftmaxWithLoss" bottom: "fc_interp" bottom: "label" top: "softmax_loss"
  loss_param { ignore_label: 255 }
}
""" + SILENCE_DIM


def accuracy_layer(scores: str) -> str:
    """The test nets' scoring of blob `scores` against the label map."""
    return f"""layer {{
  name: "accuracy" type: "SegAccuracy" bottom: "{scores}" bottom: "label" top: "accuracy"
  seg_accuracy_param {{ ignore_label: 255 reset: false }}
}}
"""


# The tails of the test nets: the scores as they are; for two diagnostics, the scores after DeepLab's
# post-processing (mean-field inference of the fully connected CRF, its Gaussian kernel as DeepLab's, its
# bilateral kernel at the DenseCRF loss's sigmas) or the scores with the DenseCRF loss's value on each whole
# image beside them (its relaxed energy, at DENSECRF_LOSS_WEIGHT 1: how far training lowered it).
TEST_TAILS = {
    "test": accuracy_layer("fc_interp") + SILENCE_DIM,
    "testwithdensecrfloss": SOFTMAX + REGULARIZERS["densecrfloss"] + accuracy_layer("fc_interp") + SILENCE_DIM,
    "testwithcrf": """layer {
  name: "crf" type: "DenseCRF" bottom: "fc_interp" bottom: "data_dim" bottom: "data" top: "crf"
  dense_crf_param { max_iter: 10 pos_w: 3 pos_xy_std: 3 bi_w: 5 bi_xy_std: ${BI_XY_STD} bi_rgb_std: ${BI_RGB_STD} }
}
""" + accuracy_layer("crf"),
}

NET_COMMENT = """# MSRC-21 from scratch at half size: msrc_fov, a narrow LargeFOV-like net (7 3x3 convolutions with
# BatchNorm, output stride 4, fc6 dilated by 8, fc7, fc8, Interp x4). See exper/msrc21/make_nets.py.
"""


def net(kind: str) -> str:
    """kind: train, a test net (TEST_TAILS) or a phase-2 net (PHASE2)."""
    text = HEADER + NET_COMMENT + f"# {kind}\nname: \"msrc_fov\"\n"
    if kind in TEST_TAILS:
        return text + data_layer("TEST") + body("TEST") + TEST_TAILS[kind]
    text += data_layer("TRAIN") + body("TRAIN")
    regularizer = kind[len("trainwith"):] if kind != "train" else ""
    if regularizer:
        text += SOFTMAX + REGULARIZERS[regularizer]
    return text + LOSS


def solver(kind: str) -> str:
    """kind: train (phase 1, the control's start and full supervision) or a phase-2 net's name."""
    phase2 = kind != "train"
    iters, lr = ("${MAX_ITER2}", "${BASE_LR2}") if phase2 else ("${MAX_ITER}", "${BASE_LR}")
    return HEADER + f"""# Solver of msrc_fov ({kind}); MODEL_DIR, SEED and the budget come from exper/msrc21/run.sh.
train_net: "exper/msrc21/{kind}.prototxt"
base_lr: {lr}
lr_policy: "poly"
power: 0.9
max_iter: {iters}
momentum: 0.9
weight_decay: 0.0005
display: ${{DISPLAY}}
average_loss: ${{DISPLAY}}
snapshot: {iters}
snapshot_prefix: "${{MODEL_DIR}}/{kind}"
random_seed: ${{SEED}}
solver_mode: CPU
"""


def files() -> dict[str, str]:
    out = {f"{kind}.prototxt": net(kind) for kind in ("train", *PHASE2, *TEST_TAILS)}
    out["solver.prototxt"] = solver("train")
    for kind in PHASE2:
        out[f"solver{kind[len('train'):]}.prototxt"] = solver(kind)
    return out


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name, text in files().items():
        path = HERE / name
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"exper/msrc21: {', '.join(stale)} differ from make_nets.py's output; "
              "run python exper/msrc21/make_nets.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
