"""The four networks of the pascal_scribble experiments (DeepLab-LargeFOV, its multi-scale variant,
DeepLab-v2 VGG16 ASPP-L and DeepLab-v2 ResNet-101 on three scales), as `NetBuilder`s with options.

Each function takes `kind`: "train" (partial cross-entropy on the scribbles), "trainwithdensecrfloss"
(the same plus the DenseCRF loss on the upsampled softmax; "trainwithnormalizedcutloss" etc. with
rloss's other regularizers, `rloss.models.regularizers`) or "test" (full-resolution scores scored by
SegAccuracy), and keyword options (`NetOptions`): e.g. `deeplab_largefov("train", crop_size=161,
num_labels=5)`. By default the numeric settings that the original templates left to the run script
are placeholders (`${NUM_LABELS}`, `${DENSECRF_LOSS_WEIGHT}`), as are names and paths (`${EXP}`,
`${DATA_ROOT}`, `${TRAIN_SET}`, `${TEST_SET}`, `${NET_ID}`).

With the default options each net reads into the same NetParameter, field by field, as the original
`exper/pascal_scribble/config/<net>/<kind>.prototxt` (tests/test_exper_equivalence.py), including the
originals' irregularities, which are kept on purpose and noted where they are built (they decide which
fields are set, hence what a reader of the file sees). The originals' commented-out layers (MatWrite,
DenseCRF inference, ArgMax, accuracyCRF in the test files) are omitted.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, NamedTuple

from rloss.errors import NetError
from rloss.models.regularizers import REGULARIZED_KINDS, add_regularized_loss
from rloss.netspec import NetBuilder, Var, constant, gaussian, lr_params

ORIGINAL_KINDS = ("train", "trainwithdensecrfloss", "test")  # the kinds the original experiments have
KINDS = ("train", *REGULARIZED_KINDS, "test")  # the net file of each kind is `<kind>.prototxt`


@dataclass(frozen=True)
class NetOptions:
    """Settings a user may change; None means "the original's value for this net and kind"."""

    num_labels: int | Var = Var("NUM_LABELS")
    crop_size: int | None = None  # 321 for training, 513 for test
    batch_size: int | None = None  # 20 / 30 / 10 / 1 for training (per net), 1 for test
    densecrf_loss_weight: float | Var = Var("DENSECRF_LOSS_WEIGHT")
    bi_xy_std: float | None = None  # 100 for the VGG nets, 80 for ResNet-101
    bi_rgb_std: float | None = None  # 15 for the VGG nets, 13 for ResNet-101
    exp: str = "${EXP}"  # part of layer names (fc8_${EXP}) and of the list paths
    data_root: str = "${DATA_ROOT}"
    source: str | None = None  # "${EXP}/list/${TRAIN_SET}.txt", or ${TEST_SET} for test
    net_name: str = "${NET_ID}"
    mean_values: tuple = (104.008, 116.669, 122.675)
    scale_factors: tuple | None = None  # random rescaling in training (ResNet: 0.5 0.75 1 1.25 1.5)
    ignore_label: int = 255


@dataclass(frozen=True)
class _NetDefaults:
    """What the originals use per net where `NetOptions` says None."""

    train_batch_size: int
    bi_xy_std: float
    bi_rgb_std: float
    crop_multiple: int  # (crop - 1) must be a multiple of this for the score maps to align
    train_scale_factors: tuple = ()


class _Net:
    """One net being built: the builder, the resolved options and the kind."""

    def __init__(self, title: str, kind: str, defaults: _NetDefaults, options: dict):
        if kind not in KINDS:
            raise NetError(f"unknown net kind {kind!r}; expected one of {', '.join(KINDS)}")
        self.test = kind == "test"
        self.regularizer = REGULARIZED_KINDS.get(kind)
        self.options = _resolve(_options(options, title), defaults, self.test)
        self.builder = NetBuilder(self.options.net_name, header=_header(title, kind))
        _check_options(self.options, defaults.crop_multiple, title)

    @property
    def fc8(self) -> str:
        return f"fc8_{self.options.exp}"


def _options(options: dict, title: str) -> NetOptions:
    known = [f.name for f in fields(NetOptions)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise NetError(f"{title}: unknown option(s) {', '.join(unknown)}; the options are {', '.join(known)}")
    return NetOptions(**options)


def _resolve(options: NetOptions, defaults: _NetDefaults, test: bool) -> NetOptions:
    list_set = "${TEST_SET}" if test else "${TRAIN_SET}"
    return replace(
        options,
        crop_size=options.crop_size or (513 if test else 321),
        batch_size=options.batch_size or (1 if test else defaults.train_batch_size),
        bi_xy_std=options.bi_xy_std if options.bi_xy_std is not None else defaults.bi_xy_std,
        bi_rgb_std=options.bi_rgb_std if options.bi_rgb_std is not None else defaults.bi_rgb_std,
        source=options.source or f"{options.exp}/list/{list_set}.txt",
        scale_factors=() if test else (options.scale_factors if options.scale_factors is not None
                                       else defaults.train_scale_factors),
    )


def _check_options(o: NetOptions, crop_multiple: int, title: str) -> None:
    if (o.crop_size - 1) % crop_multiple:
        fits = ", ".join(str(crop_multiple * k + 1) for k in (5, 10, 16))
        raise NetError(f"{title}: crop_size {o.crop_size} does not align the score maps with the label: "
                       f"crop_size - 1 must be a multiple of {crop_multiple} (e.g. {fits})")
    if not isinstance(o.num_labels, Var) and (not isinstance(o.num_labels, int) or o.num_labels < 1):
        raise NetError(f"{title}: num_labels must be a positive integer, not {o.num_labels!r}")
    if o.batch_size < 1:
        raise NetError(f"{title}: batch_size must be positive, not {o.batch_size}")


def _header(title: str, kind: str) -> str:
    return (f"{title}: {kind} net.\n"
            "Generated by `python -m rloss.models.write_exper` from rloss/models/deeplab.py; "
            "edit the generator, not this file.")


# ---- pieces shared by the four nets -----------------------------------------------------------------

def _data_layer(net: _Net, three_tops: bool) -> None:
    """ImageSegData: data, label (and data_dim, the image size, always present in test nets)."""
    o = net.options
    tops = ["data", "label", "data_dim"] if three_tops or net.test else ["data", "label"]
    net.builder.add(
        "data", "ImageSegData", tops=tops,
        include=[{"phase": "TEST" if net.test else "TRAIN"}],
        transform_param={"mean_value": list(o.mean_values), "crop_size": o.crop_size, "mirror": not net.test,
                         "scale_factors": list(o.scale_factors)},
        image_data_param={"root_folder": o.data_root, "source": o.source, "label_type": "PIXEL",
                          "batch_size": o.batch_size, "shuffle": None if net.test else True},
    )


def _gaussian_fillers(std: float) -> dict:
    return {"weight_filler": gaussian(std), "bias_filler": constant(0)}


def _classifier_fillers(net: _Net) -> dict:
    """Fillers of the new (randomly initialised) classifiers; the test files leave them out."""
    return {} if net.test else _gaussian_fillers(0.01)


def _label_shrink(net: _Net, factor: int = 8, name: str = "label_shrink") -> str:
    """The label brought to the score resolution (pure sub-sampling, see spec pitfall 4)."""
    return net.builder.interp(name, "label", shrink_factor=factor, pad_beg=0, pad_end=0)


def _loss(net: _Net, scores: str, label: str, name: str = "loss", named_top: bool = False) -> None:
    """SoftmaxWithLoss; only DeepLab-LargeFOV's CRF file names its top and states loss_weight 1."""
    net.builder.add(name, "SoftmaxWithLoss", [scores, label], ["softmax_loss"] if named_top else [],
              loss_weight=1.0 if named_top else None, include=[{"phase": "TRAIN"}],
              loss_param={"ignore_label": net.options.ignore_label})


def _accuracy(net: _Net, scores: str, label: str, name: str = "accuracy", top: str | None = None) -> None:
    """SegAccuracy; the test nets accumulate over the whole run (reset: false)."""
    net.builder.add(name, "SegAccuracy", [scores, label], [top or name],
              seg_accuracy_param={"ignore_label": net.options.ignore_label, "reset": False if net.test else None})


def _regularized_loss(net: _Net, scores: str, interp_name: str, interp_top: str | None = None,
                      with_loss_param: bool = True) -> None:
    """The regularised loss of the net's kind on softmax(scores upsampled ×8), gradient to the scores
    only. The DenseCRF loss of all but DeepLab-LargeFOV also carries a loss_param the layer ignores (as
    in the originals)."""
    regularizer = net.regularizer
    upsampled = net.builder.interp(interp_name, scores, top=interp_top, zoom_factor=8,
                             comment=f"{regularizer.title} on the full-resolution softmax")
    probabilities = net.builder.softmax(f"{upsampled}_softmax", upsampled)
    o = net.options
    densecrf = regularizer.name == "densecrf"
    weight = o.densecrf_loss_weight if densecrf else regularizer.weight
    add_regularized_loss(net.builder, regularizer, probabilities, weight, o.bi_xy_std, o.bi_rgb_std,
                         loss_param={"ignore_label": o.ignore_label} if with_loss_param and densecrf else None)


# ---- VGG16 nets -------------------------------------------------------------------------------------

_VGG_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))  # (width, convolutions) per block
_VGG_DEFAULTS = dict(bi_xy_std=100.0, bi_rgb_std=15.0, crop_multiple=8)


def _vgg_trunk(net: _Net, params: list, after_pool: Callable[[int, str], None] | None = None) -> str:
    """conv1_1 … pool5 of DeepLab's VGG16: 3×3 max pools (stride 2, 2, 2, 1, 1), conv5 dilated by 2.
    `after_pool(k, blob)` is called with (0, "data") first, then after each of pool1 … pool4."""
    x = "data"
    if after_pool:
        after_pool(0, x)
    for block, (width, count) in enumerate(_VGG_BLOCKS, 1):
        dilation = 2 if block == 5 else None
        for i in range(1, count + 1):
            x = net.builder.conv(f"conv{block}_{i}", x, width, 3, pad=dilation or 1, dilation=dilation, params=params)
            net.builder.relu(f"relu{block}_{i}", x)
        x = net.builder.pool(f"pool{block}", x, "MAX", kernel_size=3, stride=2 if block <= 3 else 1, pad=1)
        if after_pool and block < 5:
            after_pool(block, x)
    return x


def _fc_branch(net: _Net, bottom: str, dilation: int, suffix: str, params: list, classifier_params: list,
               comment: str | None = None) -> str:
    """fc6 (3×3, dilated, 1024) → fc7 (1×1, 1024) → fc8 classifier, with ReLU and Dropout between."""
    fc6 = net.builder.conv(f"fc6{suffix}", bottom, 1024, 3, pad=dilation, dilation=dilation, params=params,
                     comment=comment)
    net.builder.relu(f"relu6{suffix}", fc6)
    net.builder.dropout(f"drop6{suffix}", fc6)
    fc7 = net.builder.conv(f"fc7{suffix}", fc6, 1024, 1, params=params)
    net.builder.relu(f"relu7{suffix}", fc7)
    net.builder.dropout(f"drop7{suffix}", fc7)
    return net.builder.conv(f"{net.fc8}{suffix}", fc7, net.options.num_labels, 1, params=classifier_params,
                      **_classifier_fillers(net))


def _largefov_head(net: _Net, pool5: str, params: list, classifier_params: list) -> str:
    """DeepLab-LargeFOV's head: 3×3 average pool, then fc6 dilated by 12."""
    pool5a = net.builder.pool("pool5a", pool5, "AVE", kernel_size=3, stride=1, pad=1)
    return _fc_branch(net, pool5a, 12, "", params, classifier_params)


def _training_params(net: _Net) -> tuple[list, list]:
    """(trunk, classifier) param specs: lr 1/2 and 10/20 in training; none in the test files."""
    return ([], []) if net.test else (lr_params(1, 2), lr_params(10, 20))


def deeplab_largefov(kind: str = "train", **options) -> NetBuilder:
    """DeepLab-LargeFOV (VGG16, output stride 8): scores `fc8_${EXP}` at (crop - 1) / 8 + 1."""
    net = _Net("DeepLab-LargeFOV", kind, _NetDefaults(train_batch_size=20, **_VGG_DEFAULTS), options)
    _data_layer(net, three_tops=False)
    params, classifier_params = _training_params(net)
    scores = _largefov_head(net, _vgg_trunk(net, params), params, classifier_params)
    if net.test:
        full = net.builder.interp("fc8_interp", scores, zoom_factor=8)
        _accuracy(net, full, "label")
        net.builder.add("silence", "Silence", ["label", full, "data_dim"], include=[{"phase": "TEST"}])
        return net.builder
    label = _label_shrink(net)
    _loss(net, scores, label, named_top=net.regularizer is not None)
    if net.regularizer:
        _regularized_loss(net, scores, "fc8_interp", with_loss_param=False)
    _accuracy(net, scores, label)
    return net.builder


class _MscHead(NamedTuple):
    """One multi-scale head of DeepLab-MSc-LargeFOV, attached to `bottom`."""

    bottom: str
    train_stride: int  # brings `bottom` to the score resolution in training
    fc_std: float
    fc_stride_stated: bool  # the original states `stride: 1` on this head's 1×1 conv
    classifier_fillers: bool  # pool3_ms has none in the original (so its weights start at zero)
    fc_filler_in_test: bool  # pool4_fc keeps its fillers in the original test file


_MSC_HEADS = (
    _MscHead("data", 8, 0.001, True, True, False),
    _MscHead("pool1", 4, 0.001, False, True, False),
    _MscHead("pool2", 2, 0.001, False, True, False),
    _MscHead("pool3", 1, 0.001, True, False, False),
    _MscHead("pool4", 1, 0.005, True, True, True),
)


def _msc_head(net: _Net, head: _MscHead) -> str:
    """conv 3×3 (128) → ReLU → Dropout → conv 1×1 (128) → ReLU → Dropout → conv 1×1 (labels).
    Training strides the first conv down to the score resolution; the test net runs it at stride 1
    and upsamples the head's scores instead."""
    b, prefix, test = net.builder, head.bottom, net.test
    params = [] if test else lr_params(1, 2)
    conv_fillers = {} if test else _gaussian_fillers(0.001)
    fc_fillers = _gaussian_fillers(head.fc_std) if not test or head.fc_filler_in_test else {}
    classifier_fillers = _gaussian_fillers(0.01) if not test and head.classifier_fillers else {}
    conv = b.conv(f"{prefix}_conv", head.bottom, 128, 3, stride=1 if test else head.train_stride, pad=1,
                  params=params, comment=f"multi-scale head on {head.bottom}", **conv_fillers)
    b.relu(f"relu_{prefix}_conv", conv)
    b.dropout(f"drop_{prefix}_conv", conv)
    fc = b.conv(f"{prefix}_fc", conv, 128, 1, stride=1 if head.fc_stride_stated else None, params=params,
                **fc_fillers)
    b.relu(f"relu_{prefix}_fc", fc)
    b.dropout(f"drop_{prefix}_fc", fc)
    return b.conv(f"{prefix}_ms", fc, net.options.num_labels, 1, params=params, **classifier_fillers)


def deeplab_msc_largefov(kind: str = "train", **options) -> NetBuilder:
    """DeepLab-MSc-LargeFOV: LargeFOV (frozen: lr_mult 0) plus five heads on the image and pool1…pool4,
    summed into `fc_fusion` (at (crop - 1) / 8 + 1 in training, at full resolution in the test net)."""
    net = _Net("DeepLab-MSc-LargeFOV", kind, _NetDefaults(train_batch_size=30, **_VGG_DEFAULTS), options)
    _data_layer(net, three_tops=False)
    head_scores: list[str] = []
    frozen = [] if net.test else lr_params(0, 0)
    pool5 = _vgg_trunk(net, frozen, lambda k, blob: head_scores.append(_msc_head(net, _MSC_HEADS[k])))
    fc8 = _largefov_head(net, pool5, frozen, frozen)
    if net.test:
        upsampled = [head_scores[0]]
        for head, scores in zip(_MSC_HEADS[1:], head_scores[1:]):
            upsampled.append(net.builder.interp(f"{head.bottom}_interp", scores, zoom_factor=8 // head.train_stride))
        upsampled.append(net.builder.interp("fc8_interp", fc8, zoom_factor=8))
        fusion = net.builder.eltwise("fc_fusion", upsampled, "SUM")
        _accuracy(net, fusion, "label")
        return net.builder
    fusion = net.builder.eltwise("fc_fusion", head_scores + [fc8], "SUM")
    label = _label_shrink(net)
    _loss(net, fusion, label)
    if net.regularizer:
        _regularized_loss(net, fusion, "fc_fusion_interp")
    _accuracy(net, fusion, label)
    return net.builder


_ASPP_DILATIONS = (6, 12, 18, 24)


def deeplab_vgg16(kind: str = "train", **options) -> NetBuilder:
    """DeepLab-v2 VGG16 ASPP-L: four fc6-fc7-fc8 branches on pool5 (dilations 6, 12, 18, 24), summed
    into `fc8_${EXP}` at (crop - 1) / 8 + 1."""
    net = _Net("DeepLab-v2 VGG16 (ASPP-L)", kind, _NetDefaults(train_batch_size=10, **_VGG_DEFAULTS), options)
    _data_layer(net, three_tops=True)
    params, classifier_params = _training_params(net)
    pool5 = _vgg_trunk(net, params)
    branches = [_fc_branch(net, pool5, dilation, f"_{k}", params, classifier_params, comment=f"dilation {dilation}")
                for k, dilation in enumerate(_ASPP_DILATIONS, 1)]
    scores = net.builder.eltwise(net.fc8, branches, "SUM", comment="sum of the four branches")
    if net.test:
        full = net.builder.interp("fc8_interp", scores, zoom_factor=8)
        _accuracy(net, full, "label")
        return net.builder
    label = _label_shrink(net)
    if net.regularizer:  # before the loss layer in the original
        _regularized_loss(net, scores, "fc8_interp")
    _loss(net, scores, label)
    _accuracy(net, scores, label)
    net.builder.add("silence", "Silence", ["data_dim"])
    return net.builder


# ---- ResNet-101 on three scales ---------------------------------------------------------------------

class _Stage(NamedTuple):
    number: int
    blocks: tuple  # block ids: "a", "b", … or "a", "b1", "b2", …
    width: int  # of the bottleneck; the output has 4× as many channels
    stride: int  # of the first block
    dilation: int


_RESNET101 = (
    _Stage(2, ("a", "b", "c"), 64, 1, 1),
    _Stage(3, ("a", "b1", "b2", "b3"), 128, 2, 1),
    _Stage(4, ("a",) + tuple(f"b{i}" for i in range(1, 23)), 256, 1, 2),
    _Stage(5, ("a", "b", "c"), 512, 1, 4),
)
_SCALES = (("", "data"), ("_res05", "data_res05"), ("_res075", "data_res075"))  # (suffix, input)


class _ResNetTrunk:
    """The convolutional trunk of one scale. Layer and blob names carry the scale's suffix; parameter
    names do not, so the three scales share every weight."""

    def __init__(self, net: _Net, suffix: str):
        self.builder, self.suffix = net.builder, suffix

    def conv_bn(self, name: str, bottom: str, num_output: int, kernel_size: int, stride: int, pad: int,
                norm: str, relu: str | None, dilation: int = 1) -> str:
        """Convolution (no bias) → BatchNorm (global statistics) → Scale (with bias), all frozen but
        the convolution, in place; then ReLU when `relu` names it."""
        b, s = self.builder, self.suffix
        x = b.conv(name + s, bottom, num_output, kernel_size, pad=pad, stride=stride,
                   dilation=dilation if dilation > 1 else None, bias_term=False,
                   params=[{"name": f"{name}_0", "lr_mult": 1, "decay_mult": 1}])
        b.add(f"bn{norm}{s}", "BatchNorm", [x], [x], batch_norm_param={"use_global_stats": True},
              param=[{"name": f"bn{norm}_{i}", "lr_mult": 0} for i in range(3)])
        b.add(f"scale{norm}{s}", "Scale", [x], [x], scale_param={"bias_term": True},
              param=[{"name": f"scale{norm}_{i}", "lr_mult": 0} for i in range(2)])
        if relu:
            b.relu(relu + s, x)
        return x

    def block(self, x: str, stage: _Stage, block: str) -> str:
        """A bottleneck: 1×1 → 3×3 (dilated) → 1×1, plus the input (projected by branch1 in the first
        block of a stage; its stride sits on the 1×1 convolutions, as in the original ResNet)."""
        unit, first = f"{stage.number}{block}", block == "a"
        stride = stage.stride if first else 1
        shortcut = x
        if first:
            shortcut = self.conv_bn(f"res{unit}_branch1", x, 4 * stage.width, 1, stride, 0, f"{unit}_branch1", None)
        a = self.conv_bn(f"res{unit}_branch2a", x, stage.width, 1, stride, 0, f"{unit}_branch2a",
                         f"res{unit}_branch2a_relu")
        b = self.conv_bn(f"res{unit}_branch2b", a, stage.width, 3, 1, stage.dilation, f"{unit}_branch2b",
                         f"res{unit}_branch2b_relu", dilation=stage.dilation)
        c = self.conv_bn(f"res{unit}_branch2c", b, 4 * stage.width, 1, 1, 0, f"{unit}_branch2c", None)
        out = self.builder.eltwise(f"res{unit}{self.suffix}", [shortcut, c])
        return self.builder.relu(f"res{unit}_relu{self.suffix}", out)

    def build(self, data: str) -> str:
        x = self.conv_bn("conv1", data, 64, 7, 2, 3, "_conv1", "conv1_relu")
        x = self.builder.pool(f"pool1{self.suffix}", x, "MAX", kernel_size=3, stride=2, pad=1)
        for stage in _RESNET101:
            for block in stage.blocks:
                x = self.block(x, stage, block)
        return x


def _aspp(net: _Net, res5c: str, suffix: str) -> str:
    """The ASPP classifier of one scale: four 3×3 convolutions (dilations 6…24) summed; parameters
    named per branch, hence shared by the scales."""
    name = f"fc1_{net.options.exp}"
    branches = []
    for k, dilation in enumerate(_ASPP_DILATIONS):
        params = [{"name": f"{name}_c{k}_w"}, {"name": f"{name}_c{k}_b"}]
        if not net.test:
            params = [{**p, **lr} for p, lr in zip(params, lr_params(10, 20))]
        branches.append(net.builder.conv(f"{name}{suffix}_c{k}", res5c, net.options.num_labels, 3, pad=dilation,
                                   dilation=dilation, params=params, **_classifier_fillers(net)))
    return net.builder.eltwise(f"{name}{suffix}", branches, "SUM")


def resnet101_msc(kind: str = "train", **options) -> NetBuilder:
    """DeepLab-v2 ResNet-101 on the image at scales 1, 0.75 and 0.5 (shared weights), fused by an
    elementwise MAX into `fc_fusion` at (crop - 1) / 8 + 1; training adds a loss per scale."""
    defaults = _NetDefaults(train_batch_size=1, bi_xy_std=80.0, bi_rgb_std=13.0, crop_multiple=32,
                            train_scale_factors=(0.5, 0.75, 1, 1.25, 1.5))
    net = _Net("DeepLab-v2 ResNet-101 (MSC)", kind, defaults, options)
    b = net.builder
    _data_layer(net, three_tops=False)
    b.interp("data_res05", "data", shrink_factor=2, pad_beg=0, pad_end=0, comment="the image at scales 0.5, 0.75")
    b.interp("data_res075", "data", shrink_factor=4, zoom_factor=3, pad_beg=0, pad_end=0)
    trunks = [_ResNetTrunk(net, suffix).build(data) for suffix, data in _SCALES]
    s1, s05, s075 = (_aspp(net, res5c, suffix) for res5c, (suffix, _) in zip(trunks, _SCALES))
    s05_up = b.interp(f"{s05}_interp", s05, zoom_factor=2, pad_beg=0, pad_end=0)
    s075_up = b.interp(f"{s075}_interp", s075, zoom_factor=4, shrink_factor=3, pad_beg=0, pad_end=0)
    fusion = b.eltwise("fc_fusion", [s1, s075_up, s05_up], "MAX")
    if net.test:
        full = b.interp("fc1_interp", fusion, zoom_factor=8)
        _accuracy(net, full, "label", top="fc1_accuracy")
        b.add("silence", "Silence", ["label", "data_dim"])
        return b
    label = _label_shrink(net)
    _loss(net, fusion, label)
    _accuracy(net, fusion, label)
    if net.regularizer:  # the Interp layer is named fc1_interp, its top fc8_interp, in the original
        _regularized_loss(net, fusion, "fc1_interp", interp_top="fc8_interp")
    for suffix, scores, shrunk in (("_res1", s1, label), ("_res075", s075_up, label)):
        _loss(net, scores, shrunk, name=f"loss{suffix}")
        _accuracy(net, scores, shrunk, name=f"accuracy{suffix}")
    label16 = _label_shrink(net, 16, "label_shrink16")
    _loss(net, s05, label16, name="loss_res05")
    _accuracy(net, s05, label16, name="accuracy_res05")
    return b


NETWORKS: dict[str, Callable[..., NetBuilder]] = {
    "deeplab_largeFOV": deeplab_largefov,
    "deeplab_msc_largeFOV": deeplab_msc_largefov,
    "deeplab_vgg16": deeplab_vgg16,
    "resnet-101": resnet101_msc,
}
