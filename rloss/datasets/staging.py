"""Writing an output folder whole or not at all: a run that fails or is interrupted half-way must
not leave a half-written DATA_ROOT that looks complete."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator

from rloss.datasets.problems import Problems


def note_if_exists(out: Path, problems: Problems) -> None:
    """An output folder is never merged into or replaced: that would mix two datasets."""
    if out.exists() or out.is_symlink():
        problems.add(f"output '{out}' already exists; remove it or choose another --out")


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A new hidden sibling folder to write into, renamed to `out` when the block ends; removed
    when the block raises (Ctrl-C too). Created with the umask's permissions, as mkdir makes `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    stage.mkdir()
    try:
        yield stage
        if out.exists() or out.is_symlink():  # appeared while we wrote: rename would replace an empty one
            raise FileExistsError(f"output '{out}' appeared while it was being written; nothing was written")
        os.rename(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
