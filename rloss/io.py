"""Caffe's binary files: `.caffemodel` (a NetParameter), `.solverstate` (a SolverState) and their
HDF5 variants, read with checks that turn corrupt or mistaken files into clear WeightsErrors, and
written atomically (a crash never leaves a half-written snapshot)."""

from __future__ import annotations

import os
import re
import secrets
from contextlib import suppress
from pathlib import Path
from typing import Callable, Mapping, Sequence, Union

import numpy as np
from google.protobuf.message import DecodeError, EncodeError

from rloss.errors import ProtoError, WeightsError
from rloss.proto import caffe_pb2
from rloss.proto.blob import array_to_blob, blob_shape, blob_to_array, shape_problem
from rloss.proto.compat import has_unknown_fields, is_repeated
from rloss.proto.upgrade import upgrade_v1_net

TEMPORARY_SUFFIX = ".tmp"
PathLike = Union[str, "os.PathLike[str]"]

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


# ---- reading ----------------------------------------------------------------------------------------

def read_net_param(path: PathLike, hdf5: bool | None = None):
    """The NetParameter of a `.caffemodel` (V1 upgraded), or of a Caffe HDF5 model (layer names and
    blobs only) when `hdf5` says so, or when it is None and the name ends in `.h5`."""
    if str(path).endswith(".h5") if hdf5 is None else hdf5:
        return _read_h5_model(path)
    data = _read_bytes(path)
    net = _parse(data, caffe_pb2.NetParameter(), path, "a Caffe model (.caffemodel)")
    if not len(net.layer) and not len(net.layers):
        raise WeightsError(f"{path}: not a Caffe model: it holds no layers{_looks_like(data)}")
    try:
        net = upgrade_v1_net(net, str(path))
    except ProtoError as error:
        raise WeightsError(str(error)) from None
    for index, layer in enumerate(net.layer):
        _check_blobs(layer.blobs, f"{path}: layer '{layer.name}' (#{index})")
    return net


def read_solver_state(path: PathLike):
    """The SolverState of a `.solverstate` (or of a Caffe HDF5 solver state when the name ends in `.h5`)."""
    if str(path).endswith(".h5"):
        return _read_h5_state(path)
    data = _read_bytes(path)
    state = _parse(data, caffe_pb2.SolverState(), path, "a solver state (.solverstate)")
    if has_unknown_fields(state) or not state.ListFields():
        raise WeightsError(f"{path}: not a Caffe solver state: it holds fields a SolverState does not have"
                           f"{_looks_like(data)}")
    _check_blobs(state.history, f"{path}: history")
    return state


def read_blob_proto(path: PathLike):
    """A BlobProto from a .binaryproto file (a mean image, an InfogainLoss matrix); its values checked."""
    blob = _parse(_read_bytes(path), caffe_pb2.BlobProto(), path, "a BlobProto (.binaryproto)")
    _check_blobs([blob], f"{path}")
    return blob


def _read_bytes(path: PathLike) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise WeightsError(f"{path}: cannot read: {error.strerror or error}") from None
    if not data:
        raise WeightsError(f"{path}: the file is empty (0 bytes); was the snapshot interrupted?")
    return data


def _parse(data: bytes, message, path: PathLike, what: str):
    """`message` parsed from `data`; a protobuf decoding failure becomes a WeightsError."""
    try:
        message.ParseFromString(data)
    except (DecodeError, RuntimeError) as error:
        raise WeightsError(f"{path}: not {what}, or truncated/corrupt: the protobuf data cannot be decoded "
                           f"({len(data)} bytes; {error}){_looks_like(data)}") from None
    _check_text(message, path)
    return message


def _check_text(message, path: PathLike) -> None:
    """Refuse text fields that are not UTF-8: protobuf hands them over as bytes, which no name or path
    can be (blobs, which hold no text, are skipped: they are most of the file)."""
    for field, value in message.ListFields():
        values = value if is_repeated(field) else [value]
        if field.type == field.TYPE_STRING and any(isinstance(v, bytes) for v in values):
            raise WeightsError(f"{path}: the text field {field.full_name} is not UTF-8 (corrupt file?)")
        if field.type == field.TYPE_MESSAGE and field.message_type.name != "BlobProto":
            for item in values:
                _check_text(item, path)


def _looks_like(data: bytes) -> str:
    """A hint about what the file is instead ('' when nothing recognisable)."""
    if data.startswith(_HDF5_SIGNATURE):
        return "; it is an HDF5 file: Caffe reads those only when the name ends in .h5"
    if _is_text(data[:4096]):
        return "; it is a text file (a prototxt?): weights and solver states are binary"
    state = _try_parse(data, caffe_pb2.SolverState())
    if state is not None and (len(state.history) or state.learned_net):
        return f"; it looks like a .solverstate (iter {state.iter}, learned_net '{state.learned_net}')"
    net = _try_parse(data, caffe_pb2.NetParameter())
    if net is not None and (len(net.layer) or len(net.layers)):
        return f"; it looks like a .caffemodel (net '{net.name}', {len(net.layer) + len(net.layers)} layers)"
    return ""


def _try_parse(data: bytes, message):
    """`message` parsed from `data` when that works without unknown fields, else None."""
    try:
        message.ParseFromString(data)
    except (DecodeError, RuntimeError):
        return None
    return None if has_unknown_fields(message) else message


def _is_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\n\r\t" for c in text)


def _check_blobs(blobs, where: str) -> None:
    """Every blob's shape must be one a blob can have (`shape_problem`) and its value count must match
    it (Caffe aborts on a mismatch when loading)."""
    for index, blob in enumerate(blobs):
        shape = blob_shape(blob)
        problem = shape_problem(shape)
        if problem:
            raise WeightsError(f"{where} blob {index}: {problem}")
        count = int(np.prod(shape, dtype=np.int64))  # exact: shape_problem bounds it
        for name in ("data", "diff"):
            values = max(len(getattr(blob, name)), len(getattr(blob, "double_" + name)))
            if values != count and (name == "data" or values):
                raise WeightsError(f"{where} blob {index}: shape {shape} needs {count} values but the "
                                   f"file holds {values} {name} values (truncated or corrupt file?)")


# ---- HDF5 -------------------------------------------------------------------------------------------

def _h5py(purpose: str = "reading .h5 files"):
    try:
        import h5py
    except ImportError:
        raise WeightsError(f"{purpose} needs the h5py package: pip install h5py") from None
    return h5py


def _open_h5(path: PathLike, read: Callable):
    """`read(file)` on the opened HDF5 file, with HDF5 failures turned into WeightsErrors."""
    h5py = _h5py()
    try:
        with h5py.File(path, "r") as handle:
            return read(handle)
    except OSError as error:
        raise WeightsError(f"{path}: cannot read as HDF5: {error}") from None
    except KeyError as error:
        raise WeightsError(f"{path}: missing HDF5 entry: {error}") from None


def _read_h5_model(path: PathLike):
    """Caffe's HDF5 model: group data/<layer>/<i>. A blob Caffe did not store (a weight shared
    with an earlier layer) is an empty BlobProto: no shape and no values."""

    def read(handle):
        data = _h5_group(handle, "data", path, "a Caffe HDF5 model keeps its weights in data/<layer>/<i>")
        net = caffe_pb2.NetParameter()
        for layer_name, group in data.items():
            if not isinstance(layer_name, str):  # h5py hands over a name that is not UTF-8 as bytes
                raise WeightsError(f"{path}: data/{layer_name!r}: the layer name is not UTF-8 (corrupt file?)")
            layer = net.layer.add()
            layer.name = layer_name
            for array in _h5_blobs(group, f"{path}: data/{layer_name}", gaps=True):
                blob = layer.blobs.add()
                if array is not None:
                    blob.CopyFrom(array_to_blob(array))
        return net

    return _open_h5(path, read)


def _read_h5_state(path: PathLike):
    """Caffe's HDF5 solver state: datasets iter, learned_net, current_step and group history/<i>."""

    def read(handle):
        state = caffe_pb2.SolverState()
        state.iter = _h5_int(handle["iter"], f"{path}: iter")
        if "learned_net" in handle:
            state.learned_net = _h5_text(handle["learned_net"], f"{path}: learned_net")
        if "current_step" in handle:
            state.current_step = _h5_int(handle["current_step"], f"{path}: current_step")
        history = _h5_group(handle, "history", path, "a Caffe HDF5 solver state keeps history/<i>")
        for array in _h5_blobs(history, f"{path}: history", gaps=False):
            state.history.add().CopyFrom(array_to_blob(array))
        if "rloss_resume" in handle:  # rloss's extension: a serialized ResumeState
            data = _h5_bytes(handle["rloss_resume"], f"{path}: rloss_resume")
            state.resume.CopyFrom(_parse(data, caffe_pb2.ResumeState(), path, "an rloss resume state"))
        return state

    return _open_h5(path, read)


def _h5_group(handle, name: str, path: PathLike, why: str):
    group = handle.get(name)
    if group is None or not hasattr(group, "items"):
        raise WeightsError(f"{path}: no HDF5 group '{name}' ({why})")
    return group


_H5_BLOB_NAME = re.compile(r"0|[1-9][0-9]*")  # how Caffe names blob j: decimal, no sign, no leading 0
# No layer has more blobs: a larger number is a corrupt name, refused before a list that long is made.
MAX_H5_LAYER_BLOBS = 1024


def _h5_blobs(group, where: str, gaps: bool) -> list:
    """The arrays of datasets named 0, 1, ...; with `gaps`, None for a missing index below the largest
    (a blob shared with an earlier layer), else a missing index is an error."""
    if not hasattr(group, "items"):
        raise WeightsError(f"{where}: expected a group of datasets 0, 1, 2..., found {_h5_kind(group)}")
    names = list(group)
    if not all(isinstance(name, str) and _H5_BLOB_NAME.fullmatch(name) for name in names):
        raise WeightsError(f"{where}: blob names must be 0, 1, 2...; found {sorted(map(repr, names))}")
    count = max(map(int, names), default=-1) + 1
    if count > MAX_H5_LAYER_BLOBS or (not gaps and count != len(names)):
        problem = f"more than {MAX_H5_LAYER_BLOBS} blobs" if count > MAX_H5_LAYER_BLOBS else "gaps in its numbering"
        raise WeightsError(f"{where}: blob numbers up to {count - 1} ({len(names)} blobs): {problem}")
    present = set(names)
    return [_h5_array(group.get(str(i)), f"{where}/{i}") if str(i) in present else None for i in range(count)]


def _h5_kind(item) -> str:
    h5py = _h5py()
    if isinstance(item, h5py.Dataset):
        return "a dataset"
    return "a group" if isinstance(item, h5py.Group) else "a link to nothing"


_H5_CLASSES = ("INTEGER", "FLOAT", "TIME", "STRING", "BITFIELD", "OPAQUE", "COMPOUND", "REFERENCE", "ENUM", "VLEN",
                "ARRAY")


def _h5_dataset(item, where: str, classes: Sequence[str], one: bool = False):
    """`item` checked, before anything is read, to be a dataset of one of the HDF5 type `classes`
    ("INTEGER", "FLOAT", "STRING") with values (not a null dataspace): exactly one (`one`), else any
    shape a blob can have (`shape_problem`): a corrupt shape must not make the reader allocate it."""
    h5py = _h5py()
    if not isinstance(item, h5py.Dataset):
        raise WeightsError(f"{where}: expected a dataset, found {_h5_kind(item)}")
    kind = item.id.get_type().get_class()
    if kind not in [getattr(h5py.h5t, name) for name in classes]:
        found = next((name for name in _H5_CLASSES if getattr(h5py.h5t, name) == kind), "unknown")
        raise WeightsError(f"{where}: the dataset holds {found.lower()} values ({item.dtype}); expected "
                           f"{' or '.join(name.lower() for name in classes)} values")
    if item.shape is None:
        raise WeightsError(f"{where}: the dataset holds no values (an HDF5 null dataspace)")
    if one and item.size != 1:
        raise WeightsError(f"{where}: expected one value, found shape {item.shape}")
    problem = shape_problem(item.shape, item.dtype.itemsize)
    if problem:
        raise WeightsError(f"{where}: {problem}")
    return item


def _h5_array(item, where: str) -> np.ndarray:
    """A blob's values: float or integer data (Caffe's hdf5_load_nd_dataset refuses the other HDF5
    classes), converted to float32 by HDF5 as in Caffe (float64 beyond float32's range becomes inf)."""
    return np.asarray(_h5_dataset(item, where, ("FLOAT", "INTEGER")).astype(np.float32)[()])


def _h5_int(item, where: str) -> int:
    """One whole number in int32's range (Caffe's hdf5_load_int; SolverState's fields are int32)."""
    dataset = _h5_dataset(item, where, ("INTEGER", "FLOAT"), one=True)
    value = float(np.asarray(dataset.astype(np.float64)[()]).reshape(-1)[0])
    if not (np.isfinite(value) and value == int(value) and -(2**31) <= value < 2**31):
        raise WeightsError(f"{where}: expected a whole number in int32's range, found {value}")
    return int(value)


def _h5_text(item, where: str) -> str:
    """One UTF-8 string (Caffe's hdf5_load_string)."""
    value = np.asarray(_h5_dataset(item, where, ("STRING",), one=True)[()]).reshape(-1)[0]
    try:
        return value.decode() if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError:
        raise WeightsError(f"{where}: the string is not UTF-8 (corrupt file?)") from None


def _h5_bytes(item, where: str) -> bytes:
    """The bytes rloss stores as a uint8 dataset (its serialized ResumeState)."""
    dataset = _h5_dataset(item, where, ("INTEGER",))
    if dataset.dtype != np.uint8:
        raise WeightsError(f"{where}: expected uint8 values (serialized bytes), found {dataset.dtype}")
    return np.asarray(dataset[()]).tobytes()


# ---- writing ----------------------------------------------------------------------------------------

def write_message_atomic(message, path: PathLike) -> None:
    """Serialize `message` to `path` atomically (see `write_file_atomic`)."""
    path = Path(path)
    try:
        data = message.SerializeToString()
    except EncodeError as error:
        raise WeightsError(f"cannot write {path}: the message is incomplete ({error})") from None
    try:
        write_file_atomic(path, lambda temporary: temporary.write_bytes(data))
    except OSError as error:
        raise WeightsError(f"cannot write {path}: {error.strerror or error}") from None


def write_file_atomic(path: PathLike, write: Callable[[Path], None]) -> None:
    """`write(temporary)` creates the file's content at a temporary name in the target's directory; it
    is then fsync'ed and renamed over `path`, so readers see the old file or the complete new one.
    Temporary files that an interrupted earlier write of the same target left behind are removed first;
    their names (`.NAME.<hex>.tmp`) never match what the readers and the run script look for."""
    path = Path(path)
    remove_interrupted_writes(path)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}{TEMPORARY_SUFFIX}")
    try:
        write(temporary)
        _fsync(temporary)
        os.replace(temporary, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(temporary)
        raise
    with suppress(OSError):  # the rename's durability: directories cannot be opened everywhere
        _fsync(path.parent)


def remove_interrupted_writes(path: Path) -> list[Path]:
    """Delete (and return) the temporary files of earlier writes of `path` that never finished."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{12}}{re.escape(TEMPORARY_SUFFIX)}")
    removed = []
    with suppress(OSError):
        for leftover in path.parent.iterdir():
            if pattern.fullmatch(leftover.name):
                with suppress(OSError):
                    leftover.unlink()
                    removed.append(leftover)
    return removed


def _fsync(target: Path) -> None:
    """Make a file's data or a directory's entries durable; a failure (a full disk) raises OSError."""
    descriptor = os.open(target, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# ---- HDF5 writing -----------------------------------------------------------------------------------

HDF5_SNAPSHOTS = "snapshot_format: HDF5 (the default BINARYPROTO needs nothing more)"
# per layer name: (blob index, values, diff or None) for each blob the layer owns
LayerArrays = Mapping[str, Sequence[tuple[int, np.ndarray, Union[np.ndarray, None]]]]


def write_hdf5_model(layers: LayerArrays, path: PathLike, with_diff: bool) -> None:
    """Caffe's HDF5 model: data/<layer>/<i> for every blob a layer owns (and diff/<layer>/<i> if asked;
    a blob shared with an earlier layer is written there only)."""

    def fill(handle) -> None:
        data = handle.create_group("data")
        diff = handle.create_group("diff") if with_diff else None
        for name, blobs in layers.items():
            group = data.require_group(name)
            diff_group = diff.require_group(name) if diff is not None else None
            for index, values, gradient in blobs:
                group.create_dataset(str(index), data=values)
                if diff_group is not None:
                    diff_group.create_dataset(str(index), data=gradient)

    _write_h5_atomic(path, fill)


def write_hdf5_state(state, path: PathLike) -> None:
    """Caffe's HDF5 solver state: iter, learned_net, current_step and history/<i>, plus rloss's
    ResumeState as the bytes of dataset rloss_resume (Caffe ignores it)."""

    def fill(handle) -> None:
        handle.create_dataset("iter", data=np.int32(state.iter))
        handle.create_dataset("learned_net", data=state.learned_net.encode())
        handle.create_dataset("current_step", data=np.int32(state.current_step))
        history = handle.create_group("history")
        for i, blob in enumerate(state.history):
            history.create_dataset(str(i), data=blob_to_array(blob, f"history {i}"))
        if state.HasField("resume"):
            handle.create_dataset("rloss_resume", data=np.frombuffer(state.resume.SerializeToString(), np.uint8))

    _write_h5_atomic(path, fill)


def _write_h5_atomic(path: PathLike, fill: Callable) -> None:
    h5py = _h5py(HDF5_SNAPSHOTS)

    def write(temporary: Path) -> None:
        with h5py.File(temporary, "w") as handle:
            fill(handle)

    try:
        write_file_atomic(path, write)
    except OSError as error:
        raise WeightsError(f"cannot write {path}: {error.strerror or error}") from None
