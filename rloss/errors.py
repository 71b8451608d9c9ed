"""rloss's own exception types: every user-facing failure is one of these, with a message that says
which file, line or layer is wrong and how."""


class RlossError(Exception):
    """Base of all rloss errors."""


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


class WeightsError(RlossError):
    """A .caffemodel or .solverstate that is corrupt, truncated or does not fit the net."""


class SolverError(RlossError):
    """A solver configuration or run that cannot go on (bad policy, NaN loss, unwritable snapshot)."""


class DataError(RlossError):
    """A list file, image or label that cannot be used (names the file and the list line)."""


class LatticeError(RlossError):
    """Bad input to the permutohedral lattice (shapes, non-finite values, sigmas)."""
