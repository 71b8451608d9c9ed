"""rloss's own exception types: every user-facing failure is one of these, with a message that says
which file, line or layer is wrong and how."""


MAX_MESSAGE_CHARS = 2000


def clip_message(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`message` cut to at most `limit` characters, keeping its head and its tail (where the file,
    the layer and the cause are named) around a marker saying how much was cut: a 200 KB prototxt
    line or a huge shape must not flood the terminal or the log."""
    if len(message) <= limit:
        return message
    room = limit - len(_cut_marker(len(message)))  # the marker is never longer than this one
    head, tail = room - room // 2, room // 2
    return message[:head] + _cut_marker(len(message) - head - tail) + message[len(message) - tail:]


def _cut_marker(count: int) -> str:
    return f" [... {count} characters cut ...] "


class RlossError(Exception):
    """Base of all rloss errors; a message longer than MAX_MESSAGE_CHARS is clipped (`clip_message`)."""

    def __init__(self, *args: object):
        if args and isinstance(args[0], str):
            args = (clip_message(args[0]), *args[1:])
        super().__init__(*args)


class ProtoError(RlossError):
    """A prototxt, .proto or binary protobuf file that cannot be read (names file, line, column)."""


class VariableError(ProtoError):
    """A `${VAR}` placeholder that has no value."""


class NetError(RlossError):
    """A net that cannot be built or run: wiring, phases, shapes, parameter sharing."""


class LayerError(NetError):
    """A layer that rejects its parameters or its bottoms (names the layer, its type and the shapes)."""

    def __init__(self, layer_name: str, layer_type: str, message: str):
        super().__init__(f"layer '{layer_name}' (type {layer_type}): {message}")
        self.layer_name = layer_name
        self.layer_type = layer_type
        self.message = message

    def __reduce__(self):
        """Pickled with its three parts (a rank's error crosses processes; Exception's default would
        call LayerError with the one formatted message)."""
        return type(self), (self.layer_name, self.layer_type, self.message)


class WeightsError(RlossError):
    """A .caffemodel or .solverstate that is corrupt, truncated or does not fit the net."""


class SolverError(RlossError):
    """A solver configuration or run that cannot go on (bad policy, NaN loss, unwritable snapshot)."""


class DataError(RlossError):
    """A list file, image or label that cannot be used (names the file and the list line)."""


class LatticeError(RlossError):
    """Bad input to the permutohedral lattice (shapes, non-finite values, sigmas)."""


class PrecisionError(RlossError):
    """A --precision name that is unknown, or one the device cannot run (fp16 without support)."""


class MemoryPlanError(RlossError):
    """A run whose estimated peak memory exceeds what the device or host has (says what to change)."""


class DistributedError(RlossError):
    """A data-parallel run that cannot start or go on: devices, ranks, data too small, a lost rank."""


class LogError(RlossError):
    """Training curves that cannot be had: a log without training lines, a figure format or an output
    file that cannot be written, or the optional package for drawing (matplotlib) or TensorBoard
    (tensorboard) missing."""
