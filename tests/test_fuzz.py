"""Seeded fuzzing of the readers: mutated prototxt files (parsed, built into a Net and run forward) and
mutated .caffemodel / .solverstate bytes (read, copied into a net, restored into a solver). Only
RlossErrors may come out; anything else fails, naming the case so that it can be replayed:

    from tests.test_fuzz import text_case, model_case, make_snapshot
    name, data, mutations = text_case(123)
    _, model, state = make_snapshot(Path("/tmp/fuzz"))
    kind, data, mutations = model_case(45, model.read_bytes())   # state_case(i, state.read_bytes())

Deterministic for a given SEED; raise the *_CASES constants locally to fuzz longer. While fuzzing,
blobs are limited to FUZZ_MAX_BLOB_COUNT elements (rloss's size rule, lowered) so that a mutation
giving a huge but legal net is refused rather than run.
"""

from __future__ import annotations

import logging
import random
import re
import signal
import threading
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch
from google.protobuf import text_format

from rloss.errors import RlossError
from rloss.layers import layer_types
from rloss.net import Net
from rloss.proto import blob as blob_module
from rloss.proto import caffe_pb2
from rloss.proto.compat import is_repeated
from rloss.proto.text import expand_variables, read_text
from rloss.solver import Solver

SEED = 20240611
TEXT_CASES = 2000
MODEL_CASES = 3000
STATE_CASES = 2000
CASE_LIMIT_S = 10.0  # a case running longer counts as a hang
FUZZ_MAX_BLOB_COUNT = 2**16
REPO = Path(__file__).resolve().parents[1]

Mutation = Callable[[random.Random, bytes], "tuple[bytes, str]"]

# ---- the text corpus --------------------------------------------------------------------------------
VISION_NET = """name: "vision"
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } shape { dim: 2 dim: 1 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" param { lr_mult: 1 } param { lr_mult: 2 }
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 stride: 1 dilation: 1 group: 1
    weight_filler { type: "xavier" } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1"
  batch_norm_param { use_global_stats: true moving_average_fraction: 0.9 eps: 1e-5 } }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1"
  scale_param { bias_term: true filler { type: "uniform" min: 0.5 max: 1.5 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" relu_param { negative_slope: 0.1 } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" top: "mask1"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "pool2" type: "Pooling" bottom: "conv1" top: "pool2"
  pooling_param { pool: AVE kernel_h: 2 kernel_w: 3 stride_h: 2 stride_w: 2 } }
layer { name: "up" type: "Deconvolution" bottom: "pool1" top: "up" param { lr_mult: 0 }
  convolution_param { num_output: 4 group: 4 kernel_size: 4 stride: 2 pad: 1 bias_term: false
    weight_filler { type: "bilinear" } } }
layer { name: "crop" type: "Crop" bottom: "up" bottom: "conv1" top: "crop" crop_param { axis: 2 offset: 1 } }
layer { name: "sum" type: "Eltwise" bottom: "crop" bottom: "conv1" top: "sum"
  eltwise_param { operation: SUM coeff: 1 coeff: -0.5 } }
layer { name: "interp" type: "Interp" bottom: "pool2" top: "pool2_up" interp_param { height: 8 width: 8 } }
layer { name: "cat" type: "Concat" bottom: "sum" bottom: "pool2_up" top: "cat" concat_param { axis: 1 } }
layer { name: "slice" type: "Slice" bottom: "cat" top: "a" top: "b" slice_param { axis: 1 slice_point: 3 } }
layer { name: "score" type: "Convolution" bottom: "b" top: "score"
  convolution_param { num_output: 3 kernel_size: 1 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "fuse" type: "Eltwise" bottom: "score" bottom: "a" top: "fused" eltwise_param { operation: MAX } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fused" bottom: "label" top: "loss"
  loss_param { ignore_label: 255 normalization: VALID } }
layer { name: "acc" type: "Accuracy" bottom: "fused" bottom: "label" top: "acc" top: "per_class"
  accuracy_param { top_k: 2 ignore_label: 255 } }
layer { name: "seg" type: "SegAccuracy" bottom: "fused" bottom: "label" top: "seg"
  seg_accuracy_param { ignore_label: 255 } }
layer { name: "argmax" type: "ArgMax" bottom: "fused" top: "argmax" argmax_param { axis: 1 top_k: 1 } }
layer { name: "silence" type: "Silence" bottom: "mask1" bottom: "argmax" }
"""

FC_NET = """name: "fc"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 2 dim: 2 dim: 3 dim: 3 } shape { dim: 2 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 } } }
layer { name: "drop" type: "Dropout" bottom: "data" top: "drop" dropout_param { dropout_ratio: 0.3 } }
layer { name: "flat" type: "Flatten" bottom: "drop" top: "flat" flatten_param { axis: 1 end_axis: -1 } }
layer { name: "ip1" type: "InnerProduct" bottom: "flat" top: "ip1"
  inner_product_param { num_output: 6 weight_filler { type: "msra" variance_norm: AVERAGE } } }
layer { name: "bias" type: "Bias" bottom: "ip1" top: "ip1b"
  bias_param { axis: 1 num_axes: 1 filler { type: "gaussian" std: 0.1 } } }
layer { name: "reshape" type: "Reshape" bottom: "ip1b" top: "r" reshape_param { shape { dim: 0 dim: 2 dim: -1 } } }
layer { name: "soft" type: "Softmax" bottom: "r" top: "p" softmax_param { axis: -1 } }
layer { name: "ip2" type: "InnerProduct" bottom: "p" top: "ip2"
  inner_product_param { num_output: 3 axis: 1 transpose: true weight_filler { type: "positive_unitball" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" loss_weight: 2 }
"""

V1_NET = """name: "v1"
input: "data"
input_dim: 1 input_dim: 3 input_dim: 6 input_dim: 6
layers { name: "conv" type: CONVOLUTION bottom: "data" top: "conv" blobs_lr: 1 blobs_lr: 2
  weight_decay: 1 weight_decay: 0
  convolution_param { num_output: 2 kernel_size: 3 weight_filler { type: "gaussian" std: 0.01 } } }
layers { name: "relu" type: RELU bottom: "conv" top: "conv" }
layers { name: "pool" type: POOLING bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layers { name: "prob" type: SOFTMAX bottom: "pool" top: "prob" }
"""

SMALL_FCN_VALUES = {
    "NET_ID": "small_fcn", "DATA_ROOT": "/absent/", "LIST_DIR": "/absent", "TRAIN_SET": "train",
    "TEST_SET": "val", "BATCH_SIZE": "1", "CROP_SIZE": "9", "TEST_CROP_SIZE": "9", "NUM_LABELS": "3",
    "EXP": "fuzz", "BI_RGB_STD": "15", "BI_XY_STD": "10", "DENSECRF_LOSS_WEIGHT": "1e-3", "DENSECRF_SCALE": "1",
}


def text_corpus() -> list[tuple[str, int, bytes]]:
    """(name, phase, text) of the valid nets the text cases mutate."""
    corpus = [("vision", caffe_pb2.TRAIN, VISION_NET), ("fc", caffe_pb2.TRAIN, FC_NET),
              ("v1", caffe_pb2.TEST, V1_NET)]
    for name, phase in (("train", caffe_pb2.TRAIN), ("test", caffe_pb2.TEST),
                        ("trainwithdensecrfloss", caffe_pb2.TRAIN)):
        path = REPO / "prototxt" / "small_fcn" / f"{name}.prototxt"
        corpus.append((f"small_fcn/{name}", phase, expand_variables(read_text(path), path, SMALL_FCN_VALUES)))
    return [(name, phase, text.encode()) for name, phase, text in corpus]


# ---- mutations ----------------------------------------------------------------------------------------
EXTREMES = (b"0", b"-1", b"1", b"2", b"1e9", b"2147483647", b"2147483648", b"4294967296", b"-2147483649",
            b"9223372036854775808", b"nan", b"inf", b"-inf", b"1e-30", b"1e30", b"0.5", b"65536", b"100000")
_NUMBER = re.compile(rb"-?\d+(?:\.\d+)?(?:e-?\d+)?")
_TOKEN = re.compile(rb'"[^"\n]*"|[A-Za-z_]\w*|[{}:]')
_TYPE = re.compile(rb'\btype:\s*"[^"]*"')


def _span(rng: random.Random, data: bytes, longest: int = 40) -> tuple[int, int]:
    start = rng.randrange(len(data) + 1)
    return start, min(len(data), start + rng.randint(1, longest))


def flip_byte(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    if not data:
        return data, "flip: empty"
    at, value = rng.randrange(len(data)), rng.choice((0, 0xFF, 0x80, rng.randrange(256)))
    return data[:at] + bytes([value]) + data[at + 1:], f"byte {at} := {value:#x}"


def flip_bit(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    if not data:
        return data, "bit: empty"
    at, bit = rng.randrange(len(data)), rng.randrange(8)
    return data[:at] + bytes([data[at] ^ (1 << bit)]) + data[at + 1:], f"byte {at} ^= {1 << bit:#x}"


def delete_span(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    start, end = _span(rng, data)
    return data[:start] + data[end:], f"delete [{start}:{end}]"


def duplicate_span(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    start, end = _span(rng, data, 200)
    at = rng.randrange(len(data) + 1)
    return data[:at] + data[start:end] + data[at:], f"insert [{start}:{end}] at {at}"


def truncate(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    at = rng.randrange(len(data) + 1)
    return data[:at], f"truncate at {at}"


def swap_number(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    numbers = list(_NUMBER.finditer(data))
    if not numbers:
        return data, "number: none"
    match, value = rng.choice(numbers), rng.choice(EXTREMES)
    return data[:match.start()] + value + data[match.end():], f"number at {match.start()} := {value.decode()}"


def swap_tokens(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    tokens = list(_TOKEN.finditer(data))
    if len(tokens) < 2:
        return data, "tokens: too few"
    first, second = sorted(rng.sample(tokens, 2), key=lambda m: m.start())
    if first.end() > second.start():
        return data, "tokens: overlap"
    swapped = (data[:first.start()] + second.group() + data[first.end():second.start()] + first.group()
               + data[second.end():])
    return swapped, f"swap tokens at {first.start()} and {second.start()}"


def replace_token(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    tokens = list(_TOKEN.finditer(data))
    if not tokens:
        return data, "token: none"
    target, source = rng.choice(tokens), rng.choice(tokens).group()
    return data[:target.start()] + source + data[target.end():], f"token at {target.start()} := {source!r}"


def swap_type(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    types = list(_TYPE.finditer(data))
    if not types:
        return data, "type: none"
    match, kind = rng.choice(types), rng.choice(layer_types())
    return data[:match.start()] + f'type: "{kind}"'.encode() + data[match.end():], f"type at {match.start()} := {kind}"


FIELD_VALUES = {
    "int": (0, 1, 2, 3, -1, 7, 2**16, 2**31 - 1, -(2**31), 2**31, 2**32 - 1, 2**62),
    "float": (0.0, -1.0, 0.5, 2.0, 1e-30, 1e30, float("nan"), float("inf"), -float("inf")),
    "bool": (True, False),
    "str": ("", "x", "data", "label", "gaussian", "xavier", "msra", "constant", "bilinear", "uniform"),
}


def _field_value(rng: random.Random, field):
    """A random value of the field's type (an enum: any of its values)."""
    if field.enum_type is not None:
        return rng.choice(field.enum_type.values).number
    kind = {field.TYPE_BOOL: "bool", field.TYPE_STRING: "str", field.TYPE_FLOAT: "float",
            field.TYPE_DOUBLE: "float"}.get(field.type, "int")
    return rng.choice(FIELD_VALUES[kind])


def _random_field(rng: random.Random, message) -> tuple[object, object, list[str]]:
    """A random scalar field below `message` (preferring the sub-messages it sets): (owner, field, path)."""
    path = []
    while True:
        fields = message.DESCRIPTOR.fields
        present = [f for f, _ in message.ListFields() if f.type == f.TYPE_MESSAGE]
        field = rng.choice(present) if present and rng.random() < 0.6 else rng.choice(fields)
        path.append(field.name)
        if field.type != field.TYPE_MESSAGE:
            return message, field, path
        value = getattr(message, field.name)
        if is_repeated(field):
            message = rng.choice(value) if len(value) and rng.random() < 0.7 else value.add()
        else:
            message = value


def set_field(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """Schema-aware: one field of one layer (or of a message inside it) set to an extreme value."""
    try:
        net = text_format.Parse(data.decode(), caffe_pb2.NetParameter())
    except (text_format.ParseError, UnicodeDecodeError):
        return data, "field: unparsable"
    layers = list(net.layer) or list(net.layers)
    if not layers:
        return data, "field: no layer"
    owner, field, path = _random_field(rng, rng.choice(layers))
    value = _field_value(rng, field)
    try:
        if is_repeated(field):
            getattr(owner, field.name).append(value)
        else:
            setattr(owner, field.name, value)
    except (ValueError, TypeError):  # out of the field's range
        return data, f"field {'.'.join(path)}: {value} out of range"
    return text_format.MessageToString(net).encode(), f"field {'.'.join(path)} := {value}"


# Weighted towards mutations that often leave the text parseable, so that many cases reach a forward pass.
TEXT_MUTATIONS: tuple[Mutation, ...] = (flip_byte, delete_span, duplicate_span, swap_tokens, *[swap_number] * 3,
                                        *[replace_token] * 2, *[swap_type] * 2, *[set_field] * 4)


def _varint(data: bytes, at: int) -> tuple[int, int] | None:
    """(value, length) of the varint at `at`, or None when there is none."""
    value = 0
    for length in range(10):
        if at + length >= len(data):
            return None
        value |= (data[at + length] & 0x7F) << (7 * length)
        if data[at + length] < 0x80:
            return value, length + 1
    return None


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def wire_fields(data: bytes, start: int = 0, end: int | None = None, depth: int = 0) -> list | None:
    """(kind, offset, size) of each varint value ("varint") and length prefix ("length") of the protobuf
    message in data[start:end], nested messages included; None when it is not a message."""
    end = len(data) if end is None else end
    found, at = [], start
    while at < end:
        tag = _varint(data, at)
        if tag is None or tag[0] >> 3 == 0:
            return None
        at += tag[1]
        wire_type = tag[0] & 7
        if wire_type in (0, 2):
            value = _varint(data, at)
            if value is None:
                return None
            found.append(("varint" if wire_type == 0 else "length", at, value[1]))
            at += value[1] + (value[0] if wire_type == 2 else 0)
            if wire_type == 2 and at <= end and depth < 8:
                found += wire_fields(data, at - value[0], at, depth + 1) or []
        elif wire_type in (1, 5):
            at += 8 if wire_type == 1 else 4
        else:
            return None
    return found if at == end else None


def corrupt_field(kind: str) -> Mutation:
    """A mutation that rewrites one varint value or length prefix with an extreme value."""

    def mutate(rng: random.Random, data: bytes) -> tuple[bytes, str]:
        fields = [f for f in wire_fields(data) or [] if f[0] == kind]
        if not fields:
            return data, f"{kind}: none"
        _, at, size = rng.choice(fields)
        value = rng.choice((0, 1, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**64 - 1, len(data), rng.randrange(2**20)))
        if kind == "length":
            value = rng.choice((value, _varint(data, at)[0] + rng.choice((-1, 1))))
        encoded = _encode_varint(max(0, value))
        return data[:at] + encoded + data[at + size:], f"{kind} at {at} := {value}"

    return mutate


SHAPES = ([2**32, 2**32], [2**62, 4], [-1, 2], [1] * 33, [0], [], [3, 0, 2], [2**31], [1] * 32, [7])


def corrupt_shape(message_type) -> Mutation:
    """A mutation that gives one blob of the (valid) message an extreme shape, data kept."""

    def mutate(rng: random.Random, data: bytes) -> tuple[bytes, str]:
        message = message_type.FromString(data)
        layers = getattr(message, "layer", [])
        blobs = [b for layer in layers for b in layer.blobs] + list(getattr(message, "history", []))
        index, shape = rng.randrange(len(blobs)), rng.choice(SHAPES)
        blob = blobs[index]
        if rng.random() < 0.3:
            legacy = [max(-(2**31), min(2**31 - 1, d)) for d in shape + [1, 1, 1, 1]]  # int32 fields
            blob.num, blob.channels, blob.height, blob.width = legacy[:4]
        else:
            del blob.shape.dim[:]
            blob.shape.dim.extend(shape)
        return message.SerializeToString(), f"blob {index} shape := {shape}"

    return mutate


BINARY_MUTATIONS: tuple[Mutation, ...] = (flip_bit, flip_byte, truncate, delete_span, duplicate_span,
                                          corrupt_field("varint"), corrupt_field("length"))


def mutated(rng: random.Random, data: bytes, mutations: tuple[Mutation, ...],
            counts: tuple[int, ...] = (1, 2, 3)) -> tuple[bytes, list[str]]:
    """`data` after a number (drawn from `counts`) of mutations drawn from `mutations`, and their descriptions."""
    done = []
    for _ in range(rng.choice(counts)):
        data, description = rng.choice(mutations)(rng, data)
        done.append(description)
    return data, done


# ---- cases --------------------------------------------------------------------------------------------
def case_rng(kind: str, index: int) -> random.Random:
    return random.Random(f"{SEED}/{kind}/{index}")


def text_case(index: int) -> tuple[str, bytes, list[str]]:
    """(corpus name, mutated text, mutations) of text case `index`."""
    rng = case_rng("text", index)
    name, _, text = rng.choice(TEXT_CORPUS)
    data, done = mutated(rng, text, TEXT_MUTATIONS, (1, 1, 1, 2))
    return name, data, done


def _binary_case(kind: str, index: int, base: bytes, message_type) -> tuple[str, bytes, list[str]]:
    rng = case_rng(kind, index)
    if rng.random() < 0.15:
        data, description = corrupt_shape(message_type)(rng, base)
        return kind, data, [description]
    data, done = mutated(rng, base, BINARY_MUTATIONS)
    return kind, data, done


TEXT_CORPUS = text_corpus()
PHASES = {name: phase for name, phase, _ in TEXT_CORPUS}


class CaseTimeout(BaseException):
    """A case ran past CASE_LIMIT_S (a hang)."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise CaseTimeout in the block after `seconds` (POSIX main thread; no limit elsewhere)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise CaseTimeout(f"ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def fuzzing(monkeypatch):
    """Small blobs only, quiet logs."""
    monkeypatch.setattr(blob_module, "MAX_BLOB_COUNT", FUZZ_MAX_BLOB_COUNT)
    logger = logging.getLogger("rloss")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


def run_cases(kind: str, count: int, make: Callable[[int], tuple], run: Callable[[bytes, int, str], str]) -> dict:
    """Run `count` cases; fail on the first exception that is not an RlossError. Returns outcome counts."""
    outcomes: dict[str, int] = {}
    for index in range(count):
        name, data, done = make(index)
        torch.manual_seed(SEED + index)
        try:
            with time_limit(CASE_LIMIT_S):
                outcome = run(data, index, name)
        except RlossError as error:
            outcome = type(error).__name__
        except (Exception, CaseTimeout) as error:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{kind} case {index} (SEED {SEED}, corpus {name}, mutations {done}): "
                        f"{type(error).__name__}: {str(error)[:500]}\n{traceback.format_exc()[-3000:]}"
                        f"replay: tests.test_fuzz.{kind}_case({index}{'' if kind == 'text' else ', base'})",
                        pytrace=False)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return outcomes


def random_feeds(net: Net, index: int) -> dict[str, torch.Tensor]:
    """Small random values for each input: labels in 0..2 (some 255), images around 0, data_dim = H, W."""
    generator = torch.Generator().manual_seed(SEED + index)
    feeds = {}
    for name in net.feedable:
        shape = net.blob_shapes[name]
        if "label" in name:
            value = torch.randint(0, 3, shape, generator=generator).float()
            value[torch.rand(shape, generator=generator) < 0.1] = 255
        elif name == "data_dim":
            value = torch.full(shape, float(net.blob_shapes.get("data", (1, 1, 9, 9))[-1]))
        else:
            value = torch.randn(shape, generator=generator) * 50
        feeds[name] = value
    return feeds


# ---- tests ----------------------------------------------------------------------------------------------
def build_and_run(path: Path, data: bytes, index: int, name: str) -> str:
    """Write the net text to `path`, build it for its corpus entry's phase and run a forward pass."""
    path.write_bytes(data)
    net = Net.from_prototxt(path, PHASES[name], feed_data_layers=True)
    net.forward(random_feeds(net, index))
    return "forward"


def test_corpus_nets_run(fuzzing, tmp_path):
    """Every unmutated corpus net builds and runs (else the text cases would test only error paths)."""
    for index, (name, _, text) in enumerate(TEXT_CORPUS):
        assert build_and_run(tmp_path / "net.prototxt", text, index, name) == "forward"


def test_fuzz_prototxt(fuzzing, tmp_path):
    path = tmp_path / "fuzz.prototxt"
    outcomes = run_cases("text", TEXT_CASES, text_case, lambda *case: build_and_run(path, *case))
    assert outcomes.get("forward", 0) > TEXT_CASES // 10, outcomes  # the mutations leave many nets runnable


def make_snapshot(directory: Path) -> tuple[Solver, Path, Path]:
    """A solver on the vision net after one iteration, and its snapshot (model, state) as rloss writes
    them (the bases of the binary cases: `model_case(i, model.read_bytes())` replays case i). The state
    names its model without the directory (found beside it), so that its bytes do not depend on where
    the test runs."""
    param = caffe_pb2.SolverParameter(base_lr=0.01, lr_policy="fixed", momentum=0.9, max_iter=1, random_seed=SEED,
                                      snapshot_prefix=str(directory / "snap"), display=0)
    param.net_param.CopyFrom(text_format.Parse(VISION_NET, caffe_pb2.NetParameter()))
    solver = Solver(param)
    solver.step(1)
    solver.snapshot()
    model, state = directory / "snap_iter_1.caffemodel", directory / "snap_iter_1.solverstate"
    written = caffe_pb2.SolverState.FromString(state.read_bytes())
    written.learned_net = model.name
    state.write_bytes(written.SerializeToString())
    return solver, model, state


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> tuple[Solver, Path, Path]:
    return make_snapshot(tmp_path_factory.mktemp("snapshot"))


def model_case(index: int, base: bytes) -> tuple[str, bytes, list[str]]:
    """(kind, mutated model bytes, mutations) of model case `index` (base: the snapshot's model)."""
    return _binary_case("model", index, base, caffe_pb2.NetParameter)


def state_case(index: int, base: bytes) -> tuple[str, bytes, list[str]]:
    """(kind, mutated solver-state bytes, mutations) of state case `index` (base: the snapshot's state)."""
    return _binary_case("state", index, base, caffe_pb2.SolverState)


def test_fuzz_caffemodel(fuzzing, snapshot, tmp_path):
    solver, model, _ = snapshot
    base, path = model.read_bytes(), tmp_path / "fuzz.caffemodel"

    def run(data: bytes, index: int, name: str) -> str:
        path.write_bytes(data)
        solver.net.copy_from(path)
        return "copied"

    outcomes = run_cases("model", MODEL_CASES, lambda i: model_case(i, base), run)
    assert outcomes.get("WeightsError", 0) > MODEL_CASES // 4 and outcomes.get("copied", 0), outcomes


def test_fuzz_solverstate(fuzzing, snapshot):
    solver, _, state = snapshot
    base, path = state.read_bytes(), state.parent / "fuzz.solverstate"  # beside the model it names

    def run(data: bytes, index: int, name: str) -> str:
        path.write_bytes(data)
        solver.restore(path)
        return "restored"

    outcomes = run_cases("state", STATE_CASES, lambda i: state_case(i, base), run)
    assert outcomes.get("WeightsError", 0) > STATE_CASES // 4 and outcomes.get("restored", 0), outcomes


def test_a_foreign_exception_fails_naming_the_case():
    """What the fuzz tests rely on: an exception that is not an RlossError fails with the case to replay."""

    def run(data: bytes, index: int, name: str) -> str:
        if index == 2:
            raise ValueError("raw")
        return "ok"

    with pytest.raises(pytest.fail.Exception) as caught:
        run_cases("text", 5, text_case, run)
    message = str(caught.value)
    assert f"text case 2 (SEED {SEED}, corpus {text_case(2)[0]}, mutations {text_case(2)[2]})" in message
    assert "ValueError: raw" in message and "replay: tests.test_fuzz.text_case(2)" in message
    assert text_case(2) == text_case(2)  # deterministic
