"""Caffe layers, one class per type, found by name through the registry.

Importing this package imports every family module, which registers its classes.
"""

from rloss.layers import activation, crf, data, image_data, loss, structure, vision  # noqa: F401
from rloss.layers.base import Layer
from rloss.layers.registry import layer_class, layer_types, register_layer

__all__ = ["Layer", "layer_class", "layer_types", "register_layer"]
