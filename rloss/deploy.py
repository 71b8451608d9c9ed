"""A test net file made ready to segment images from nothing but the net and its weights (`infer`).

A test prototxt names its dataset through `${VAR}`s (DATA_ROOT, LIST_DIR, TEST_SET, ...) that
segmenting new images never reads, and its class count through NUM_LABELS, whose run-script default
(PASCAL's 21) need not be the weights'. So, when reading a net for inference:

* a `${VAR}` without a value that appears only in the fields of the data layer's list
  (`source`, `root_folder`: infer lists the images itself) becomes empty; one only in the crop
  (`crop_size`, `crop_height`, `crop_width`) becomes 0: no crop, the net then runs at each image's
  size (rloss.whole_image). Any other `${VAR}` without a value is the usual error;
* each Convolution layer's `num_output` is taken from the weights where they disagree (logged);
* the net keeps only the layers the score blob needs (`score_only`: no losses, accuracies or
  MatWrite layers, which would want labels or write files);
* every layer with parameters must find them in the weights: an error names those that do not (a
  `${VAR}` in a layer name with another value than in training is the usual cause).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Mapping, Sequence

from rloss.errors import NetError
from rloss.io import read_net_param
from rloss.net import Net
from rloss.paths import resolve_net_file
from rloss.proto import caffe_pb2
from rloss.proto.blob import blob_shape
from rloss.proto.text import read_net, read_text, split_comment
from rloss.variables import variable_values

log = logging.getLogger("rloss")

LIST_FIELDS = ("source", "root_folder")  # a placeholder only there without a value becomes ""
CROP_FIELDS = ("crop_size", "crop_height", "crop_width")  # ... only there: 0, no crop
_PLACEHOLDER = re.compile(r"\$\{(\w+)\}")
_FIELD_BEFORE = re.compile(r"(\w+)\s*:\s*\"?[^\":]*$")


def placeholder_fields(text: str) -> dict[str, set[str]]:
    """{variable: the fields it appears in} over the code (not the comments) of a prototxt."""
    fields: dict[str, set[str]] = {}
    for line in text.splitlines():
        code = split_comment(line)[0]
        for match in _PLACEHOLDER.finditer(code):
            field = _FIELD_BEFORE.search(code[:match.start()])
            fields.setdefault(match.group(1), set()).add(field.group(1) if field else "")
    return fields


def unread_placeholders(text: str, values: Mapping[str, str], defaults: Mapping[str, str]) -> dict[str, set[str]]:
    """{variable: its fields} of the placeholders without a value that inference does not read: all
    their fields are list fields, or all are crop fields (module doc)."""
    unread = {}
    for name, fields in placeholder_fields(text).items():
        if name in values or name in defaults:
            continue
        if fields <= set(LIST_FIELDS) or fields <= set(CROP_FIELDS):
            unread[name] = fields
    return unread


def read_for_inference(model: str, sets: Mapping[str, str]) -> tuple[Path, caffe_pb2.NetParameter, dict[str, set[str]]]:
    """(file, TEST net, the placeholders left unset because inference does not read them, with their fields)."""
    values, defaults = variable_values(sets, Path(model))
    path = resolve_net_file(model, [], values, defaults)
    if not path.exists():
        raise NetError(f"model file '{model}' does not exist")
    unread = unread_placeholders(read_text(path), values, defaults)
    if unread:
        log.info("Not needed to segment images, left unset: %s", ", ".join(f"${{{name}}}" for name in unread))
    fills = {name: "" if fields <= set(LIST_FIELDS) else "0" for name, fields in unread.items()}
    return path, read_net(path, caffe_pb2.TEST, values={**values, **fills}, defaults=defaults), unread


def outputs_from_weights(net_param: caffe_pb2.NetParameter, weights: Sequence[caffe_pb2.NetParameter],
                         where: str) -> None:
    """Set each Convolution layer's num_output to its weights' (in place), logging each change."""
    stored = {layer.name: layer for model in weights for layer in model.layer if len(layer.blobs)}
    for layer in net_param.layer:
        source = stored.get(layer.name)
        if layer.type != "Convolution" or source is None:
            continue
        count = blob_shape(source.blobs[0])[0]
        if count != layer.convolution_param.num_output:
            log.info("%s: layer '%s' has %d outputs in the weights (%d in the net file): using %d", where,
                     layer.name, count, layer.convolution_param.num_output, count)
            layer.convolution_param.num_output = count


def score_blob_of(net_param: caffe_pb2.NetParameter, requested: str, where: str) -> str:
    """--score_blob (which some layer must make), else the scores the first SegAccuracy layer reads."""
    made = {top for layer in net_param.layer for top in layer.top} | set(net_param.input)
    if requested:
        if requested not in made:
            known = ", ".join(sorted(made))
            raise NetError(f"--score_blob={requested}: the net has no blob '{requested}' (blobs: {known})")
        return requested
    accuracy = next((layer for layer in net_param.layer if layer.type == "SegAccuracy"), None)
    if accuracy is None:
        raise NetError(f"{where}: no SegAccuracy layer names the scores; give --score_blob")
    return accuracy.bottom[0]


def score_only(net_param: caffe_pb2.NetParameter, score_blob: str) -> caffe_pb2.NetParameter:
    """A copy of the net with only the layers `score_blob` depends on, and the inputs they read."""
    needed = {score_blob}
    kept = []
    for layer in reversed(net_param.layer):
        if needed & set(layer.top):
            kept.append(layer)
            needed.update(layer.bottom)
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net_param)
    del out.layer[:], out.input[:], out.input_shape[:]
    for name, shape in zip(net_param.input, net_param.input_shape):
        if name in needed:
            out.input.append(name)
            out.input_shape.add().CopyFrom(shape)
    out.layer.extend(reversed(kept))
    return out


def check_weights_cover(net: Net, weights: Sequence[caffe_pb2.NetParameter], names: Sequence[str]) -> None:
    """Refuse a net whose layers with parameters are not all in the weights (they would stay random)."""
    stored = {layer.name for model in weights for layer in model.layer if len(layer.blobs)}
    missing = [layer.name for layer in net.layers if len(layer.blobs) and layer.name not in stored]
    if missing:
        raise NetError(f"{', '.join(names)} holds no weights for the layer(s) {', '.join(missing)} of {net.source} "
                       f"(its layers with weights: {', '.join(sorted(stored)) or 'none'}); a ${{VAR}} in a "
                       "layer name may need the value it had in training (--set VAR=VALUE)")


def load_weights(net: Net, paths: Sequence[str], weights: Sequence[caffe_pb2.NetParameter]) -> None:
    """Copy the weights into the net, after checking that they cover it."""
    check_weights_cover(net, weights, paths)
    for path in paths:
        net.copy_from(path)


def read_weights(paths: Sequence[str]) -> list[caffe_pb2.NetParameter]:
    return [read_net_param(path) for path in paths]
