"""Layers without bottoms that produce the net's data: Input, DummyData, HDF5Data.

Each one produces tensors on the device and in the float dtype of the layer (it follows
`module.to(...)`), since it has no bottom to take them from.

A layer that walks a dataset (`has_data_state`) tells where it stands with `data_state()` (a
DataLayerState for the solver state) and continues from such a state with `load_data_state()`, so a
resumed run reads the batches an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np
import torch

from rloss.errors import DataError, DistributedError, NetError, WeightsError
from rloss.layers.base import Layer, Shape
from rloss.layers.fillers import fill
from rloss.layers.registry import register_layer
from rloss.proto import caffe_pb2


def torch_drawn_seed() -> int:
    """A seed drawn from torch's global generator (so `torch.manual_seed` fixes the data order)."""
    return int(torch.randint(0, 2**62, (1,)).item())


def generator_message(state: dict) -> caffe_pb2.PCG64State:
    """A numpy PCG64 state dict as the schema's PCG64State."""
    if state.get("bit_generator") != "PCG64":
        raise ValueError(f"expected a PCG64 generator state, got {state.get('bit_generator')}")
    inner = state["state"]
    return caffe_pb2.PCG64State(state=inner["state"].to_bytes(16, "big"), increment=inner["inc"].to_bytes(16, "big"),
                                has_uint32=bool(state["has_uint32"]), uinteger=int(state["uinteger"]))


def generator_state(message: caffe_pb2.PCG64State) -> dict | None:
    """The PCG64 state dict of a PCG64State, or None when its numbers are not 128-bit."""
    if len(message.state) != 16 or len(message.increment) != 16:
        return None
    return {"bit_generator": "PCG64",
            "state": {"state": int.from_bytes(message.state, "big"), "inc": int.from_bytes(message.increment, "big")},
            "has_uint32": int(message.has_uint32), "uinteger": int(message.uinteger)}


@dataclass
class DataShare:
    """Which batches of the one-process sequence a data layer reads: `rank`, `rank + ranks`, ...
    (Caffe's multi-GPU data order; with 1 rank, all of them)."""

    rank: int = 0
    ranks: int = 1

    def check(self, batches_per_pass: int, what: str) -> None:
        """Refuse more ranks than `what` has batches in a pass: ranks would read the same samples in
        the same update."""
        if self.ranks > batches_per_pass:
            raise DistributedError(f"{what} makes {batches_per_pass} batch{'es' if batches_per_pass > 1 else ''} "
                                   f"per pass, fewer than the {self.ranks} ranks; use fewer ranks or a smaller "
                                   "batch_size")


class SourceLayer(Layer):
    """A layer with no bottoms; `place` puts produced data on the layer's device and float dtype."""

    bottoms = (0, 0)
    tops = (1, None)
    has_data_state: ClassVar[bool] = False

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int = caffe_pb2.TRAIN):
        super().__init__(param, bottom_shapes, phase)
        # An empty buffer: moves and casts with the module, so it tells where the data must go.
        self.register_buffer("_anchor", torch.empty(0), persistent=False)

    def place(self, data: torch.Tensor | np.ndarray) -> torch.Tensor:
        tensor = torch.as_tensor(data)
        return tensor.to(device=self._anchor.device, dtype=self._anchor.dtype)

    def one_per_top(self, values: list, what: str) -> list:
        """Caffe's "once, or once per top" rule: a single value is used for every top."""
        if len(values) == 1:
            return values * self.num_tops
        if len(values) != self.num_tops:
            raise self.error(f"give {what} once or once per top ({self.num_tops} tops), "
                             f"not {len(values)} times")
        return values

    # ---- resume ---------------------------------------------------------------------------------
    def data_state(self) -> caffe_pb2.DataLayerState | None:
        """Where the layer stands in its data, for an exact resume (None: it has no position)."""
        return None

    def load_data_state(self, state: caffe_pb2.DataLayerState) -> None:
        """Continue from `state`, a `data_state()` of a layer of this name and type."""
        raise self.state_error("has no data state to restore")

    def new_data_state(self, **fields) -> caffe_pb2.DataLayerState:
        return caffe_pb2.DataLayerState(name=self.name, type=self.type_name, **fields)

    def state_error(self, message: str) -> WeightsError:
        return WeightsError(f"layer '{self.name}' (type {self.type_name}): {message}")

    def saved_order(self, values: Sequence[int], count: int, what: str) -> np.ndarray:
        """A saved permutation, refused unless it permutes exactly `count` entries (a state of
        another list or dataset would otherwise read the wrong samples, or past the end)."""
        order = np.array(list(values), dtype=np.uint64)
        if len(order) != count or not np.array_equal(np.sort(order), np.arange(count, dtype=np.uint64)):
            raise self.state_error(f"the saved {what} is not a permutation of its {count} entries "
                                   f"({len(order)} values): a state of another list or dataset?")
        return order.astype(np.int64)

    def saved_generator(self, message: caffe_pb2.PCG64State) -> dict:
        """A saved PCG64 state as numpy's bit-generator state, refused unless it is a valid one."""
        generator = generator_state(message)
        if generator is None:
            raise self.state_error("the saved state has no valid PCG64 generator (16-byte state and increment)")
        return generator

    def saved_index(self, value: int, limit: int, what: str) -> int:
        """A saved position, refused beyond `limit`."""
        if value > limit:
            raise self.state_error(f"the saved {what} {value} is past the end ({limit})")
        return int(value)


def _dims(blob_shape, layer: Layer) -> Shape:
    dims = tuple(int(d) for d in blob_shape.dim)
    if any(d < 0 for d in dims):
        raise layer.error(f"shape {dims} has a negative dimension")
    return dims


@register_layer("Input")
class Input(SourceLayer):
    """Net inputs of declared shapes. The net (or user) hands a tensor to each top with `feed`; a
    fed tensor is returned unchanged by every forward until replaced (gradients reach it), an unfed
    top gives zeros of the declared shape (Caffe's freshly allocated blob)."""

    feedable = True

    def setup(self, bottom_shapes: list[Shape]) -> None:
        shapes = [_dims(shape, self) for shape in self.param.input_param.shape]
        if not shapes:
            raise self.error("input_param needs a shape { dim: ... } for its tops")
        self.declared_shapes: list[Shape] = self.one_per_top(shapes, "input_param shape")
        self.fed: list[torch.Tensor | None] = [None] * self.num_tops

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return list(self.declared_shapes)

    def feed(self, top: int | str, value: torch.Tensor | np.ndarray) -> None:
        """Make top `top` (index or blob name) produce `value`; non-float data becomes float32."""
        index = self._top_index(top)
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            self.fed[index] = value
        else:
            self.fed[index] = torch.as_tensor(np.asarray(value), dtype=torch.float32)

    def _top_index(self, top: int | str) -> int:
        names = list(self.param.top)
        if isinstance(top, str):
            if top not in names:
                raise self.error(f"has no top named '{top}' (tops: {', '.join(names)})")
            return names.index(top)
        if not 0 <= top < self.num_tops:
            raise self.error(f"has no top {top} (it has {self.num_tops})")
        return top

    def forward(self) -> list[torch.Tensor]:  # type: ignore[override]
        return [
            tensor if tensor is not None else self.place(torch.zeros(shape))
            for tensor, shape in zip(self.fed, self.declared_shapes)
        ]


_LEGACY_DIMS = ("num", "channels", "height", "width")


@register_layer("DummyData")
class DummyData(SourceLayer):
    """Tops of fixed shapes filled by fillers (default constant 0), refilled at every forward so
    random fillers give new values each time, as in Caffe."""

    def setup(self, bottom_shapes: list[Shape]) -> None:
        dummy = self.param.dummy_data_param
        fillers = list(dummy.data_filler) or [caffe_pb2.FillerParameter()]
        self.fillers = self.one_per_top(fillers, "data_filler")
        self.shapes: list[Shape] = self._shapes(dummy)

    def _shapes(self, dummy) -> list[Shape]:
        if not any(len(getattr(dummy, name)) for name in _LEGACY_DIMS):
            if not dummy.shape:
                raise self.error("dummy_data_param needs shape { dim: ... } or num/channels/height/width")
            return self.one_per_top([_dims(shape, self) for shape in dummy.shape], "shape")
        if dummy.shape:
            raise self.error("give either shape or num/channels/height/width, not both")
        columns = [self.one_per_top([int(v) for v in getattr(dummy, name)], name) for name in _LEGACY_DIMS]
        return [tuple(dims) for dims in zip(*columns)]

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return list(self.shapes)

    def forward(self) -> list[torch.Tensor]:  # type: ignore[override]
        try:
            return [self.place(fill(shape, filler)) for shape, filler in zip(self.shapes, self.fillers)]
        except NetError as error:
            raise self.error(str(error)) from error


def _data_error(layer: Layer, message: str) -> DataError:
    return DataError(f"layer '{layer.name}' (type {layer.type_name}): {message}")


def _read_list(layer: Layer, source: str) -> list[tuple[str, int]]:
    """(file name, line number) for each whitespace-separated name in the list file `source`."""
    try:
        text = Path(source).read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise _data_error(layer, f"cannot read the list file '{source}': {error}") from error
    entries = [(name, number) for number, line in enumerate(text.splitlines(), 1) for name in line.split()]
    if not entries:
        raise _data_error(layer, f"the list file '{source}' names no file")
    return entries


@register_layer("HDF5Data")
class HDF5Data(SourceLayer):
    """Batches of rows read from the datasets named like the tops in the .h5 files listed in
    `source` (paths relative to the working directory). Rows are taken in order (or a permutation
    when `shuffle`); a batch running past the end of a file continues in the next file, wrapping
    to the first; with `shuffle` the file order is redrawn at each wrap and the rows of a file each
    time it is (re)started. Every file is loaded whole, as Caffe does. Its shuffles draw from the
    layer's own generator (seeded from torch's when built), saved with its position, so that ranks
    of a data-parallel run, whose torch generators differ, deal one order (`shard`)."""

    has_data_state = True

    def setup(self, bottom_shapes: list[Shape]) -> None:
        hdf5 = self.param.hdf5_data_param
        if self.param.HasField("transform_param"):
            raise self.error("HDF5Data does not transform its data: remove transform_param")
        if hdf5.batch_size < 1:
            raise self.error(f"hdf5_data_param batch_size must be positive, got {hdf5.batch_size}")
        self.batch_size = int(hdf5.batch_size)
        self.shuffle = bool(hdf5.shuffle)
        self.source = hdf5.source
        self.share = DataShare()
        self.rng = np.random.default_rng(torch_drawn_seed())
        self.files = _read_list(self, self.source)
        self.file_order = self._permutation(len(self.files))
        self.file_cursor = 0
        self.sample_shapes: list[Shape] | None = None
        self._load_current_file()

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [(self.batch_size, *shape) for shape in self.sample_shapes]

    def forward(self) -> list[torch.Tensor]:  # type: ignore[override]
        batches = [self._next_batch() for _ in range(self.share.ranks)]
        return [self.place(top) for top in batches[self.share.rank]]

    def shard(self, rank: int, ranks: int) -> None:
        """Read only the batches `rank`, `rank + ranks`, ... of the sequence (data-parallel training)."""
        rows = sum(_row_count(self, name, line) for name, line in self.files)
        DataShare(rank, ranks).check(-(-rows // self.batch_size), f"layer '{self.name}' (type HDF5Data): "
                                     f"the {rows} rows of the files in '{self.source}'")
        self.share.rank, self.share.ranks = rank, ranks

    def _next_batch(self) -> list[np.ndarray]:
        chunks: list[list[np.ndarray]] = [[] for _ in range(self.num_tops)]
        remaining = self.batch_size
        while remaining:
            if self.row == len(self.row_order):
                self._next_file()
            taken = self.row_order[self.row:self.row + remaining]
            for top_chunks, array in zip(chunks, self.arrays):
                top_chunks.append(array[taken])
            self.row += len(taken)
            remaining -= len(taken)
        return [np.concatenate(top_chunks) for top_chunks in chunks]

    def data_state(self) -> caffe_pb2.DataLayerState:
        return self.new_data_state(cursor=self.row, order=self.row_order.tolist(), file_cursor=self.file_cursor,
                                   file_order=self.file_order.tolist(),
                                   generator=generator_message(self.rng.bit_generator.state))

    def load_data_state(self, state: caffe_pb2.DataLayerState) -> None:
        """Reload the file `state` was in and continue at its row and generator (nothing is drawn);
        a state without a generator (written before the layer had its own) keeps the current one."""
        file_order = self.saved_order(state.file_order, len(self.files), f"file order of the list '{self.source}'")
        file_cursor = self.saved_index(state.file_cursor, len(self.files) - 1, "file position")
        arrays = self._read_file(int(file_order[file_cursor]))
        where = f"row order of HDF5 file '{self.files[file_order[file_cursor]][0]}'"
        row_order = self.saved_order(state.order, len(arrays[0]), where)
        self.row = self.saved_index(state.cursor, len(row_order), "row")
        generator = self.saved_generator(state.generator) if state.HasField("generator") else None
        self.file_order, self.file_cursor, self.arrays, self.row_order = file_order, file_cursor, arrays, row_order
        if generator is not None:
            self.rng.bit_generator.state = generator

    def _permutation(self, count: int) -> np.ndarray:
        if self.shuffle:
            return self.rng.permutation(count)
        return np.arange(count)

    def _next_file(self) -> None:
        """Caffe's wrap-around: next file (reshuffling the file order after the last), rows restart."""
        if len(self.files) > 1:
            self.file_cursor += 1
            if self.file_cursor == len(self.files):
                self.file_cursor = 0
                self.file_order = self._permutation(len(self.files))
            self._load_current_file()
        else:
            self.row, self.row_order = 0, self._permutation(len(self.row_order))

    def _load_current_file(self) -> None:
        self.arrays = self._read_file(self.file_order[self.file_cursor])
        self.row, self.row_order = 0, self._permutation(len(self.arrays[0]))

    def _read_file(self, index: int) -> list[np.ndarray]:
        """The datasets of list entry `index`, whose samples must have the first file's shapes."""
        name, line = self.files[index]
        where = f"HDF5 file '{name}' (line {line} of the list '{self.source}')"
        arrays = _read_datasets(self, name, where)
        shapes = [array.shape[1:] for array in arrays]
        if self.sample_shapes is not None and shapes != self.sample_shapes:
            raise _data_error(self, f"{where} has samples of shapes {shapes} for tops "
                                    f"{list(self.param.top)}, the first file had {self.sample_shapes}")
        self.sample_shapes = shapes
        return arrays


def _row_count(layer: Layer, name: str, line: int) -> int:
    """The rows of the file's first top dataset, read from its header (no data loaded)."""
    import h5py

    try:
        with h5py.File(name, "r") as h5:
            dataset = h5.get(layer.param.top[0])
            return int(dataset.shape[0]) if isinstance(dataset, h5py.Dataset) and dataset.ndim else 0
    except OSError as error:
        raise _data_error(layer, f"HDF5 file '{name}' (line {line} of the list '{layer.source}') "
                                 f"cannot be read: {error}") from error


def _read_datasets(layer: Layer, name: str, where: str) -> list[np.ndarray]:
    """The datasets named like the layer's tops, as float32 arrays with the same number of rows."""
    try:
        import h5py
    except ImportError as error:
        raise layer.error("HDF5Data needs the h5py package (pip install h5py)") from error
    try:
        with h5py.File(name, "r") as h5:
            arrays = [_dataset(layer, h5, top, where) for top in layer.param.top]
    except OSError as error:
        raise _data_error(layer, f"{where} cannot be read: {error}") from error
    rows = {len(array) for array in arrays}
    if len(rows) != 1 or 0 in rows:
        counts = ", ".join(f"{top}: {len(array)}" for top, array in zip(layer.param.top, arrays))
        raise _data_error(layer, f"{where}: the datasets must have the same, non-zero number of rows, "
                                 f"got {counts}")
    return arrays


def _dataset(layer: Layer, h5, top: str, where: str) -> np.ndarray:
    import h5py

    dataset = h5.get(top)
    if not isinstance(dataset, h5py.Dataset):
        held = ", ".join(h5.keys()) or "nothing"
        raise _data_error(layer, f"{where} has no dataset '{top}' (it holds: {held})")
    if dataset.ndim < 1 or dataset.dtype.kind not in "fiu":
        raise _data_error(layer, f"{where}: dataset '{top}' must be a numeric array with at least one axis, "
                                 f"got dtype {dataset.dtype} shape {dataset.shape}")
    return np.asarray(dataset[...], dtype=np.float32)
