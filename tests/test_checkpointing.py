"""Activation checkpointing (`Net.checkpoint_activations`): the same loss, gradients and generator
state as without it (in-place tops, Dropout, Split fan-out, the DenseCRF loss), fewer bytes saved for
backward, and the layers it must leave alone."""

from __future__ import annotations

import logging

import torch
from google.protobuf import text_format

from rloss.net import Net, _Segment
from rloss.proto import caffe_pb2

HEAD = """name: "c" input: "data" input_shape { dim: 2 dim: 3 dim: 16 dim: 16 }
input: "label" input_shape { dim: 2 dim: 1 dim: 16 dim: 16 }
"""


def conv(name: str, bottom: str, top: str = "", outputs: int = 6) -> str:
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{top or name}" '
            f'convolution_param {{ num_output: {outputs} kernel_size: 3 pad: 1 '
            f'weight_filler {{ type: "gaussian" std: 0.3 }} bias_filler {{ type: "gaussian" std: 0.1 }} }} }}\n')


def in_place(kind: str, name: str, blob: str, extra: str = "") -> str:
    return f'layer {{ name: "{name}" type: "{kind}" bottom: "{blob}" top: "{blob}" {extra} }}\n'


SEQUENTIAL = (HEAD + conv("conv1", "data") + in_place("ReLU", "relu1", "conv1")
              + 'layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" '
                'pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n'
              + in_place("Dropout", "drop1", "pool1", "dropout_param { dropout_ratio: 0.3 }")
              + conv("conv2", "pool1") + in_place("ReLU", "relu2", "conv2")
              + in_place("Dropout", "drop2", "conv2", "dropout_param { dropout_ratio: 0.5 }")
              + conv("conv3", "conv2") + in_place("ReLU", "relu3", "conv3")
              + conv("score", "conv3", outputs=3)
              + 'layer { name: "up" type: "Interp" bottom: "score" top: "up" interp_param { height: 16 width: 16 } }\n'
              + 'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "up" bottom: "label" top: "loss" }\n')

FAN_OUT = (HEAD + conv("conv1", "data") + in_place("ReLU", "relu1", "conv1")
           + conv("left", "conv1") + conv("right", "conv1")
           + 'layer { name: "sum" type: "Eltwise" bottom: "left" bottom: "right" top: "sum" }\n'
           + in_place("ReLU", "relu2", "sum") + conv("conv3", "sum") + in_place("ReLU", "relu3", "conv3")
           + conv("score", "conv3", outputs=3)
           + 'layer { name: "prob" type: "Softmax" bottom: "score" top: "prob" }\n'
           + 'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss" }\n'
           + 'layer { name: "crf" type: "DenseCRFLoss" bottom: "data" bottom: "prob" top: "crf" loss_weight: 0.01 '
             'densecrf_loss_param { bi_xy_std: 5 bi_rgb_std: 0.5 } }\n')


def build(text: str, checkpoint: bool) -> Net:
    torch.manual_seed(0)
    net = Net(text_format.Parse(text, caffe_pb2.NetParameter()), caffe_pb2.TRAIN, source="c.prototxt")
    net.checkpoint_activations = checkpoint
    return net


def feeds() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {"data": torch.randn(2, 3, 16, 16, generator=generator),
            "label": torch.randint(0, 3, (2, 1, 16, 16), generator=generator).float()}


class SavedBytes:
    """Bytes of the distinct activation storages autograd saves for backward (parameters left out)."""

    def __init__(self, net: Net):
        self.parameters = {p.untyped_storage().data_ptr() for p in net.learnable_tensors()}
        self.storages: dict[int, int] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.parameters:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def train_step(net: Net) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, int]:
    """(loss, weight gradients, generator state after the step, activation bytes saved for backward)."""
    torch.manual_seed(7)
    counter = SavedBytes(net)
    with counter.hooks:
        loss = net.forward(feeds())
    loss.backward()
    grads = [p.grad.clone() for p in net.learnable_tensors()]
    net.zero_grad(set_to_none=True)
    return loss.detach(), grads, torch.get_rng_state(), counter.total


def assert_same_step(text: str) -> tuple[int, int]:
    """Checkpointing changes nothing but memory: the same loss, gradients and generator state."""
    loss, grads, rng, plain_bytes = train_step(build(text, checkpoint=False))
    checkpointed = build(text, checkpoint=True)
    assert any(isinstance(item, _Segment) for item in checkpointed._checkpoint_plan)
    loss2, grads2, rng2, checkpointed_bytes = train_step(checkpointed)
    assert torch.equal(loss, loss2) and torch.equal(rng, rng2)
    assert len(grads) == len(grads2) and all(torch.equal(a, b) for a, b in zip(grads, grads2))
    return plain_bytes, checkpointed_bytes


def test_gradients_are_unchanged_with_in_place_tops_and_dropout() -> None:
    plain, checkpointed = assert_same_step(SEQUENTIAL)
    assert checkpointed < 0.6 * plain, (plain, checkpointed)


def test_gradients_are_unchanged_with_split_fan_out_and_the_densecrf_loss() -> None:
    plain, checkpointed = assert_same_step(FAN_OUT)
    # a shallow net: the loss layers' own saves and the three segment inputs are most of what remains
    assert checkpointed < 0.85 * plain, (plain, checkpointed)


def test_under_bf16_too() -> None:
    nets = [build(SEQUENTIAL, checkpoint) for checkpoint in (False, True)]
    for net in nets:
        net.precision = "bf16"
    (loss, grads, _, _), (loss2, grads2, _, _) = (train_step(net) for net in nets)
    assert torch.equal(loss, loss2) and all(torch.equal(a, b) for a, b in zip(grads, grads2))


def test_segments_keep_their_boundary_blobs_and_the_outputs() -> None:
    net = build(FAN_OUT, checkpoint=True)
    net.forward(feeds()).backward()
    kept = set(net.blob_data)
    assert {"loss", "crf", "prob", "label"} <= kept and not {"left", "right", "conv3"} & kept
    with torch.no_grad():  # nothing to checkpoint without a graph: every blob is there
        net.forward(feeds())
    assert set(net.blob_data) == {name for name in net.blob_shapes}


def test_pycaffe_blob_diffs_turn_it_off_with_a_log_line(caplog) -> None:
    net = build(SEQUENTIAL, checkpoint=True)
    net.keep_blob_diffs = True
    with caplog.at_level(logging.INFO, logger="rloss"):
        loss, grads, _, _ = train_step(net)
        train_step(net)
    said = [r.getMessage() for r in caplog.records if "checkpointing is off" in r.getMessage()]
    assert len(said) == 1 and "c.prototxt" in said[0]
    assert net.blob_diff("conv2").abs().sum() > 0  # every blob's diff is there, as without checkpointing
    loss2, grads2, _, _ = train_step(build(SEQUENTIAL, checkpoint=False))
    assert torch.equal(loss, loss2) and all(torch.equal(a, b) for a, b in zip(grads, grads2))


def test_layers_that_change_state_in_forward_are_run_once() -> None:
    """BatchNorm updating its statistics stays out of the segments (a recompute would update twice)."""
    updating = "batch_norm_param { use_global_stats: true update_global_stats: true }"
    text = (HEAD + conv("conv1", "data") + in_place("ReLU", "relu1", "conv1") + conv("conv2", "conv1")
            + in_place("BatchNorm", "bn", "conv2", updating)
            + conv("conv3", "conv2") + in_place("ReLU", "relu3", "conv3") + conv("score", "conv3", outputs=3)
            + 'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss" }\n')
    net = build(text, checkpoint=True)
    planned = [step.layer.name for item in net._checkpoint_plan if isinstance(item, _Segment) for step in item.steps]
    assert "bn" not in planned and {"conv1", "conv3"} <= set(planned)
    net.forward(feeds()).backward()
    assert float(net.params["bn"][2].detach()) == 1.0  # one update (s = f * 0 + 1), not two
