"""Which layers a net keeps for a given state (phase, level, stages): Caffe's include/exclude rules."""

from __future__ import annotations

from typing import Iterable

from rloss.errors import NetError
from rloss.proto import caffe_pb2
from rloss.proto.upgrade import copy_fields


def make_state(phase: int, level: int = 0, stages: Iterable[str] = ()):
    """A NetState for `phase` (caffe_pb2.TRAIN / TEST), `level` and `stages`."""
    state = caffe_pb2.NetState()
    state.phase = phase
    state.level = level
    state.stage.extend(stages)
    return state


def merge_state(base, phase: int | None = None, level: int | None = None, stages: Iterable[str] = ()):
    """`base` (a net's own `state`) with `phase`/`level` overriding it and `stages` appended, the way
    Caffe layers a solver's or a command line's state over the prototxt's."""
    state = caffe_pb2.NetState()
    state.CopyFrom(base)
    if phase is not None:
        state.phase = phase
    if level is not None:
        state.level = level
    state.stage.extend(stages)
    return state


def state_meets_rule(state, rule) -> bool:
    """True when every condition the rule states holds: phase, level bounds, required and
    forbidden stages (conditions absent from the rule are not checked)."""
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(stage not in stages for stage in rule.stage):
        return False
    return not any(stage in stages for stage in rule.not_stage)


def layer_included(layer, state) -> bool:
    """Caffe's rule: with include rules, kept iff one is met; otherwise kept unless an exclude rule is met."""
    if layer.include and layer.exclude:
        raise NetError(
            f"layer '{layer.name}' (type {layer.type}) has both include and exclude rules; "
            "Caffe accepts one kind or the other"
        )
    if layer.include:
        return any(state_meets_rule(state, rule) for rule in layer.include)
    return not any(state_meets_rule(state, rule) for rule in layer.exclude)


def filter_net(net_param, state):
    """A copy of the (V2) net with only the layers this state includes; everything else is kept."""
    if len(net_param.layers):
        raise NetError(f"net '{net_param.name}' still has V1 `layers` entries: upgrade it before filtering")
    filtered = caffe_pb2.NetParameter()
    copy_fields(net_param, filtered, keep=lambda name: name != "layer")
    for layer in net_param.layer:
        if layer_included(layer, state):
            filtered.layer.add().CopyFrom(layer)
    return filtered

