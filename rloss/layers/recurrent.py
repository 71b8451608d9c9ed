"""Caffe's recurrent layers, RNN and LSTM, computed step by step over time.

Caffe builds an unrolled net of InnerProduct, Scale, Eltwise and LSTMUnit layers inside the layer;
here the same arithmetic runs as a loop over the T timesteps. What must match Caffe exactly:

- bottoms x (T, N, ...), cont (T, N), optionally x_static (N, ...), then with
  `recurrent_param { expose_hidden: true }` the initial states (h_0, and c_0 for LSTM), each (1, N, H);
  tops: the sequence output (T, N, H), then with expose_hidden the final states h_T (and c_T).
- the parameter blobs in the order the unrolled net creates them (so a .caffemodel loads):
  W_x (G*H, K), b (G*H), W_x_static (G*H, S) when x_static is given, W_h (G*H, H), then the RNN's
  W_ho (H, H) and b_o (H); G is 1 for the RNN and 4 for the LSTM, whose gates are stacked i, f, o, g.
- cont_t multiplies h_{t-1} before the recurrent product (0 starts a new sequence), and in the LSTM
  also the forget gate.
- without expose_hidden the state carries over from one forward to the next (Caffe copies h_T into
  h_0 before each forward; the gradient never crosses batches); with it, h_0/c_0 are data only and
  h_T/c_T carry no gradient, because Caffe shares only their data with the unrolled net.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from rloss.layers.base import Layer, Shape
from rloss.layers.registry import register_layer
from rloss.layers.vision import optional_filler


class _ContinuedForgetGate(torch.autograd.Function):
    """LSTMUnit's forget gate f = cont * sigmoid(x), exactly 0 where cont is 0, with Caffe's backward
    df/dx = f (1 - f): the sigmoid's derivative evaluated at the gated f. For a 0/1 cont that is the
    true derivative; for a fractional cont Caffe's gradient differs from autograd's, so it is kept."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cont: torch.Tensor) -> torch.Tensor:
        gate = (cont * torch.sigmoid(x)).masked_fill(cont == 0, 0.0)
        ctx.save_for_backward(gate)
        return gate

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (gate,) = ctx.saved_tensors
        return grad * gate * (1 - gate), None


class _Recurrent(Layer):
    """What RNN and LSTM share: parameters, bottom/top checks, the input transform and the state.

    Subclasses set `states` (names of the recurrent states), `gates` (G) and implement `unroll`."""

    no_gradient_bottoms = (1,)  # cont: Caffe refuses to backpropagate to the sequence indicators
    states: ClassVar[tuple[str, ...]] = ()
    gates: ClassVar[int] = 1

    def setup(self, bottom_shapes: list[Shape]) -> None:
        rp = self.param.recurrent_param
        self.num_output = int(rp.num_output)
        if self.num_output <= 0:
            raise self.error(f"recurrent_param.num_output must be > 0, got {self.num_output}")
        self.expose_hidden = bool(rp.expose_hidden)
        exposed = len(self.states) if self.expose_hidden else 0
        self._check_count("bottom", len(bottom_shapes), (2 + exposed, 3 + exposed))
        self._check_count("top", len(self.param.top), (1 + exposed, 1 + exposed))
        if len(self.param.propagate_down) > 1 and self.param.propagate_down[1]:
            raise self.error("cannot backpropagate to the sequence indicators cont (bottom 1); "
                             "set its propagate_down: false")
        self.static_input = len(bottom_shapes) > 2 + exposed
        self._check_axes(bottom_shapes)
        self.timesteps = bottom_shapes[0][0]
        if self.timesteps < 1:
            raise self.error(f"x (bottom 0) needs at least 1 timestep, got shape {bottom_shapes[0]}")
        self.inputs = math.prod(bottom_shapes[0][2:])
        self.static_inputs = math.prod(bottom_shapes[2][1:]) if self.static_input else 0
        self._add_blobs(optional_filler(rp, "weight_filler"), optional_filler(rp, "bias_filler"))
        # Caffe's unrolled net starts with zero states; with expose_hidden the bottoms give them instead
        carried_shape = (len(self.states), bottom_shapes[0][1], self.num_output)
        self.check_shape(carried_shape, "the carried state")
        self.register_buffer("carried", torch.zeros(carried_shape), persistent=False)
        self.recomputable = self.expose_hidden  # otherwise forward advances the carried state

    def _add_blobs(self, weight_filler, bias_filler) -> None:
        """The blobs in the unrolled net's order: input weights and bias, static weights, recurrent weights."""
        width = self.gates * self.num_output
        self.add_blob((width, self.inputs), weight_filler)
        self.add_blob((width,), bias_filler)
        if self.static_input:
            self.add_blob((width, self.static_inputs), weight_filler)
        self.add_blob((width, self.num_output), weight_filler)

    def _check_axes(self, bottom_shapes: list[Shape]) -> None:
        """x is transformed by an InnerProduct from axis 2 and x_static from axis 1: they need those axes."""
        if len(bottom_shapes[0]) < 3:
            raise self.error(f"x (bottom 0) must have at least 3 axes (T, N, features...), got shape "
                             f"{bottom_shapes[0]}")
        if self.static_input and len(bottom_shapes[2]) < 2:
            raise self.error(f"x_static (bottom 2) must have at least 2 axes (N, features...), got shape "
                             f"{bottom_shapes[2]}")

    def reshape(self, bottom_shapes: list[Shape]) -> list[Shape]:
        self._check_axes(bottom_shapes)
        x, cont = bottom_shapes[0], bottom_shapes[1]
        steps, streams = x[0], x[1]
        if steps != self.timesteps:
            raise self.error(f"x (bottom 0) has {steps} timesteps, the layer was set up with {self.timesteps} "
                             f"(Caffe fixes T at setup)")
        if math.prod(x[2:]) != self.inputs:
            raise self.error(f"x (bottom 0) of shape {x} has {math.prod(x[2:])} features per step, the weights "
                             f"expect {self.inputs}")
        if cont != (steps, streams):
            raise self.error(f"cont (bottom 1) must be (T, N) = {(steps, streams)} as x {x}, got shape {cont}")
        if self.static_input:
            static = bottom_shapes[2]
            if static[0] != streams or math.prod(static[1:]) != self.static_inputs:
                raise self.error(f"x_static (bottom 2) of shape {static} must have N = {streams} items of "
                                 f"{self.static_inputs} features")
        state_shape = (1, streams, self.num_output)
        first_state = 2 + self.static_input
        for index, name in enumerate(self.states if self.expose_hidden else ()):
            given = bottom_shapes[first_state + index]
            if given != state_shape:
                raise self.error(f"{name}_0 (bottom {first_state + index}) must be (1, N, num_output) = "
                                 f"{state_shape}, got shape {given}")
        exposed = len(self.states) if self.expose_hidden else 0
        return [(steps, streams, self.num_output)] + [state_shape] * exposed

    def forward(self, *bottoms: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        self.reshape([tuple(b.shape) for b in bottoms])
        x, cont = bottoms[0], bottoms[1]
        steps, streams = x.shape[0], x.shape[1]
        static = bottoms[2] if self.static_input else None
        drive = self._input_drive(x.reshape(steps, streams, self.inputs), static)
        cont = cont.to(x.dtype).reshape(steps, streams, 1)
        top, final = self.unroll(drive, cont, self._initial_states(bottoms, x))
        if self.expose_hidden:
            return [top] + [state.detach().reshape(1, streams, self.num_output) for state in final]
        self.carried = torch.stack([state.detach() for state in final]).to(self.carried.dtype)
        return [top]

    def _input_drive(self, x: torch.Tensor, static: torch.Tensor | None) -> torch.Tensor:
        """W_x x_t + b (+ W_x_static x_static) for all steps: (T, N, G*H), the part of each step's
        pre-activation that does not depend on the state."""
        drive = F.linear(x, self.blobs[0], self.blobs[1])
        if static is not None:
            drive = drive + F.linear(static.reshape(static.shape[0], self.static_inputs), self.blobs[2])
        return drive

    def _initial_states(self, bottoms: tuple[torch.Tensor, ...], x: torch.Tensor) -> list[torch.Tensor]:
        """Each state at t = 0 as (N, H): the exposed bottoms (data only), else the last forward's final
        state; zeros when N changed (Caffe's blob would hold stale memory then)."""
        streams = x.shape[1]
        if self.expose_hidden:
            given = bottoms[2 + self.static_input:]
            return [state.detach().reshape(streams, self.num_output) for state in given]
        if self.carried.shape[1] != streams:
            return list(self.carried.new_zeros(len(self.states), streams, self.num_output))
        return list(self.carried)

    def recurrent_weight(self) -> torch.Tensor:
        """W_h, which multiplies cont_t * h_{t-1} (found by index: a shared param replaces the blob)."""
        return self.blobs[2 + self.static_input]

    def unroll(self, drive: torch.Tensor, cont: torch.Tensor,
               states: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The top (T, N, H) and the final states (N, H) from the input drive (T, N, G*H), cont (T, N, 1)
        and the initial states."""
        raise NotImplementedError


@register_layer("RNN")
class RNN(_Recurrent):
    """Elman RNN: h_t = tanh(W_hh (cont_t h_{t-1}) + W_xh x_t + b_h [+ W_xh_static x_static]) and the
    output o_t = tanh(W_ho h_t + b_o); the top is o, the exposed state h_T."""

    bottoms = (2, 4)
    tops = (1, 2)
    states = ("h",)
    gates = 1

    def _add_blobs(self, weight_filler, bias_filler) -> None:
        super()._add_blobs(weight_filler, bias_filler)
        self.add_blob((self.num_output, self.num_output), weight_filler)  # W_ho
        self.add_blob((self.num_output,), bias_filler)  # b_o

    def unroll(self, drive: torch.Tensor, cont: torch.Tensor,
               states: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        (hidden,) = states
        weight = self.recurrent_weight()
        hiddens = []
        for step in range(drive.shape[0]):
            hidden = torch.tanh(F.linear(cont[step] * hidden, weight) + drive[step])
            hiddens.append(hidden)
        output = torch.tanh(F.linear(torch.stack(hiddens), self.blobs[-2], self.blobs[-1]))
        return output, [hidden]


@register_layer("LSTM")
class LSTM(_Recurrent):
    """LSTM with Caffe's LSTMUnit: gates (i, f, o, g) = W_hc (cont_t h_{t-1}) + W_xc x_t + b_c
    [+ W_xc_static x_static]; c_t = cont_t sigmoid(f) c_{t-1} + sigmoid(i) tanh(g),
    h_t = sigmoid(o) tanh(c_t); the top is h, the exposed states h_T and c_T."""

    bottoms = (2, 5)
    tops = (1, 3)
    states = ("h", "c")
    gates = 4

    def unroll(self, drive: torch.Tensor, cont: torch.Tensor,
               states: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        hidden, cell = states
        weight = self.recurrent_weight()
        hiddens = []
        for step in range(drive.shape[0]):
            pre = F.linear(cont[step] * hidden, weight) + drive[step]
            i, f, o, g = pre.chunk(4, dim=-1)
            forget = _ContinuedForgetGate.apply(f, cont[step])
            cell = forget * cell + torch.sigmoid(i) * torch.tanh(g)
            hidden = torch.sigmoid(o) * torch.tanh(cell)
            hiddens.append(hidden)
        return torch.stack(hiddens), [hidden, cell]
