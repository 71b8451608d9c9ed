"""Caffe layers, one class per type, found by name through the registry.

Importing this package imports every family module, which registers its classes.
"""

from rloss.layers import (  # noqa: F401
    activation,
    crf,
    data,
    db_data,
    gated_crf_loss,
    image_data,
    learned,
    loss,
    memory_data,
    neuron,
    normalization,
    normalized_cut_loss,
    python_layer,
    rearrange,
    recurrent,
    segnet,
    size_constraint_loss,
    spatial,
    structure,
    vector_loss,
    vision,
)
from rloss.layers.base import Layer
from rloss.layers.registry import layer_class, layer_types, register_layer

__all__ = ["Layer", "layer_class", "layer_types", "register_layer"]
