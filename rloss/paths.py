"""Where the files named inside a solver or net file are, and the values of their `${VAR}`s.

The original experiments ran `caffe.bin` from `exper/` after a shell script had generated
`NAME_${TRAIN_SET}.prototxt` files from templates with sed. The rules below make the unchanged
experiment files work from any working directory:

Inputs (`resolve_input`): an absolute path is used as is. A relative path is tried relative to the
current directory first; if nothing exists there, relative to each ancestor directory of the file
that names it (the solver file's own directory first, then its parent, and so on up to the root);
the first candidate that exists wins. If none exists the path is returned unchanged, so the error
that follows names it as the user wrote it.

Input paths inside a net (`resolve_net_paths`: list files, HDF5 lists, mean files) follow the
input rule with the ancestors of the file that names them (the solver's, or the net's for
`test`/`time`); only paths found that way are rewritten, so a run from `exper/` is unchanged.

Net files (`resolve_net_file`): as inputs; if the file is still not found and its name is
`STEM_<set>.prototxt` where `<set>` is the value of TRAIN_SET or TEST_SET, the template
`STEM.prototxt` beside it (resolved the same way) is used instead; the caller expands it with the
same variables, which is what the original script's sed did.

Outputs (`resolve_output_prefix`, for `snapshot_prefix`): an absolute prefix is used as is. For a
relative one, the candidate bases are the current directory, then the same ancestors as above. The
base under which the longest leading part of the prefix's directory already exists wins (ties go to
the earlier base; a base where the whole directory exists always wins over partial ones). Missing
directories are then created (the original script ran `mkdir -p` for them).

The values of the `${VAR}`s themselves come from `rloss.variables`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from rloss.variables import effective

SET_VARIABLES = ("TRAIN_SET", "TEST_SET")
INPUT_PATH_FIELDS = (
    ("image_data_param", "source"), ("hdf5_data_param", "source"), ("data_param", "source"),
    ("window_data_param", "source"), ("infogain_loss_param", "source"), ("mat_read_param", "source"),
    ("transform_param", "mean_file"), ("image_data_param", "mean_file"), ("data_param", "mean_file"),
)


def anchors_of(config_file: Path | None) -> list[Path]:
    """The ancestor directories of `config_file`, closest first."""
    if config_file is None:
        return []
    return list(Path(os.path.abspath(config_file)).parents)


def resolve_input(path: str | Path, anchors: Sequence[Path] = ()) -> Path:
    """An existing file named `path`: as given, else under the first anchor that has it (see module doc)."""
    given = Path(path)
    if given.is_absolute() or given.exists() or str(path) == "":
        return given
    for anchor in anchors:
        candidate = anchor / given
        if candidate.exists():
            return candidate
    return given


def resolve_net_paths(net_param, anchors: Sequence[Path]) -> list[tuple[str, str]]:
    """Rewrite, in place, each relative input path of the net's layers that exists only under an
    anchor; returns the (as written, as used) pairs."""
    changes = []
    known = net_param.DESCRIPTOR.fields_by_name["layer"].message_type.fields_by_name
    for layer in net_param.layer:
        for message_name, field in INPUT_PATH_FIELDS:
            if message_name not in known or not layer.HasField(message_name):
                continue
            message = getattr(layer, message_name)
            value = getattr(message, field, "")
            found = resolve_input(value, anchors) if value else None
            if found is not None and found != Path(value):
                setattr(message, field, str(found))
                changes.append((value, str(found)))
    return changes


def template_of(path: Path, values: Mapping[str, str], defaults: Mapping[str, str]) -> Path | None:
    """`STEM.prototxt` for `STEM_<TRAIN_SET or TEST_SET value>.prototxt`, else None."""
    for name in SET_VARIABLES:
        value = effective(name, values, defaults)
        suffix = f"_{value}{path.suffix}"
        if value and path.name.endswith(suffix) and len(path.name) > len(suffix):
            return path.with_name(path.name[: -len(suffix)] + path.suffix)
    return None


def resolve_net_file(
    path: str | Path, anchors: Sequence[Path], values: Mapping[str, str], defaults: Mapping[str, str]
) -> Path:
    """A net or solver file: as `resolve_input`, falling back to the sed template it was made from."""
    found = resolve_input(path, anchors)
    if found.exists():
        return found
    template = template_of(Path(path), values, defaults)
    if template is not None:
        template_found = resolve_input(template, anchors)
        if template_found.exists():
            return template_found
    return found


def _existing_depth(base: Path, directory: Path) -> int:
    """How many leading components of `directory` exist under `base`."""
    depth, current = 0, base
    for part in directory.parts:
        current = current / part
        if not current.is_dir():
            break
        depth += 1
    return depth


def resolve_output_prefix(prefix: str | Path, anchors: Sequence[Path] = ()) -> Path:
    """Where a relative output prefix goes (see module doc); its directory is created if missing."""
    given = Path(prefix)
    directory = given.parent
    if given.is_absolute() or str(prefix) == "":
        chosen = given
    else:
        bases = [Path(".")] + list(anchors)
        best = max(range(len(bases)), key=lambda i: (_existing_depth(bases[i], directory), -i))
        chosen = given if best == 0 else bases[best] / given
    chosen.parent.mkdir(parents=True, exist_ok=True)
    return chosen
