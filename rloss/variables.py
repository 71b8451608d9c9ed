"""The values of the `${VAR}` placeholders in solver and net files: one merge, done once per command.

An explicit value (`--set VAR=VALUE`, or the `values` of the Python API) wins; then the environment,
but only for the variables of the run script (`ENVIRONMENT_VARIABLES`), so that a downloaded prototxt
cannot copy an arbitrary environment variable (a token, a home path) into the logs and the saved
models; then the run script's defaults (EXP=pascal_scribble, NUM_LABELS=21, TRAIN_SET=train,
TEST_SET=val, DENSECRF_LOSS_WEIGHT=1e-8, NET_ID = the name of the config file's directory,
FEATURE_DIR=${EXP}/features/${NET_ID}). DATA_ROOT has no default: it must be given. The values taken
from the environment are logged.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, Mapping

from rloss.errors import VariableError

log = logging.getLogger("rloss")

SCRIPT_DEFAULTS = {
    "EXP": "pascal_scribble",
    "NUM_LABELS": "21",
    "TRAIN_SET": "train",
    "TEST_SET": "val",
    "DENSECRF_LOSS_WEIGHT": "1e-8",
    "DENSECRF_SCALE": "1",
}
# The variables exper/run_pascal_scribble.sh documents and passes on: the original's sed variables,
# then the folders and the small demo net's settings.
ENVIRONMENT_VARIABLES = (
    "EXP", "NET_ID", "DATA_ROOT", "TRAIN_SET", "TEST_SET", "TEST_SET_POSTFIX", "NUM_LABELS",
    "DENSECRF_LOSS_WEIGHT", "FEATURE_DIR", "LIST_DIR", "CONFIG_DIR", "MODEL_DIR",
    "CROP_SIZE", "TEST_CROP_SIZE", "BATCH_SIZE", "BI_XY_STD", "BI_RGB_STD", "DENSECRF_SCALE",
    "MAX_ITER", "STEPSIZE", "BASE_LR", "MAX_ITER2", "STEPSIZE2", "BASE_LR2",
)


def parse_assignments(items: Iterable[str]) -> dict[str, str]:
    """`["A=1", "B=x=y"]` -> `{"A": "1", "B": "x=y"}`; a malformed item raises VariableError."""
    values: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise VariableError(f"--set '{item}': expected VAR=VALUE (for example --set DATA_ROOT=/data/voc/)")
        values[name.strip()] = value
    return values


def default_variables(config_file: Path | None, known: Mapping[str, str]) -> dict[str, str]:
    """The run script's defaults; NET_ID and FEATURE_DIR follow the config file's directory and EXP."""
    defaults = dict(SCRIPT_DEFAULTS)
    if config_file is not None:
        net_id = known.get("NET_ID") or Path(os.path.abspath(config_file)).parent.name
        defaults["NET_ID"] = net_id
        exp = known.get("EXP", defaults["EXP"])
        defaults["FEATURE_DIR"] = f"{exp}/features/{net_id}"
    return defaults


def variable_values(
    sets: Mapping[str, str], config_file: Path | None = None, environ: Mapping[str, str] | None = None
) -> tuple[dict[str, str], dict[str, str]]:
    """(values, defaults) for `${VAR}` expansion: values = the run script's variables found in the
    environment (`os.environ` unless `environ` is given), overridden by `sets`; defaults = the run
    script's documented values, used only when a name has no value."""
    environment = os.environ if environ is None else environ
    taken = {name: environment[name] for name in ENVIRONMENT_VARIABLES if name in environment and name not in sets}
    if taken:
        log.info("Values from the environment: %s", ", ".join(f"{name}={value}" for name, value in taken.items()))
    values = {**taken, **sets}
    return values, default_variables(config_file, values)


def effective(name: str, values: Mapping[str, str], defaults: Mapping[str, str]) -> str | None:
    return values.get(name, defaults.get(name))


def how_to_set(name: str) -> str:
    """The end of a 'has no value' message: how this variable can be given."""
    if name in ENVIRONMENT_VARIABLES:
        return f"set it with --set {name}=<value> or the environment variable {name}"
    advice = f"set it with --set {name}=<value>"
    if name in os.environ:
        advice += (f" (the environment variable {name} is not used: only the run script's variables come "
                   "from the environment)")
    return advice
