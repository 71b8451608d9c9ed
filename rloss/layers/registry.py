"""Caffe layer type name -> layer class, filled by the `@register_layer` decorator in each family module."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, TypeVar

if TYPE_CHECKING:
    from rloss.layers.base import Layer

_LAYERS: dict[str, type[Layer]] = {}
L = TypeVar("L", bound="type[Layer]")


def register_layer(type_name: str) -> Callable[[L], L]:
    """Class decorator: makes the class the implementation of Caffe's layer `type_name`."""

    def decorate(cls: L) -> L:
        if type_name in _LAYERS:
            raise ValueError(f"layer type {type_name} registered twice ({_LAYERS[type_name]} and {cls})")
        cls.type_name = type_name
        _LAYERS[type_name] = cls
        return cls

    return decorate


def layer_class(type_name: str) -> type[Layer] | None:
    """The class registered for `type_name`, or None."""
    import rloss.layers  # noqa: F401  (importing the package registers every family module)

    return _LAYERS.get(type_name)


def layer_types() -> list[str]:
    """All registered type names, sorted (for error messages and docs)."""
    import rloss.layers  # noqa: F401

    return sorted(_LAYERS)
