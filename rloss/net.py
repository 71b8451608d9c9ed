"""`Net`: a Caffe NetParameter built into a graph of PyTorch layer objects with Caffe's semantics.

Layers run in file order; blobs are looked up by name; an in-place top rebinds its name to the new
tensor; Split layers (inserted as Caffe does) give fan-out; `param { name }` makes layers share one
`nn.Parameter`; propagate_down false detaches a bottom; the objective is the sum over tops of
loss_weight * sum(top). Backward comes from autograd.

`precision` (fp32, bf16, fp16; `rloss.precision`) runs the layers under torch.autocast, those that
declare `runs_in_float32` in float32; `checkpoint_activations` trades a second forward of most layers
in backward for keeping only the blobs at segment boundaries (torch.utils.checkpoint).
"""

from __future__ import annotations

import difflib
import functools
import itertools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from rloss.errors import LayerError, NetError, RlossError, WeightsError
from rloss.layers import Layer, layer_class, layer_types
from rloss.layers.python_layer import modules_beside
from rloss.precision import autocast, check_precision, float32_region, to_float32
from rloss.proto import caffe_pb2
from rloss.proto.blob import shape_problem
from rloss.proto.upgrade import net_inputs
from rloss.wiring import data_layers_to_inputs, insert_splits

log = logging.getLogger("rloss")
Shape = tuple[int, ...]


@dataclass
class LearnableParam:
    """One owner parameter as the solver sees it (Caffe's learnable_params_ entry)."""

    tensor: nn.Parameter
    lr_mult: float
    decay_mult: float
    owner: str  # "layer/index", for messages


@dataclass
class _Step:
    """One layer of the built net, with the blob names it reads and writes."""

    layer: Layer
    bottoms: list[str]
    tops: list[str]  # anonymous tops get unique internal names starting with "("
    detach: list[bool]  # per bottom: propagate_down false, or a bottom the layer never differentiates
    loss_tops: list[tuple[int, float]]  # (top index, loss weight) with weight != 0


@dataclass
class _LayerRun:
    """A layer's last run by `Net.forward_layers`: the bottoms it took, as leaves of their own (so that
    each layer has a graph of its own and any range of layers can run backward), and the tops it gave."""

    bottoms: list[torch.Tensor]
    tops: list[torch.Tensor]


@dataclass
class _Segment:
    """Consecutive layers that activation checkpointing runs as one unit: backward keeps only the
    blobs at its boundaries and runs its layers again to get what they saved."""

    steps: list[_Step]
    inputs: list[str]  # blobs it reads that earlier layers made
    outputs: list[str]  # blobs it makes that later layers read, or net outputs


class Net(nn.Module):
    """A built Caffe net for one phase.

    Build with `Net(net_param, phase)` from an already phase-filtered NetParameter, or with
    `Net.from_prototxt(path, phase, ...)`. `forward(feeds)` runs every layer and returns the loss;
    blobs of the last forward are in `blob_data` (and their gradients, after a backward with
    `keep_blob_diffs`, through `blob_diff`).

    `forward_layers` and `backward_layers` are Caffe's ForwardFromTo and BackwardFromTo (pycaffe's
    `forward(start=, end=)`): layer by layer over the blobs as they stand, with the diffs in `blob_diffs`.
    """

    def __init__(self, net_param, phase: int = caffe_pb2.TEST, source: str = "<net>"):
        super().__init__()
        self.name: str = net_param.name
        self.phase = phase
        self.source = source
        self.force_backward: bool = net_param.force_backward
        try:
            self.inputs: dict[str, Shape] = dict(net_inputs(net_param))
        except NetError as error:
            raise NetError(f"{source}: {error}") from None
        for name, shape in self.inputs.items():
            problem = shape_problem(shape)
            if problem:
                raise NetError(f"{source}: input '{name}': {problem}")
        self.net_param = insert_splits(net_param, list(self.inputs))
        self.layers = nn.ModuleList()
        self.input_layer_tops: dict[str, Layer] = {}
        self._steps: list[_Step] = []
        self.blob_shapes: dict[str, Shape] = dict(self.inputs)
        self.producers: dict[str, str] = {name: "input" for name in self.inputs}
        with modules_beside(source):  # Python layers also find their module beside the net file
            self._build()
        self.learnable: list[LearnableParam] = []
        self.params: dict[str, list[nn.Parameter]] = {}
        self._share_params()
        self.outputs: list[str] = self._find_outputs()
        self._feeds: dict[str, torch.Tensor] = {}
        self.blob_data: dict[str, torch.Tensor] = {}
        self._first_version: dict[str, torch.Tensor] = {}
        self.blob_diffs: dict[str, torch.Tensor] = {}  # Caffe's blob diffs, for backward_layers
        self._layer_runs: dict[int, _LayerRun] = {}
        self._loss_weights: dict[str, float] = dict(self.loss_top_names())
        self.keep_blob_diffs = False
        self._precision = "fp32"
        self.checkpoint_activations = False
        self._checkpoint_plan = _checkpoint_plan(self._steps, self.outputs)
        self._said_no_checkpoints = False

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_prototxt(
        cls,
        path: str | Path,
        phase: int = caffe_pb2.TEST,
        values: Mapping[str, str] | None = None,
        level: int = 0,
        stages: Sequence[str] = (),
        defaults: Mapping[str, str] | None = None,
        feed_data_layers: bool = False,
    ) -> Net:
        """Read a net prototxt (expanding `${VAR}`s, upgrading V1) and build it for `phase`.

        With `feed_data_layers`, image data layers become net inputs of their tops' shapes."""
        from rloss.proto.text import read_net

        net_param = read_net(str(path), phase, values=values, defaults=defaults, level=level, stages=stages)
        if feed_data_layers:
            net_param = data_layers_to_inputs(net_param)
        return cls(net_param, phase, source=str(path))

    def _where(self, param) -> str:
        return f"{self.source}: layer '{param.name}' (type {param.type})"

    def _build(self) -> None:
        available: set[str] = set(self.inputs)
        anonymous = 0
        names_seen: set[str] = set()
        for param in self.net_param.layer:
            if param.name in names_seen and param.name:
                log.warning("%s: a second layer is named '%s'", self.source, param.name)
            names_seen.add(param.name)
            if not param.HasField("phase"):
                param.phase = self.phase
            cls = layer_class(param.type)
            if cls is None:
                close = difflib.get_close_matches(param.type, layer_types(), n=3)
                hint = f"; did you mean {' or '.join(close)}?" if close else f"; known: {', '.join(layer_types())}"
                raise NetError(f"{self._where(param)}: unknown layer type '{param.type}'{hint}")
            if param.propagate_down and len(param.propagate_down) != len(param.bottom):
                raise NetError(
                    f"{self._where(param)}: {len(param.propagate_down)} propagate_down values "
                    f"for {len(param.bottom)} bottoms (give none or one per bottom)"
                )
            for index, bottom in enumerate(param.bottom):
                if bottom not in available:
                    known = "already consumed" if bottom in self.blob_shapes else "not produced by any earlier layer"
                    raise NetError(f"{self._where(param)}: unknown bottom blob '{bottom}' (bottom {index}): {known}")
            bottom_shapes = [self.blob_shapes[b] for b in param.bottom]
            try:
                layer = cls(param, bottom_shapes, self.phase)
            except LayerError as error:
                raise NetError(f"{self.source}: {error}") from None
            tops = list(param.top)
            for index, top in enumerate(tops):
                in_place = index < len(param.bottom) and param.bottom[index] == top
                if not in_place and top in self.blob_shapes:
                    raise NetError(
                        f"{self._where(param)}: top '{top}' is produced by multiple sources "
                        f"(first by '{self.producers[top]}'); in-place use needs top {index} == bottom {index}"
                    )
            for bottom in param.bottom:
                available.discard(bottom)
            for _ in range(layer.num_tops - len(tops)):
                tops.append(f"(automatic {anonymous})")
                anonymous += 1
            for top, shape in zip(tops, layer.top_shapes):
                available.add(top)
                self.blob_shapes[top] = shape
                self.producers.setdefault(top, param.name)
            detach = [bool(param.propagate_down) and not param.propagate_down[i] for i in range(len(param.bottom))]
            for i in cls.no_gradient_bottoms:
                if i < len(detach):
                    detach[i] = True
            loss_tops = [(i, w) for i, w in enumerate(layer.loss_weights) if w != 0]
            if cls.feedable:
                self.input_layer_tops.update((top, layer) for top in param.top)
            self.layers.append(layer)
            self._steps.append(_Step(layer, list(param.bottom), tops, detach, loss_tops))
        self._available = available

    def _share_params(self) -> None:
        owners: dict[str, tuple[nn.Parameter, LearnableParam, bool, bool]] = {}
        for step in self._steps:
            layer, specs = step.layer, step.layer.param.param
            if len(specs) > len(layer.blobs):
                raise NetError(
                    f"{self._where(layer.param)}: {len(specs)} param specs for {len(layer.blobs)} parameter blobs"
                )
            for j in range(len(layer.blobs)):
                spec = specs[j] if j < len(specs) else caffe_pb2.ParamSpec()
                blob = layer.blobs[j]
                if not spec.name or spec.name not in owners:
                    entry = LearnableParam(blob, spec.lr_mult, spec.decay_mult, f"{layer.name}/{j}")
                    self.learnable.append(entry)
                    if spec.name:
                        owners[spec.name] = (blob, entry, spec.HasField("lr_mult"), spec.HasField("decay_mult"))
                    continue
                owner_blob, entry, lr_set, decay_set = owners[spec.name]
                self._check_share(layer, j, spec, owner_blob, blob)
                if spec.HasField("lr_mult"):
                    if lr_set and spec.lr_mult != entry.lr_mult:
                        raise NetError(f"{self._where(layer.param)}: shared param '{spec.name}' has lr_mult "
                                       f"{spec.lr_mult}, its owner {entry.owner} has {entry.lr_mult}")
                    entry.lr_mult, lr_set = spec.lr_mult, True
                if spec.HasField("decay_mult"):
                    if decay_set and spec.decay_mult != entry.decay_mult:
                        raise NetError(f"{self._where(layer.param)}: shared param '{spec.name}' has decay_mult "
                                       f"{spec.decay_mult}, its owner {entry.owner} has {entry.decay_mult}")
                    entry.decay_mult, decay_set = spec.decay_mult, True
                owners[spec.name] = (owner_blob, entry, lr_set, decay_set)
                layer.blobs[j] = owner_blob
        for entry in self.learnable:
            entry.tensor.requires_grad_(entry.lr_mult != 0)
        self.params = {step.layer.name: list(step.layer.blobs) for step in self._steps if len(step.layer.blobs)}

    def _check_share(self, layer: Layer, j: int, spec, owner: nn.Parameter, blob: nn.Parameter) -> None:
        permissive = spec.share_mode == caffe_pb2.ParamSpec.PERMISSIVE
        same = owner.numel() == blob.numel() if permissive else owner.shape == blob.shape
        if not same:
            rule = "element count" if permissive else "shape"
            raise NetError(
                f"{self._where(layer.param)}: param {j} shares '{spec.name}' but its {rule} differs: "
                f"{tuple(blob.shape)} vs the owner's {tuple(owner.shape)}"
            )

    def _find_outputs(self) -> list[str]:
        return sorted(name for name in self._available if not name.startswith("("))

    # ---- running ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        for entry in self.learnable:
            return entry.tensor.device
        return torch.device("cpu")

    @property
    def feedable(self) -> list[str]:
        """Blobs a caller can set: the net-level inputs, then the tops of Input layers."""
        return list(self.inputs) + list(self.input_layer_tops)

    def feed(self, name: str, value: torch.Tensor) -> None:
        """Set the value of an input blob (`input:` or an Input layer's top) for the next forward."""
        self.blob_data.pop(name, None)
        if name in self.input_layer_tops:
            self.input_layer_tops[name].feed(name, value)
        elif name in self.inputs:
            self._feeds[name] = value
        else:
            inputs = ", ".join(self.feedable) or "none"
            raise NetError(f"{self.source}: '{name}' is not an input of the net (inputs: {inputs})")

    def input_tensor(self, name: str) -> torch.Tensor:
        """The tensor an input blob holds (zeros of its declared shape until fed)."""
        layer = self.input_layer_tops.get(name)
        if layer is not None:
            index = list(layer.param.top).index(name)
            if layer.fed[index] is None:
                layer.feed(index, torch.zeros(layer.top_shapes[index], device=self.device))
            return layer.fed[index]
        if name not in self._feeds:
            self._feeds[name] = torch.zeros(self.inputs[name], device=self.device)
        return self._feeds[name]

    @property
    def precision(self) -> str:
        """fp32, bf16 or fp16: what autocast computes the layers in (the weights stay float32)."""
        return self._precision

    @precision.setter
    def precision(self, name: str) -> None:
        self._precision = check_precision(name, self.device)

    def forward(self, feeds: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:  # type: ignore[override]
        """Run every layer; return the objective sum(loss_weight * top) as a 0-d float32 tensor.

        Under bf16/fp16 the blobs autocast computed are bf16/fp16 in `blob_data`; the net outputs, the
        loss and the tops of `runs_in_float32` layers are float32. With checkpointing in force
        (`checkpoint_activations`, grad enabled), `blob_data` holds only the blobs alive at segment
        boundaries and the outputs."""
        for name, value in (feeds or {}).items():
            self.feed(name, value)
        # the last pass's blobs (and the graph and DenseCRF lattices they hold) go before this pass
        # allocates its own: otherwise two iterations' activations are alive at the peak
        self.blob_data, self._first_version = {}, {}
        self.blob_diffs, self._layer_runs = {}, {}
        device = self.device
        blobs, first = self._input_blobs(device)
        loss = torch.zeros((), device=device)
        with autocast(self.precision, device):
            for item in self._forward_plan():
                if isinstance(item, _Segment):
                    self._run_segment(item, blobs, first)
                    continue
                tops = self._run_step(item, blobs, device)
                for name, value in zip(item.tops, tops):
                    if name not in first or name not in item.bottoms:
                        first[name] = value
                for index, weight in item.loss_tops:
                    loss = loss + weight * to_float32(tops[index]).sum()
        self._outputs_to_float32(blobs, first)
        if self.keep_blob_diffs and torch.is_grad_enabled():
            for value in first.values():
                if value.requires_grad:
                    value.retain_grad()
        self.blob_data, self._first_version = blobs, first
        return loss

    def _input_blobs(self, device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(blobs, first versions) holding the net-level inputs, on `device`."""
        blobs: dict[str, torch.Tensor] = {}
        for name in self.inputs:
            value = self.input_tensor(name).to(device)
            if self.force_backward and torch.is_grad_enabled():
                value = value.detach().requires_grad_(True)
            blobs[name] = value
        return blobs, dict(blobs)

    def _forward_plan(self) -> Sequence[_Step | _Segment]:
        """The layers to run, grouped into checkpointed segments when checkpointing is in force.

        Not with `keep_blob_diffs` (pycaffe): every blob's data and diff is kept there, which leaves
        checkpointing nothing to save."""
        if not (self.checkpoint_activations and torch.is_grad_enabled()):
            return self._steps
        if self.keep_blob_diffs:
            if not self._said_no_checkpoints:
                log.info("%s: activation checkpointing is off: this net keeps every blob's data and diff "
                         "(pycaffe), so it would save nothing", self.source)
                self._said_no_checkpoints = True
            return self._steps
        return self._checkpoint_plan

    def _run_step(self, step: _Step, blobs: dict[str, torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        """Run one layer on its bottoms in `blobs`, bind its tops there and return them."""
        bottoms = [blobs[b].detach() if d else blobs[b] for b, d in zip(step.bottoms, step.detach)]
        tops = self._step_tops(step, bottoms, device)
        blobs.update(zip(step.tops, tops))
        return tops

    def _step_tops(self, step: _Step, bottoms: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        """One layer's tops for these bottoms, a failure named by the layer."""
        try:
            tops = self._layer_forward(step.layer, bottoms, device)
        except RlossError:
            raise
        except RuntimeError as error:
            shapes = [tuple(b.shape) for b in bottoms]
            where = self._where(step.layer.param)
            raise NetError(f"{where}: forward failed on bottoms {shapes}: {error}") from None
        if not step.bottoms:
            tops = [t.to(device) for t in tops]
        return tops

    @staticmethod
    def _layer_forward(layer: Layer, bottoms: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        if not layer.runs_in_float32:
            return layer(*bottoms)
        with float32_region(device):
            return layer(*[to_float32(b) for b in bottoms])

    def _run_segment(self, segment: _Segment, blobs: dict[str, torch.Tensor], first: dict[str, torch.Tensor]) -> None:
        """Run a segment under torch.utils.checkpoint (its recompute replays torch's generator, so
        Dropout draws the same masks) and bind its outputs."""
        run = functools.partial(self._segment_forward, segment)
        values = checkpoint(run, *(blobs[name] for name in segment.inputs), use_reentrant=False,
                            preserve_rng_state=True)
        for name, value in zip(segment.outputs, values):
            blobs[name] = value
            first.setdefault(name, value)

    def _segment_forward(self, segment: _Segment, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        blobs = dict(zip(segment.inputs, inputs))
        device = self.device
        for step in segment.steps:
            self._run_step(step, blobs, device)
        return tuple(blobs[name] for name in segment.outputs)

    def _outputs_to_float32(self, blobs: dict[str, torch.Tensor], first: dict[str, torch.Tensor]) -> None:
        """The net outputs as float32 (what scoring, logs and callers read), whatever autocast made."""
        for name in self.outputs:
            value = blobs[name]
            cast = to_float32(value)
            if cast is not value:
                if first.get(name) is value:
                    first[name] = cast
                blobs[name] = cast

    def blob_diff(self, name: str) -> torch.Tensor:
        """The gradient Caffe would hold in blob `name`'s diff after the last backward (zeros if none).

        For an in-place chain that is the gradient of the first producer's output, as in Caffe where
        every in-place layer's backward overwrites the shared diff with its bottom's gradient. In
        float32, also for a blob autocast computed in bf16/fp16. After `backward_layers`, the diff it left
        in `blob_diffs`."""
        if name in self.blob_diffs:
            return self.blob_diffs[name]
        value = self._first_version.get(name)
        if value is None:
            raise NetError(f"{self.source}: no blob '{name}' (run forward first)")
        grad = value.grad if value.requires_grad else None
        return to_float32(grad if grad is not None else torch.zeros_like(value))

    def loss_top_names(self) -> list[tuple[str, float]]:
        """(blob name, loss weight) of every top that is part of the objective."""
        return [(step.tops[i], w) for step in self._steps for i, w in step.loss_tops]

    def backward_from(self, top_diffs: Mapping[str, torch.Tensor]) -> None:
        """Back-propagate from the given diffs of blobs (pycaffe's backward: loss tops seeded with
        their loss weights, outputs with the diffs they hold)."""
        tensors, grads = [], []
        for name, diff in top_diffs.items():
            value = self.blob_data[name]
            if value.requires_grad:
                tensors.append(value)
                grads.append(diff.to(value.device, value.dtype).reshape(value.shape))
        if tensors:
            torch.autograd.backward(tensors, grads)

    # ---- layer ranges (Caffe's ForwardFromTo / BackwardFromTo, for pycaffe) -------------------------
    def blob_tensor(self, name: str) -> torch.Tensor:
        """What blob `name` holds now, as Caffe's blob memory: its value from the last forward, else the
        input's tensor, else zeros of its shape. The tensor is kept, so what a caller writes into it is
        what a later `forward_layers` reads."""
        value = self.blob_data.get(name)
        if value is None:
            if name in self.feedable:
                value = self.input_tensor(name).to(self.device)
            elif name in self.blob_shapes:
                value = torch.zeros(self.blob_shapes[name], device=self.device)
            else:
                raise NetError(f"{self.source}: no blob named '{name}'")
            self.blob_data[name] = value
        return value

    def diff_tensor(self, name: str) -> torch.Tensor:
        """Blob `name`'s diff in `blob_diffs` (float32, the blob's shape): what `backward_layers` or a caller
        last wrote there; at first the loss weight for a loss top (Caffe's SetLossWeights), else zeros."""
        value = self.blob_tensor(name)
        diff = self.blob_diffs.get(name)
        if diff is None or diff.shape != value.shape:
            diff = torch.full(value.shape, self._loss_weights.get(name, 0.0), device=value.device)
            self.blob_diffs[name] = diff
        return diff

    def forward_layers(self, first: int, last: int) -> torch.Tensor:
        """Run layers `first`..`last` (inclusive) on the blobs as they stand (`blob_tensor`) and return
        their loss, as Caffe's ForwardFromTo. Each layer gets a graph of its own (`backward_layers`).
        An Input layer does nothing, as in Caffe: its tops are the input blobs as they stand."""
        self._check_layer_index(first)
        self._check_layer_index(last)
        outputs = set(self.outputs)
        loss = torch.zeros((), device=self.device)
        for index in range(first, last + 1):
            step = self._steps[index]
            if step.layer.feedable:
                tops = [self.blob_tensor(top) for top in step.tops]
            else:
                run = self._layer_runs[index] = self._run_layer(step)
                tops = run.tops
            for name, value in zip(step.tops, tops):
                self.blob_data[name] = to_float32(value) if name in outputs else value  # as `forward` shows them
            for top, weight in step.loss_tops:
                loss = loss + weight * to_float32(tops[top]).sum()
        return loss

    def backward_layers(self, last: int, first: int) -> None:
        """Run layers `last` down to `first` backward, as Caffe's BackwardFromTo: each layer takes its
        tops' diffs from `blob_diffs` (`diff_tensor`) and overwrites its bottoms' diffs there; parameter
        gradients add up in `.grad` (Caffe's param diffs, until cleared). A layer that has not run
        forward since the last `forward` runs forward again on its bottoms as they stand first."""
        self._check_layer_index(last)
        self._check_layer_index(first)
        for index in range(last, first - 1, -1):
            step = self._steps[index]
            if not step.bottoms and not len(step.layer.blobs):
                continue  # a source layer: nothing to back-propagate to
            run = self._layer_runs.get(index)
            if run is None:
                run = self._layer_runs[index] = self._run_layer(step)
            self._layer_backward(step, run)

    def _run_layer(self, step: _Step) -> _LayerRun:
        """Run one layer on its bottoms as they stand, each bottom a fresh leaf that needs a gradient
        where Caffe's bottom needs backward (force_backward, or a gradient flowing in) and
        propagate_down allows it."""
        bottoms = []
        for name, detach in zip(step.bottoms, step.detach):
            value = self.blob_tensor(name)
            leaf = value.detach()
            wanted = value.requires_grad or (self.force_backward and torch.is_grad_enabled())
            if wanted and not detach and leaf.is_floating_point():
                leaf.requires_grad_(True)
            bottoms.append(leaf)
        with autocast(self.precision, self.device):
            return _LayerRun(bottoms, self._step_tops(step, bottoms, self.device))

    def _layer_backward(self, step: _Step, run: _LayerRun) -> None:
        tops = [(top, value) for top, value in zip(step.tops, run.tops) if value.requires_grad]
        inputs = [leaf for leaf in run.bottoms if leaf.requires_grad]
        inputs += [blob for blob in step.layer.blobs if blob.requires_grad]
        if not tops or not inputs:
            return
        for leaf in run.bottoms:
            leaf.grad = None
        grads = [self.diff_tensor(name).to(value.dtype).reshape(value.shape) for name, value in tops]
        torch.autograd.backward([value for _, value in tops], grads, inputs=inputs, retain_graph=True)
        for name, leaf in zip(step.bottoms, run.bottoms):
            if leaf.requires_grad:
                grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                self.diff_tensor(name).copy_(grad.reshape(self.blob_tensor(name).shape))

    def adopt_autograd_diffs(self) -> None:
        """Make the gradients the last backward through the whole graph left (`forward`, then autograd:
        a solver's iteration, with `keep_blob_diffs`) the blobs' diffs in `blob_diffs`."""
        self.blob_diffs = {}
        self.blob_diffs = {name: self.blob_diff(name) for name, value in self._first_version.items()
                           if value.requires_grad}

    def layer_index(self, name: str) -> int:
        """The position of the (first) layer named `name`."""
        for index, step in enumerate(self._steps):
            if step.layer.name == name:
                return index
        raise NetError(f"{self.source}: no layer named '{name}'")

    def _check_layer_index(self, index: int) -> None:
        if not 0 <= index < len(self._steps):
            raise NetError(f"{self.source}: no layer {index} (the net has {len(self._steps)})")

    def layer_names(self) -> list[str]:
        return [step.layer.name for step in self._steps]

    def layer_bottoms(self, name: str) -> list[str]:
        return self._step(name).bottoms

    def layer_tops(self, name: str) -> list[str]:
        return self._step(name).tops

    def _step(self, name: str) -> _Step:
        return self._steps[self.layer_index(name)]

    # ---- weights ------------------------------------------------------------------------------
    def to_proto(self, with_diff: bool = False):
        """The net as Caffe's ToProto writes it: every layer (Splits included), with its blobs."""
        from rloss.proto.blob import array_to_blob

        out = caffe_pb2.NetParameter(name=self.name)
        out.input.extend(self.inputs)
        for _name, shape in self.inputs.items():
            out.input_shape.add().dim.extend(shape)
        for step in self._steps:
            layer_param = out.layer.add()
            layer_param.CopyFrom(step.layer.param)
            del layer_param.blobs[:]
            for blob in step.layer.blobs:
                diff = _diff_array(blob) if with_diff else None
                layer_param.blobs.append(array_to_blob(blob.detach().cpu().numpy(), diff))
        return out

    def save(self, path: str | Path, with_diff: bool = False) -> None:
        """Write the weights as a binary .caffemodel (atomically)."""
        from rloss.io import write_message_atomic

        write_message_atomic(self.to_proto(with_diff), str(path))

    def save_hdf5(self, path: str | Path, with_diff: bool = False) -> None:
        """Write the weights as Caffe's HDF5 model (atomically): each blob under the first layer that has it."""
        from rloss.io import write_hdf5_model

        owned: set[int] = set()
        layers: dict[str, list] = {}
        for layer in self.layers:
            blobs = layers.setdefault(layer.name, [])
            for index, blob in enumerate(layer.blobs):
                if id(blob) in owned:
                    continue
                owned.add(id(blob))
                blobs.append((index, blob.detach().cpu().numpy(), _diff_array(blob) if with_diff else None))
        write_hdf5_model(layers, str(path), with_diff)

    def copy_from(self, source, hdf5: bool | None = None) -> None:
        """Copy weights from a .caffemodel path (or a NetParameter) into layers of the same name, as
        Caffe's CopyTrainedLayersFrom does: unknown source layers are skipped with a log line. A path
        is a Caffe HDF5 model when its name ends in .h5, or with `hdf5` (pycaffe's load_hdf5)."""
        from rloss.io import read_net_param
        from rloss.proto.blob import blob_shape, blob_to_array, legacy_shape_matches

        where = str(source) if isinstance(source, (str, Path)) else "<weights>"
        from_h5 = where.endswith(".h5") if hdf5 is None else hdf5  # HDF5 models may omit trailing and shared blobs
        if isinstance(source, (str, Path)):
            net_param = read_net_param(where, hdf5=from_h5)
        else:
            net_param = source
        by_name: dict[str, Layer] = {}
        for step in self._steps:
            by_name.setdefault(step.layer.name, step.layer)
        borrowed = self._borrowed_blobs()
        for source_layer in net_param.layer:
            target = by_name.get(source_layer.name)
            if target is None:
                log.info("Ignoring source layer %s", source_layer.name)
                continue
            count, wanted = len(source_layer.blobs), len(target.blobs)
            if count != wanted and not (from_h5 and count < wanted):
                raise NetError(
                    f"{where}: layer '{source_layer.name}' has {len(source_layer.blobs)} blobs in the file, "
                    f"{len(target.blobs)} in the net {self.source}"
                )
            for j in range(wanted):  # count == wanted, or an HDF5 file that omits some
                blob = source_layer.blobs[j] if j < count else caffe_pb2.BlobProto()
                if from_h5 and not blob.shape.dim and not blob.data:
                    if (id(target), j) in borrowed:
                        continue  # a shared blob, stored with its owner
                    raise NetError(f"{where}: layer '{source_layer.name}' blob {j} is not in the file, and the net "
                                   f"{self.source} does not share it with an earlier layer (Caffe: incompatible "
                                   "number of blobs)")
                shape = tuple(target.blobs[j].shape)
                if not legacy_shape_matches(blob, shape):
                    raise NetError(
                        f"{where}: layer '{source_layer.name}' blob {j} has shape {blob_shape(blob)} in the file, "
                        f"{shape} in the net {self.source}"
                    )
                values = blob_to_array(blob, f"{where}: layer '{source_layer.name}' blob {j}")
                with torch.no_grad():
                    target.blobs[j].copy_(torch.from_numpy(values.reshape(shape)))

    def _borrowed_blobs(self) -> set[tuple[int, int]]:
        """(id of the layer, blob index) of each blob a layer shares with an earlier one (Caffe's
        param_owners_ != -1): only those may be absent from an HDF5 model, which stores them with
        their owner."""
        seen: set[int] = set()
        borrowed = set()
        for step in self._steps:
            blobs = step.layer.blobs
            borrowed.update((id(step.layer), j) for j, blob in enumerate(blobs) if id(blob) in seen)
            seen.update(id(blob) for blob in blobs)
        return borrowed

    def share_trained_layers_with(self, source: Net) -> None:
        """Caffe's ShareTrainedLayersWith: a layer named like one of `source`'s uses its parameters."""
        by_name = {}
        for layer in source.layers:
            by_name.setdefault(layer.name, layer)
        for layer in self.layers:
            owner = by_name.get(layer.name)
            if owner is None or not len(owner.blobs):
                continue
            if len(owner.blobs) != len(layer.blobs):
                raise NetError(f"layer '{layer.name}': {len(layer.blobs)} parameter blobs in the test net "
                               f"{self.source}, {len(owner.blobs)} in the train net")
            for j, blob in enumerate(owner.blobs):
                if tuple(blob.shape) != tuple(layer.blobs[j].shape):
                    raise NetError(f"layer '{layer.name}' blob {j}: shape {tuple(layer.blobs[j].shape)} in the "
                                   f"test net {self.source}, {tuple(blob.shape)} in the train net")
                if layer.blobs[j] is not blob:
                    layer.blobs[j] = blob
            self.params[layer.name] = list(layer.blobs)

    def learnable_tensors(self) -> Iterable[nn.Parameter]:
        return (entry.tensor for entry in self.learnable)

    # ---- data positions (exact resume) --------------------------------------------------------
    def data_layers(self) -> list[Layer]:
        """The layers that walk a dataset and can save their position (`has_data_state`)."""
        return [layer for layer in self.layers if getattr(layer, "has_data_state", False)]

    def data_states(self) -> list:
        """A DataLayerState per data layer, in net order: where each stands after the batches consumed."""
        return [layer.data_state() for layer in self.data_layers()]

    def load_data_states(self, states: Sequence, where: str) -> None:
        """Continue each data layer from the saved state of its name (layers of one name pair in order).
        A state that fits no data layer of this net is a WeightsError; a data layer without a state
        starts from its beginning, with a warning."""
        free: dict[str, list[Layer]] = {}
        for layer in self.data_layers():
            free.setdefault(layer.name, []).append(layer)
        for state in states:
            layer = self._data_layer_for(state, free, where)
            try:
                layer.load_data_state(state)
            except WeightsError as error:
                raise WeightsError(f"{where}: {error}") from None
        for name, layers in free.items():
            for layer in layers:
                log.warning("%s holds no data state for layer '%s' (type %s): it starts from the beginning of "
                            "its data", where, name, layer.type_name)

    def _data_layer_for(self, state, free: dict[str, list[Layer]], where: str) -> Layer:
        """The next unrestored data layer named like `state`, checked to be of its type."""
        misfit = f"{where}: the saved data state of layer '{state.name}' (type {state.type}) does not fit net " \
                 f"'{self.name}' ({self.source})"
        candidates = free.get(state.name)
        if candidates:
            layer = candidates.pop(0)
            if layer.type_name != state.type:
                raise WeightsError(f"{misfit}: its layer '{layer.name}' is of type {layer.type_name}")
            return layer
        types = [layer.type_name for layer in self.layers if layer.name == state.name]
        if not types:
            raise WeightsError(f"{misfit}: the net has no layer of that name")
        if state.name in free:
            raise WeightsError(f"{misfit}: the state names more data layers '{state.name}' than the net has")
        raise WeightsError(f"{misfit}: its layer of that name is of type {types[0]}, which has no data state")


def _checkpoint_plan(steps: list[_Step], outputs: Sequence[str]) -> list[_Step | _Segment]:
    """The steps, with each run of checkpointable layers cut into segments of about sqrt(layers)
    layers (the classic memory/recompute balance); data layers, loss layers and layers that change
    state in forward stay outside, and a one-layer piece runs as it is (checkpointing it saves nothing)."""
    size = max(2, round(math.sqrt(len(steps))))
    groups: list[list[_Step]] = []
    for eligible, run in itertools.groupby(steps, key=_checkpointable):
        run = list(run)
        if eligible:
            groups.extend(run[i:i + size] for i in range(0, len(run), size))
        else:
            groups.extend([step] for step in run)
    plan: list[_Step | _Segment] = []
    needed = set(outputs)  # blobs read after the group being planned (planned last to first)
    for group in reversed(groups):
        plan.append(_segment(group, needed) if len(group) > 1 else group[0])
        needed.update(bottom for step in group for bottom in step.bottoms)
    return plan[::-1]


def _checkpointable(step: _Step) -> bool:
    return bool(step.bottoms) and not step.loss_tops and step.layer.recomputable


def _segment(steps: list[_Step], needed: set[str]) -> _Segment:
    """A segment of `steps`: it reads the blobs they take from before it, and gives back the blobs
    they make that are in `needed`."""
    inputs: dict[str, None] = {}  # insertion-ordered sets
    made: dict[str, None] = {}
    for step in steps:
        inputs.update((bottom, None) for bottom in step.bottoms if bottom not in made)
        made.update((top, None) for top in step.tops)
    return _Segment(steps, list(inputs), [name for name in made if name in needed])


def _diff_array(blob: nn.Parameter):
    """A parameter's diff as saved: its gradient, or zeros where backward left none (as Caffe's)."""
    return (blob.grad if blob.grad is not None else torch.zeros_like(blob)).detach().cpu().numpy()
