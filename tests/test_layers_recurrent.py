"""RNN and LSTM: forward against a numpy transcription of Caffe's unrolled nets (cont resets inside
sequences, x_static, expose_hidden), the state carried between forwards, the blob order and shapes
a .caffemodel has, float64 gradchecks, Caffe's forget-gate backward for a fractional cont, the
errors, and an LSTM inside a Net built from prototxt text."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from google.protobuf import text_format

from rloss.errors import LayerError
from rloss.layers import layer_class
from rloss.net import Net
from rloss.proto import caffe_pb2
from rloss.proto.blob import array_to_blob
from tests.helpers import layer_from_text, relative_error

FILLERS = 'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "uniform" min: -0.5 max: 0.5 }'
STEPS, STREAMS, HIDDEN = 5, 3, 4
X_SHAPE = (STEPS, STREAMS, 2, 3)
STATIC_SHAPE = (STREAMS, 2, 2)
# a 0 starts a new sequence: here at t = 0 and again inside every stream
CONT = np.array([[0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 0]], dtype=np.float32)
STATES = {"RNN": ("h",), "LSTM": ("h", "c")}


def recurrent(kind: str, extra: str = "", num_output: int = HIDDEN, expose: bool = False) -> str:
    exposed = " expose_hidden: true" if expose else ""
    tops = "".join(f' top: "{s}_T"' for s in STATES[kind]) if expose else ""
    return (f'name: "rec" type: "{kind}" bottom: "x" bottom: "cont" top: "y"{tops} {extra} '
            f"recurrent_param {{ num_output: {num_output}{exposed} {FILLERS} }}")


def bottom_shapes(kind: str, static: bool, expose: bool, x_shape=X_SHAPE) -> list[tuple[int, ...]]:
    shapes = [x_shape, x_shape[:2]]
    if static:
        shapes.append((x_shape[1], *STATIC_SHAPE[1:]))
    if expose:
        shapes += [(1, x_shape[1], HIDDEN)] * len(STATES[kind])
    return shapes


def sigmoid(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-v))


def named_blobs(kind: str, blobs, static: bool) -> dict[str, np.ndarray]:
    """The layer's blobs under the names Caffe's unrolled net gives them, in Caffe's order."""
    prefix = "xh" if kind == "RNN" else "xc"
    names = [f"W_{prefix}", "b_h" if kind == "RNN" else "b_c"]
    names += [f"W_{prefix}_static"] if static else []
    names += ["W_hh", "W_ho", "b_o"] if kind == "RNN" else ["W_hc"]
    assert len(blobs) == len(names)
    return {name: np.asarray(blob.detach().numpy() if isinstance(blob, torch.Tensor) else blob, np.float64)
            for name, blob in zip(names, blobs)}


def caffe_rnn(w, x, cont, static=None, h0=None):
    """Caffe's unrolled RNN, stream by stream: h_conted = cont_t h_{t-1} (Scale), h_t = tanh(W_hh h_conted
    + W_xh x_t + b_h [+ W_xh_static x_static]) (InnerProduct, Eltwise, TanH), o_t = tanh(W_ho h_t + b_o)."""
    steps, streams = cont.shape
    hidden = w["b_h"].shape[0]
    h = np.zeros((streams, hidden)) if h0 is None else np.array(h0[0], np.float64)
    out = np.zeros((steps, streams, hidden))
    for t in range(steps):
        for n in range(streams):
            pre = w["W_hh"] @ (cont[t, n] * h[n]) + w["W_xh"] @ x[t, n].ravel() + w["b_h"]
            if static is not None:
                pre = pre + w["W_xh_static"] @ static[n].ravel()
            h[n] = np.tanh(pre)
            out[t, n] = np.tanh(w["W_ho"] @ h[n] + w["b_o"])
    return out, [h[None]]


def caffe_lstm(w, x, cont, static=None, h0=None, c0=None):
    """Caffe's unrolled LSTM, stream by stream, with LSTMUnit's gate order i, f, o, g and its forget
    gate f = 0 if cont == 0 else cont * sigmoid(f')."""
    steps, streams = cont.shape
    hidden = w["W_hc"].shape[1]
    h = np.zeros((streams, hidden)) if h0 is None else np.array(h0[0], np.float64)
    c = np.zeros((streams, hidden)) if c0 is None else np.array(c0[0], np.float64)
    out = np.zeros((steps, streams, hidden))
    for t in range(steps):
        for n in range(streams):
            gate = w["W_hc"] @ (cont[t, n] * h[n]) + w["W_xc"] @ x[t, n].ravel() + w["b_c"]
            if static is not None:
                gate = gate + w["W_xc_static"] @ static[n].ravel()
            i = sigmoid(gate[:hidden])
            f = 0.0 if cont[t, n] == 0 else cont[t, n] * sigmoid(gate[hidden:2 * hidden])
            o = sigmoid(gate[2 * hidden:3 * hidden])
            g = np.tanh(gate[3 * hidden:])
            c[n] = f * c[n] + i * g
            h[n] = o * np.tanh(c[n])
            out[t, n] = h[n]
    return out, [h[None], c[None]]


REFERENCE = {"RNN": caffe_rnn, "LSTM": caffe_lstm}


def random_bottoms(kind: str, static: bool, expose: bool, seed: int = 0, cont=CONT, x_shape=X_SHAPE):
    rng = np.random.RandomState(seed)
    bottoms = [rng.randn(*x_shape).astype(np.float32), np.asarray(cont, np.float32)]
    if static:
        bottoms.append(rng.randn(x_shape[1], *STATIC_SHAPE[1:]).astype(np.float32))
    if expose:
        bottoms += [rng.randn(1, x_shape[1], HIDDEN).astype(np.float32) for _ in STATES[kind]]
    return bottoms


def reference(kind: str, layer, bottoms, static: bool, expose: bool):
    w = named_blobs(kind, layer.blobs, static)
    extra = {"static": bottoms[2] if static else None}
    if expose:
        extra.update(zip(("h0", "c0"), bottoms[2 + static:]))
    return REFERENCE[kind](w, bottoms[0].astype(np.float64), bottoms[1], **extra)


# ---- forward ------------------------------------------------------------------------------------


@pytest.mark.parametrize("expose", [False, True])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("kind", ["RNN", "LSTM"])
def test_forward_matches_caffes_unrolled_net(kind: str, static: bool, expose: bool) -> None:
    torch.manual_seed(3)
    layer = layer_from_text(recurrent(kind, expose=expose), bottom_shapes(kind, static, expose))
    bottoms = random_bottoms(kind, static, expose)
    expected_top, expected_states = reference(kind, layer, bottoms, static, expose)
    tops = layer(*[torch.from_numpy(b) for b in bottoms])
    state_shapes = [(1, STREAMS, HIDDEN)] * len(STATES[kind]) if expose else []
    assert layer.top_shapes == [(STEPS, STREAMS, HIDDEN)] + state_shapes
    assert len(tops) == 1 + len(state_shapes)
    assert relative_error(tops[0], expected_top) < 1e-5
    for top, expected in zip(tops[1:], expected_states):
        assert relative_error(top, expected) < 1e-5


@pytest.mark.parametrize("kind", ["RNN", "LSTM"])
def test_state_carries_over_between_forwards_as_caffe_copies_h_T_into_h_0(kind: str) -> None:
    """Caffe's TestForward: a whole sequence in one forward equals it fed one step per forward; with
    cont 0 at every step the steps after the first differ. A new N starts from zeros."""
    torch.manual_seed(4)
    cont = np.ones((STEPS, STREAMS), np.float32)
    cont[0] = 0
    x = np.random.RandomState(5).randn(*X_SHAPE).astype(np.float32)
    whole = layer_from_text(recurrent(kind), bottom_shapes(kind, False, False))
    (expected,) = whole(torch.from_numpy(x), torch.from_numpy(cont))
    for restart, same_after_first in ((1.0, True), (0.0, False)):
        stepwise = layer_from_text(recurrent(kind), bottom_shapes(kind, False, False, x_shape=(1, *X_SHAPE[1:])))
        stepwise.load_state_dict(whole.state_dict())
        for t in range(STEPS):
            step_cont = torch.full((1, STREAMS), restart if t else 0.0)
            (y,) = stepwise(torch.from_numpy(x[t:t + 1]), step_cont)
            close = torch.allclose(y[0], expected[t], atol=1e-6)
            assert close == (same_after_first or t == 0), (restart, t)
    fewer = torch.from_numpy(x[:1, :2])
    (carried,) = stepwise(fewer, torch.ones(1, 2))
    (fresh,) = stepwise(fewer, torch.zeros(1, 2))
    assert torch.equal(carried, fresh), "a changed N starts from zero states"


@pytest.mark.parametrize("kind", ["RNN", "LSTM"])
def test_exposed_final_states_fed_back_continue_the_sequence(kind: str) -> None:
    torch.manual_seed(6)
    static, half = False, STEPS - 2
    bottoms = random_bottoms(kind, static, expose=True, seed=7)
    x, cont, *initial = [torch.from_numpy(b) for b in bottoms]
    whole = layer_from_text(recurrent(kind, expose=True), bottom_shapes(kind, static, True))
    top, *final = whole(x, cont, *initial)
    first = layer_from_text(recurrent(kind, expose=True), bottom_shapes(kind, static, True, (half, *X_SHAPE[1:])))
    second = layer_from_text(recurrent(kind, expose=True),
                             bottom_shapes(kind, static, True, (STEPS - half, *X_SHAPE[1:])))
    first.load_state_dict(whole.state_dict())
    second.load_state_dict(whole.state_dict())
    top1, *middle = first(x[:half], cont[:half], *initial)
    top2, *final2 = second(x[half:], cont[half:], *middle)
    assert torch.allclose(torch.cat([top1, top2]), top, atol=1e-6)
    for a, b in zip(final, final2):
        assert torch.allclose(a, b, atol=1e-6)
    last = final[0][0]
    if kind == "RNN":  # the top is the output o_t = tanh(W_ho h_t + b_o), not h_t
        last = torch.tanh(F.linear(last, whole.blobs[-2], whole.blobs[-1]))
    assert torch.allclose(last, top[-1], atol=1e-6)


# ---- blobs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "static", "shapes"),
    [
        ("RNN", False, [(4, 12), (4,), (4, 4), (4, 4), (4,)]),
        ("RNN", True, [(4, 12), (4,), (4, 6), (4, 4), (4, 4), (4,)]),
        ("LSTM", False, [(16, 12), (16,), (16, 4)]),
        ("LSTM", True, [(16, 12), (16,), (16, 6), (16, 4)]),
    ],
)
def test_blobs_have_caffes_order_shapes_and_fillers(kind: str, static: bool, shapes) -> None:
    text = (f'type: "{kind}" bottom: "x" bottom: "c" top: "y" recurrent_param {{ num_output: 4 '
            'weight_filler { type: "constant" value: 2 } bias_filler { type: "constant" value: 3 } }')
    layer = layer_from_text(text, [(2, 3, 4, 3), (2, 3)] + ([(3, 2, 3)] if static else []))
    assert [tuple(b.shape) for b in layer.blobs] == shapes
    for blob in layer.blobs:
        assert bool((blob == (3.0 if blob.dim() == 1 else 2.0)).all()), "weights from weight_filler, biases bias_filler"


@pytest.mark.parametrize("kind", ["RNN", "LSTM"])
def test_blobs_load_from_a_caffemodel_in_caffes_order(kind: str) -> None:
    shapes = bottom_shapes(kind, True, False)
    donor = layer_from_text(recurrent(kind), shapes)
    rng = np.random.RandomState(8)
    stored = [rng.uniform(-0.5, 0.5, tuple(b.shape)).astype(np.float32) for b in donor.blobs]
    param = text_format.Parse(recurrent(kind), caffe_pb2.LayerParameter())
    param.blobs.extend(array_to_blob(a) for a in stored)
    layer = type(donor)(param, shapes)
    bottoms = random_bottoms(kind, True, False, seed=9)
    expected, _ = REFERENCE[kind](named_blobs(kind, stored, True), bottoms[0].astype(np.float64), bottoms[1],
                                  static=bottoms[2])
    (top,) = layer(*[torch.from_numpy(b) for b in bottoms])
    assert relative_error(top, expected) < 1e-5


# ---- backward -----------------------------------------------------------------------------------


@pytest.mark.parametrize("expose", [False, True])
@pytest.mark.parametrize("kind", ["RNN", "LSTM"])
def test_gradcheck_with_resets_and_static_input(kind: str, expose: bool) -> None:
    """With a 0/1 cont, Caffe's backward (LSTMUnit's included) is the true derivative."""
    torch.manual_seed(10)
    x_shape, cont = (3, 2, 3), np.array([[0, 1], [1, 0], [0, 1]], np.float32)
    shapes = [x_shape, (3, 2), (2, 2)] + ([(1, 2, HIDDEN)] * len(STATES[kind]) if expose else [])
    layer = layer_from_text(recurrent(kind, expose=expose), shapes).double()
    rng = np.random.RandomState(11)
    x, static = (torch.from_numpy(rng.randn(*s)).requires_grad_(True) for s in (x_shape, (2, 2)))
    states = [torch.from_numpy(rng.randn(1, 2, HIDDEN)) for _ in STATES[kind]] if expose else []
    cont_t = torch.from_numpy(cont).double()

    def top(x, static, *blobs):  # gradcheck perturbs the blobs in place, which the layer reads
        layer.carried.zero_()
        return layer(x, cont_t, static, *states)[0]

    assert torch.autograd.gradcheck(top, (x, static, *layer.blobs))


@pytest.mark.parametrize("kind", ["RNN", "LSTM"])
def test_exposed_states_carry_no_gradient_as_caffe_shares_only_their_data(kind: str) -> None:
    layer = layer_from_text(recurrent(kind, expose=True), bottom_shapes(kind, False, True))
    x, cont, *initial = [torch.from_numpy(b) for b in random_bottoms(kind, False, True, seed=12)]
    initial = [s.requires_grad_(True) for s in initial]
    top, *final = layer(x.requires_grad_(True), cont, *initial)
    assert all(not state.requires_grad for state in final)
    top.sum().backward()
    assert x.grad is not None and all(state.grad is None for state in initial)


def test_lstm_forget_gate_backward_with_a_fractional_cont_is_caffes_not_the_true_derivative() -> None:
    """One step from given h_0, c_0: d sum(dh * h) / d b_c is LSTMUnit's X_diff summed over streams,
    with its f_diff = c_term_diff * c_prev * f (1 - f) for f = cont * sigmoid(f')."""
    torch.manual_seed(13)
    cont = np.array([[0.5, 0.0, 1.0]], np.float32)
    layer = layer_from_text(recurrent("LSTM", expose=True), [(1, 3, 2, 3), (1, 3), (1, 3, HIDDEN), (1, 3, HIDDEN)])
    rng = np.random.RandomState(14)
    x, h0, c0 = rng.randn(1, 3, 2, 3), rng.randn(1, 3, HIDDEN), rng.randn(1, 3, HIDDEN)
    dh = rng.randn(1, 3, HIDDEN)
    w = named_blobs("LSTM", layer.blobs, False)
    top, _, _ = layer(*[torch.from_numpy(a.astype(np.float32)) for a in (x, cont, h0, c0)])
    top.backward(torch.from_numpy(dh.astype(np.float32)))

    expected = {"caffe": np.zeros(4 * HIDDEN), "true": np.zeros(4 * HIDDEN)}
    for n in range(3):
        gate = w["W_hc"] @ (cont[0, n] * h0[0, n]) + w["W_xc"] @ x[0, n].ravel() + w["b_c"]
        i, sf, o, g = sigmoid(gate[:4]), sigmoid(gate[4:8]), sigmoid(gate[8:12]), np.tanh(gate[12:])
        f = cont[0, n] * sf
        tanh_c = np.tanh(f * c0[0, n] + i * g)
        c_term = dh[0, n] * o * (1 - tanh_c**2)
        rest = [c_term * g * i * (1 - i), dh[0, n] * tanh_c * o * (1 - o), c_term * i * (1 - g**2)]
        for rule, df in (("caffe", f * (1 - f)), ("true", cont[0, n] * sf * (1 - sf))):
            expected[rule] += np.concatenate([rest[0], c_term * c0[0, n] * df, rest[1], rest[2]])
    assert relative_error(layer.blobs[1].grad, expected["caffe"]) < 1e-5
    assert relative_error(layer.blobs[1].grad, expected["true"]) > 1e-3, "the test tells the two rules apart"


# ---- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "text_extra", "shapes", "match"),
    [
        ("RNN", {}, [(4, 2, 3), (3, 2)], r"cont \(bottom 1\) must be \(T, N\) = \(4, 2\)"),
        ("LSTM", {}, [(4, 2, 3), (4, 3)], r"cont \(bottom 1\) must be \(T, N\) = \(4, 2\)"),
        ("LSTM", {}, [(4, 2, 3), (4, 2, 1)], r"cont \(bottom 1\) must be"),
        ("RNN", {}, [(4, 2), (4, 2)], "at least 3 axes"),
        ("LSTM", {}, [(0, 2, 3), (0, 2)], "at least 1 timestep"),
        ("RNN", {"num_output": 0}, [(4, 2, 3), (4, 2)], "num_output must be > 0, got 0"),
        ("RNN", {}, [(4, 2, 3)], "needs 2..4 bottoms, the prototxt gives 1"),
        ("RNN", {}, [(4, 2, 3), (4, 2), (2, 3), (1, 2, 4)], "needs 2..3 bottoms, the prototxt gives 4"),
        ("LSTM", {"expose": True}, [(4, 2, 3), (4, 2), (1, 2, 4)], "needs 4..5 bottoms, the prototxt gives 3"),
        ("RNN", {"expose": True, "tops": 1}, [(4, 2, 3), (4, 2), (1, 2, 4)], "needs 2 tops, the prototxt gives 1"),
        ("LSTM", {}, [(4, 2, 3), (4, 2), (3, 5)], r"x_static \(bottom 2\) of shape \(3, 5\) must have N = 2"),
        ("LSTM", {}, [(4, 2, 3), (4, 2), (2,)], r"x_static \(bottom 2\) must have at least 2 axes"),
        ("RNN", {"expose": True}, [(4, 2, 3), (4, 2), (1, 2, 5)], r"h_0 \(bottom 2\) must be .* \(1, 2, 4\)"),
        ("LSTM", {"expose": True}, [(4, 2, 3), (4, 2), (2, 2), (1, 2, 4), (2, 4)], r"c_0 \(bottom 4\) must be"),
        ("RNN", {"extra": "propagate_down: true propagate_down: true"}, [(4, 2, 3), (4, 2)],
         "cannot backpropagate to the sequence indicators"),
    ],
)
def test_errors(kind: str, text_extra: dict, shapes, match: str) -> None:
    text = recurrent(kind, extra=text_extra.get("extra", ""), num_output=text_extra.get("num_output", HIDDEN),
                     expose=text_extra.get("expose", False))
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    if "tops" in text_extra:
        del param.top[text_extra["tops"]:]
    with pytest.raises(LayerError, match=match) as info:
        layer_class(kind)(param, shapes)
    assert f"layer 'rec' (type {kind})" in str(info.value)


def test_forward_refuses_a_changed_number_of_timesteps_or_features() -> None:
    layer = layer_from_text(recurrent("LSTM"), [(4, 2, 3), (4, 2)])
    with pytest.raises(LayerError, match="has 3 timesteps, the layer was set up with 4"):
        layer(torch.zeros(3, 2, 3), torch.zeros(3, 2))
    with pytest.raises(LayerError, match="has 4 features per step, the weights expect 3"):
        layer(torch.zeros(4, 2, 4), torch.zeros(4, 2))


# ---- in a net -----------------------------------------------------------------------------------

NET = f"""
name: "seq" force_backward: true
input: "x" input_shape {{ dim: 3 dim: 2 dim: 5 }}
input: "cont" input_shape {{ dim: 3 dim: 2 }}
layer {{ name: "lstm" type: "LSTM" bottom: "x" bottom: "cont" top: "h"
         param {{ lr_mult: 1 }} param {{ lr_mult: 2 }} param {{ lr_mult: 1 }}
         recurrent_param {{ num_output: 3 {FILLERS} }} }}
layer {{ name: "loss" type: "Reduction" bottom: "h" top: "loss" loss_weight: 1
         reduction_param {{ operation: SUMSQ }} }}
"""


def test_lstm_in_a_net_from_prototxt_runs_forward_and_backward() -> None:
    torch.manual_seed(15)
    net = Net(text_format.Parse(NET, caffe_pb2.NetParameter()), caffe_pb2.TRAIN, source="seq.prototxt")
    assert [tuple(b.shape) for b in net.params["lstm"]] == [(12, 5), (12,), (12, 3)]
    x = np.random.RandomState(16).randn(3, 2, 5).astype(np.float32)
    cont = np.array([[0, 0], [1, 1], [0, 1]], np.float32)
    loss = net.forward({"x": torch.from_numpy(x), "cont": torch.from_numpy(cont)})
    expected, _ = caffe_lstm(named_blobs("LSTM", net.params["lstm"], False), x.astype(np.float64), cont)
    assert float(loss.detach()) == pytest.approx(float((expected**2).sum()), rel=1e-5)
    loss.backward()
    for blob in net.params["lstm"]:
        assert blob.grad is not None and bool(torch.isfinite(blob.grad).all()) and float(blob.grad.abs().max()) > 0
    assert float(net.blob_diff("x").abs().max()) > 0
    assert float(net.blob_diff("cont").abs().max()) == 0, "no gradient reaches the sequence indicators"
    again = net.forward({"x": torch.from_numpy(x), "cont": torch.from_numpy(cont)})
    assert float(again.detach()) == pytest.approx(float(loss.detach()), rel=1e-6), "cont 0 at t = 0 resets"
    carried = net.forward({"x": torch.from_numpy(x), "cont": torch.ones(3, 2)})
    restarted = caffe_lstm(named_blobs("LSTM", net.params["lstm"], False), x.astype(np.float64), np.ones((3, 2)))
    assert float(carried.detach()) != pytest.approx(float((restarted[0] ** 2).sum()), rel=1e-4), "state carried over"
