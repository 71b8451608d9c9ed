"""The protobuf runtime's API differences across the versions rloss supports (3.20 to 7), in one place.

Every other module asks these helpers instead of testing the runtime's version or attributes itself.
"""

from __future__ import annotations

from google.protobuf import message_factory


def is_repeated(field) -> bool:
    """Whether a FieldDescriptor is repeated: protobuf 7 dropped `label`, older releases (5.29 among them) lack
    `is_repeated`."""
    if hasattr(field, "is_repeated"):
        return bool(field.is_repeated)
    return field.label == field.LABEL_REPEATED


def message_class(descriptor, pool):
    """The concrete message class of `descriptor` (a descriptor of `pool`); `GetPrototype` before 4.21."""
    if hasattr(message_factory, "GetMessageClass"):
        return message_factory.GetMessageClass(descriptor)
    return message_factory.MessageFactory(pool).GetPrototype(descriptor)


def has_unknown_fields(message) -> bool:
    """Whether the top level of `message` kept fields its schema does not know; before 4.21 the message
    itself holds them, later releases keep them in `unknown_fields.UnknownFieldSet`."""
    try:
        from google.protobuf import unknown_fields
    except ImportError:
        return len(message.UnknownFields()) > 0
    return len(unknown_fields.UnknownFieldSet(message)) > 0
