"""Seeded fuzzing of the readers: mutated prototxt files (parsed, built into a Net and run forward) and
mutated .caffemodel / .solverstate bytes (read, copied into a net, restored into a solver). Only
RlossErrors may come out; anything else fails, naming the case so that it can be replayed:

    from tests.test_fuzz import text_case, model_case, make_snapshot
    name, data, mutations = text_case(123)
    _, model, state = make_snapshot(Path("/tmp/fuzz"))
    kind, data, mutations = model_case(45, model.read_bytes())   # state_case(i, state.read_bytes())

The HDF5 cases mutate the snapshot that `make_snapshot(folder, hdf5=True)` writes, with h5py, then
some of them at the byte level; their data is None for a directory (`place` writes a case's file):

    kind, data, mutations = h5_model_case(45, model.read_bytes())   # h5_state_case(i, state.read_bytes())

Deterministic for a given SEED; raise the *_CASES constants locally to fuzz longer. While fuzzing,
blobs are limited to FUZZ_MAX_BLOB_COUNT elements (rloss's size rule, lowered) so that a mutation
giving a huge but legal net is refused rather than run.
"""

from __future__ import annotations

import io
import logging
import random
import re
import signal
import threading
import traceback
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from rloss.errors import MAX_MESSAGE_CHARS, NetError, RlossError, WeightsError
from rloss.io import read_solver_state, write_hdf5_state
from rloss.layers import layer_types
from rloss.net import Net
from rloss.proto import blob as blob_module
from rloss.proto import caffe_pb2
from rloss.proto.compat import is_repeated
from rloss.proto.text import expand_variables, read_text
from rloss.solver import Solver

try:
    import h5py
except ImportError:  # optional (rloss needs it for HDF5 snapshots only): the HDF5 cases are skipped
    h5py = None

SEED = 20240611
TEXT_CASES = 2000
MODEL_CASES = 3000
STATE_CASES = 2000
H5_MODEL_CASES = 1200
H5_STATE_CASES = 800
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


def place(path: Path, data: bytes | None) -> Path:
    """`data` written at `path` as a new file (rewriting a file in place takes milliseconds where the
    file system discards freed blocks), or (None for data) a directory named like it, beside it."""
    if data is None:
        directory = path.with_name("directory_" + path.name)
        directory.mkdir(exist_ok=True)
        return directory
    path.unlink(missing_ok=True)
    path.write_bytes(data)
    return path


def seed_case(index: int) -> None:
    """torch's generators for case `index`; the CPU one directly, as torch.manual_seed queues a CUDA
    seeding (with its stack) whenever CUDA is not initialized: a millisecond a case."""
    torch.random.default_generator.manual_seed(SEED + index)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(SEED + index)


def run_cases(kind: str, count: int, make: Callable[[int], tuple], run: Callable[[bytes, int, str], str]) -> dict:
    """Run `count` cases; fail on the first exception that is not an RlossError. Returns outcome counts."""
    outcomes: dict[str, int] = {}
    for index in range(count):
        name, data, done = make(index)
        seed_case(index)
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
    net = Net.from_prototxt(place(path, data), PHASES[name], feed_data_layers=True)
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


def make_snapshot(directory: Path, hdf5: bool = False) -> tuple[Solver, Path, Path]:
    """A solver on the vision net after one iteration, and its snapshot (model, state) as rloss writes
    them, binary or (`hdf5`) with snapshot_format: HDF5 (the bases of the binary and HDF5 cases:
    `model_case(i, model.read_bytes())` replays case i). The state names its model without the
    directory (found beside it), so that its bytes do not depend on where the test runs."""
    param = caffe_pb2.SolverParameter(base_lr=0.01, lr_policy="fixed", momentum=0.9, max_iter=1, random_seed=SEED,
                                      snapshot_prefix=str(directory / "snap"), display=0)
    if hdf5:
        param.snapshot_format = caffe_pb2.SolverParameter.HDF5
    param.net_param.CopyFrom(text_format.Parse(VISION_NET, caffe_pb2.NetParameter()))
    solver = Solver(param)
    solver.step(1)
    solver.snapshot()
    suffix = ".h5" if hdf5 else ""
    model, state = directory / f"snap_iter_1.caffemodel{suffix}", directory / f"snap_iter_1.solverstate{suffix}"
    written = read_solver_state(state)
    written.learned_net = model.name
    if hdf5:
        write_hdf5_state(written, state)
    else:
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
        solver.net.copy_from(place(path, data))
        return "copied"

    outcomes = run_cases("model", MODEL_CASES, lambda i: model_case(i, base), run)
    assert outcomes.get("WeightsError", 0) > MODEL_CASES // 4 and outcomes.get("copied", 0), outcomes


def test_fuzz_solverstate(fuzzing, snapshot):
    solver, _, state = snapshot
    base, path = state.read_bytes(), state.parent / "fuzz.solverstate"  # beside the model it names

    def run(data: bytes, index: int, name: str) -> str:
        solver.restore(place(path, data))
        return "restored"

    outcomes = run_cases("state", STATE_CASES, lambda i: state_case(i, base), run)
    assert outcomes.get("WeightsError", 0) > STATE_CASES // 4 and outcomes.get("restored", 0), outcomes


# ---- HDF5 cases: mutations of the snapshot's HDF5 structure (h5py), then of its bytes ---------------------
H5Mutation = Callable[[random.Random, "h5py.File"], str]
H5_NAMES = ("x", "", "-1", "01", " 0", "+1", "1_0", "\u0661", "0.5", "7", "2147483648", "99999999999999999999",
            "\u00e9", "conv1", "data", "history", "iter", "learned_net")
H5_SHAPES = ((), (0,), (1,), (3, 0, 2), (2,) * 17, (1,) * 32, (2**24, 2**24), (2**40,), (7,))
H5_FLOATS = (np.nan, np.inf, -np.inf, 1e300, -1e300, 3.4e38, 1e-45, -0.0)
H5_INTS = (-1, 0, 2**31, -(2**31) - 1, 2**63 - 1, -(2**63), 300)
H5_TEXTS = (b"", b"\xff\xfe", b"a\x00b", b"/", b".", b"../" * 40, b"x" * 5000, b"absent.caffemodel.h5",
            b"snap_iter_1.solverstate.h5", b"snap_iter_1.caffemodel")


def h5_entries(handle, kind: str = "any") -> list[str]:
    """Paths of the groups ("group"), datasets ("dataset") or both below the root, in name order; those
    a mutation gave a name that is not UTF-8 are left alone (h5py's low-level visit: the fast one)."""
    wanted = {"group": (h5py.h5o.TYPE_GROUP,), "dataset": (h5py.h5o.TYPE_DATASET,),
              "any": (h5py.h5o.TYPE_GROUP, h5py.h5o.TYPE_DATASET)}[kind]
    found = []

    def visit(name: bytes, info) -> None:
        with suppress(UnicodeDecodeError):
            if info.type in wanted and name != b".":
                found.append(name.decode())

    h5py.h5o.visit(handle.id, visit, info=True)
    return found


def _parent(path: str) -> str:
    return path.rpartition("/")[0] or "/"


def _values(dataset) -> np.ndarray:
    """The dataset's values as an array (an empty float one for an HDF5 null dataspace or a huge shape)."""
    if dataset.shape is None or dataset.size > 2**20:
        return np.zeros(0, np.float32)
    return np.asarray(dataset[()])


def _replace(handle, path: str, **dataset) -> None:
    del handle[path]
    handle.create_dataset(path, **dataset)


def _taken(group, name) -> bool:
    """Whether `group` has a link of that name (dangling links included, which `in` does not see)."""
    return group.id.links.exists(name.encode() if isinstance(name, str) else name)


def on_dataset(mutate: Callable[[random.Random, object, str], str]) -> H5Mutation:
    """A mutation of one random dataset (none when the file has none left)."""

    def pick(rng: random.Random, handle) -> str:
        datasets = h5_entries(handle, "dataset")
        return mutate(rng, handle, rng.choice(datasets)) if datasets else f"{mutate.__name__}: no dataset"

    return pick


def delete_entry(rng: random.Random, handle) -> str:
    path = rng.choice(h5_entries(handle))
    del handle[path]
    return f"delete {path}"


def clear_group(rng: random.Random, handle) -> str:
    path = rng.choice(h5_entries(handle, "group") or ["/"])
    for name in list(handle[path]):
        del handle[path][name]
    return f"empty group {path}"


def rename_entry(rng: random.Random, handle) -> str:
    """Move an entry to an odd or misleading name, in its group or another one."""
    path = rng.choice(h5_entries(handle))
    parent = rng.choice([_parent(path)] * 3 + h5_entries(handle, "group") + ["/"])
    name = rng.choice(H5_NAMES + (b"\xff\xfe",)) or "_"  # bytes: a name that is not UTF-8
    group = handle[parent]
    if _taken(group, name) or f"/{parent.strip('/')}/".startswith(f"/{path}/"):  # not into itself
        return f"rename {path}: {name!r} taken, or inside it"
    group.move(f"/{path}", name)
    return f"rename {path} -> {parent}/{name!r}"


@on_dataset
def reshape_dataset(rng: random.Random, handle, path: str) -> str:
    """Same dtype, another shape: its values repeated to fill it, or (a huge shape) only declared."""
    dtype, values = handle[path].dtype, _values(handle[path])
    other = handle[rng.choice(h5_entries(handle, "dataset"))].shape or ()
    shape = rng.choice(H5_SHAPES + (values.shape[::-1], (1, *values.shape), (values.size,), other))
    if np.prod(shape, dtype=np.float64) > 2**20:
        _replace(handle, path, shape=shape, dtype=dtype, chunks=True)
    else:
        _replace(handle, path, data=np.resize(values, shape) if values.size else np.zeros(shape, values.dtype),
                 dtype=dtype)
    return f"reshape {path} -> {shape}"


def _retyped(rng: random.Random, values: np.ndarray) -> tuple[object, object, str]:
    """(values, HDF5 type or None for the values' own, kind) of `values` as another type."""
    kind = rng.choice(("int32", "int64", "uint8", "float64", "float16", "bool", "bytes", "str", "complex64",
                       "compound", "enum", "opaque", "empty", "reference"))
    numbers = values.astype(np.float64) if values.dtype.kind in "biuf" else np.zeros(values.shape)
    if kind in ("int32", "int64", "uint8", "float64", "float16", "bool", "complex64"):
        with np.errstate(invalid="ignore", over="ignore"):
            return numbers.astype(kind), None, kind
    if kind in ("bytes", "str"):
        text = np.vectorize(lambda v: f"{v:.3g}")(numbers) if numbers.size else np.array("0")
        return (text.astype("S"), None, kind) if kind == "bytes" else (text.astype(object), h5py.string_dtype(), kind)
    if kind == "compound":
        return np.zeros(numbers.shape, [("a", "f4"), ("b", "i4")]), None, kind
    if kind == "enum":
        enum = h5py.enum_dtype({"a": 0, "b": 1}, basetype="i1")
        return np.zeros(numbers.shape, enum), enum, kind
    if kind == "opaque":
        return np.zeros(numbers.shape, "V4"), None, kind
    if kind == "empty":
        return h5py.Empty("f4"), None, kind
    return None, h5py.ref_dtype, kind  # a reference: its values are made where the file is at hand


@on_dataset
def retype_dataset(rng: random.Random, handle, path: str) -> str:
    """The dataset's values as another HDF5 type: integers, float64, strings, bool, types Caffe refuses."""
    values, dtype, kind = _retyped(rng, _values(handle[path]))
    if kind == "reference":
        values = np.array([handle.ref] * 2, dtype)
    _replace(handle, path, data=values, dtype=dtype)
    return f"retype {path} -> {kind}"


def _text(rng: random.Random, value: bytes) -> object:
    """`value` as rloss writes learned_net (a variable-length string), or as fixed-length strings (the
    only kind that can hold a NUL)."""
    if b"\x00" not in value and rng.random() < 0.5:
        return value
    return np.array([value] * rng.choice((1, 2)))


@on_dataset
def revalue_dataset(rng: random.Random, handle, path: str) -> str:
    """Extreme values (nan, inf, huge, out-of-range integers, odd text) in some or all of the dataset."""
    values = _values(handle[path])
    if values.dtype.kind in "OSU" or rng.random() < 0.1:
        value = rng.choice(H5_TEXTS)
        _replace(handle, path, data=_text(rng, value))
        return f"revalue {path} := {value[:20]!r}"
    choices = H5_FLOATS if values.dtype.kind == "f" and rng.random() < 0.8 else H5_INTS
    value = rng.choice(choices)
    dtype = np.float64 if choices is H5_FLOATS else (np.uint64 if value >= 2**63 else np.int64)
    with np.errstate(invalid="ignore", over="ignore"):
        changed = values.astype(dtype) if values.dtype.kind in "biuf" else np.zeros(values.shape, dtype)
    if changed.ndim and changed.size and rng.random() < 0.5:
        changed.reshape(-1)[rng.randrange(changed.size)] = value
        where = "one value of "
    else:
        changed[...] = value
        where = ""
    _replace(handle, path, data=changed)
    return f"revalue {where}{path} := {value}"


def add_attribute(rng: random.Random, handle) -> str:
    path = rng.choice(h5_entries(handle) + ["/"])
    name, value = rng.choice(("CLASS", "shape", "0", "dtype")), rng.choice((np.nan, "x", np.arange(3), b"\xff"))
    handle[path].attrs[name] = value
    return f"attribute {path}@{name} := {value!r}"


def add_entry(rng: random.Random, handle) -> str:
    """A group, dataset or link where none was expected (replacing an entry of that name)."""
    parent = rng.choice(h5_entries(handle, "group") + ["/"])
    name = rng.choice(H5_NAMES[:12] + ("0", "1", "2", "3", "10"))
    if name == "":
        return "add: empty name"
    path = f"{parent.rstrip('/')}/{name}"
    if _taken(handle[parent], name):
        del handle[parent][name]
    kind = rng.choice(("group", "nested", "dataset", "scalar", "text", "dangling", "to root", "external",
                       "loop", "alias"))
    if kind == "group":
        handle.create_group(path)
    elif kind == "nested":
        handle.create_dataset(f"{path}/0", data=np.ones((2, 2), np.float32))
    elif kind == "dataset":
        handle.create_dataset(path, data=np.full(rng.choice(H5_SHAPES[:6]), 0.5, np.float32))
    elif kind == "scalar":
        handle.create_dataset(path, data=np.float64(rng.choice(H5_FLOATS)))
    elif kind == "text":
        handle.create_dataset(path, data=_text(rng, rng.choice(H5_TEXTS)))
    elif kind == "dangling":
        handle[path] = h5py.SoftLink("/nowhere")
    elif kind == "to root":
        handle[path] = h5py.SoftLink("/")
    elif kind == "external":
        handle[path] = h5py.ExternalLink(rng.choice(("absent.h5", "snap_iter_1.caffemodel.h5")), "/data")
    elif kind == "loop":
        handle[path] = handle[parent]
    else:
        handle[path] = handle[rng.choice(h5_entries(handle, "dataset") or [parent])]
    return f"add {kind} {path}"


H5_MUTATIONS: tuple[H5Mutation, ...] = (delete_entry, clear_group, *[rename_entry] * 2, *[reshape_dataset] * 3,
                                        *[retype_dataset] * 3, *[revalue_dataset] * 3, add_attribute,
                                        *[add_entry] * 2)


def random_tail(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """The HDF5 signature (and a little more) kept, random bytes after it."""
    keep = rng.choice((8, 8, 16, 64, rng.randrange(len(data) + 1)))
    tail = bytes(rng.randrange(256) for _ in range(rng.choice((0, 1, 100, 2048))))
    return data[:keep] + tail, f"random {len(tail)} bytes after byte {keep}"


H5_BYTE_MUTATIONS: tuple[Mutation, ...] = (truncate, truncate, random_tail)


def h5_mutated(rng: random.Random, data: bytes) -> tuple[bytes, list[str]]:
    """The HDF5 file `data` after 1 to 3 structural mutations (done with h5py, in memory)."""
    buffer = io.BytesIO(data)
    done = []
    with h5py.File(buffer, "r+") as handle:
        for _ in range(rng.choice((1, 1, 2, 3))):
            done.append(rng.choice(H5_MUTATIONS)(rng, handle) if h5_entries(handle) else "nothing left")
    return buffer.getvalue(), done


def _h5_case(kind: str, index: int, base: bytes) -> tuple[str, bytes | None, list[str]]:
    """Mostly structural mutations, some followed by byte ones; a few empty files and directories
    (data None)."""
    rng = case_rng(kind, index)
    draw = rng.random()
    if draw < 0.04:
        return kind, None, ["a directory"]
    if draw < 0.07:
        return kind, b"", ["an empty file"]
    data, done = (h5_mutated(rng, base) if draw < 0.9 else (base, []))
    if draw >= 0.75:
        data, more = mutated(rng, data, H5_BYTE_MUTATIONS, (1,))
        done += more
    return kind, data, done


def h5_model_case(index: int, base: bytes) -> tuple[str, bytes | None, list[str]]:
    """(kind, mutated HDF5 model bytes or None for a directory, mutations) of HDF5 model case `index`."""
    return _h5_case("h5_model", index, base)


def h5_state_case(index: int, base: bytes) -> tuple[str, bytes | None, list[str]]:
    """(kind, mutated HDF5 solver-state bytes or None for a directory, mutations) of HDF5 state case `index`."""
    return _h5_case("h5_state", index, base)


needs_h5py = pytest.mark.skipif(h5py is None, reason="the HDF5 cases need h5py")


@pytest.fixture(scope="module")
def h5_snapshot(tmp_path_factory) -> tuple[Solver, Path, Path]:
    return make_snapshot(tmp_path_factory.mktemp("h5_snapshot"), hdf5=True)


def checked_load(load: Callable[[Path], None], path: Path, others: tuple[Path, ...] = ()) -> None:
    """`load(path)`; an RlossError it raises must name the file (or one of the `others` it may have
    read: the snapshot's files, which a mutated state can name as its model) and stay within the
    message limit."""
    try:
        load(path)
    except RlossError as error:
        message = str(error)
        named = any(str(file) in message for file in (path, *others))
        assert named and len(message) <= MAX_MESSAGE_CHARS, (type(error).__name__, message[:3000])
        raise


@needs_h5py
def test_fuzz_caffemodel_h5(fuzzing, h5_snapshot, tmp_path):
    solver, model, _ = h5_snapshot
    base, path = model.read_bytes(), tmp_path / "fuzz.caffemodel.h5"

    def run(data: bytes | None, index: int, name: str) -> str:
        checked_load(solver.net.copy_from, place(path, data))
        solver.net.forward(random_feeds(solver.net, index))
        return "forward"

    outcomes = run_cases("h5_model", H5_MODEL_CASES, lambda i: h5_model_case(i, base), run)
    assert outcomes.get("WeightsError", 0) > H5_MODEL_CASES // 4 and outcomes.get("forward", 0), outcomes


@needs_h5py
def test_fuzz_solverstate_h5(fuzzing, h5_snapshot):
    solver, model, state = h5_snapshot
    base, path = state.read_bytes(), state.parent / "fuzz.solverstate.h5"  # beside the model it names

    def run(data: bytes | None, index: int, name: str) -> str:
        checked_load(solver.restore, place(path, data), (model, state))
        solver.net.forward(random_feeds(solver.net, index))
        return "forward"

    outcomes = run_cases("h5_state", H5_STATE_CASES, lambda i: h5_state_case(i, base), run)
    assert outcomes.get("WeightsError", 0) > H5_STATE_CASES // 4 and outcomes.get("forward", 0), outcomes


SHARED_NET = """name: "shared"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "a" type: "InnerProduct" bottom: "data" top: "a" param { name: "w" }
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "b" type: "InnerProduct" bottom: "a" top: "b" param { name: "w" }
  inner_product_param { num_output: 3 bias_filler { type: "constant" value: 1 } } }
"""


@needs_h5py
def test_an_h5_model_may_omit_shared_blobs_only(tmp_path):
    """Caffe's rule, which the HDF5 cases found unchecked (a deleted dataset loaded "fine", leaving the
    net's own values): a blob may be absent from an HDF5 model only when the net shares it with an
    earlier layer, which stores it."""
    net, other = (Net(text_format.Parse(SHARED_NET, caffe_pb2.NetParameter()), caffe_pb2.TEST) for _ in range(2))
    path = tmp_path / "shared.caffemodel.h5"
    net.save_hdf5(path)
    other.copy_from(path)
    assert other.params["b"][0] is other.params["a"][0] and torch.equal(other.params["b"][0], net.params["a"][0])
    for layer, missing in (("a", "data/a/1"), ("b", "data/b/1")):  # a bias inside, a blob at the end
        broken = place(tmp_path / "broken.caffemodel.h5", path.read_bytes())
        with h5py.File(broken, "r+") as handle:
            del handle[missing]
        with pytest.raises(NetError, match=rf"{broken}: layer '{layer}' blob 1 is not in the file"):
            other.copy_from(broken)


@needs_h5py
@pytest.mark.parametrize("learned_net", ["", "x" * 5000], ids=["empty", "too long"])
def test_a_state_naming_no_model_file_says_so(h5_snapshot, learned_net):
    """An empty learned_net (the working directory) and one too long for the OS are the state's fault:
    the message names the state (found by the HDF5 cases; the binary states share the rule)."""
    solver, _, state = h5_snapshot
    written = read_solver_state(state)
    written.learned_net = learned_net
    path = state.parent / "named.solverstate.h5"
    write_hdf5_state(written, path)
    with pytest.raises(WeightsError, match=rf"^{path}: its learned_net '{learned_net[:10]}"):
        solver.restore(path)


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
