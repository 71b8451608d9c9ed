"""Write (or check) the experiment tree `exper/pascal_scribble/config/<net>/` from the generators.

    python -m rloss.models.write_exper [ROOT] [--check]

ROOT (default: the current directory) receives `exper/pascal_scribble/config/<net>/` with, per net,
solver.prototxt, solverwithdensecrfloss.prototxt, train.prototxt, trainwithdensecrfloss.prototxt and
test.prototxt, keeping the `${VAR}` placeholders of the original templates (and the phase-2 files of
the other regularizers), and, where ROOT holds the small demo net's DenseCRF files (a source checkout),
its phase-2 files for those regularizers, derived from ROOT/prototxt/small_fcn/trainwithdensecrfloss.prototxt
and solverwithdensecrfloss.prototxt. With --check nothing is
written: the exit status is 1 when a file is missing or differs from what would be written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from rloss.models.deeplab import KINDS, NETWORKS
from rloss.models.small_fcn import SMALL_FCN_DIR, has_small_fcn, small_fcn_files
from rloss.models.solvers import SOLVER_FILES, solver_text

CONFIG_DIR = Path("exper", "pascal_scribble", "config")


def exper_files() -> dict[Path, str]:
    """Every file of the DeepLab tree (path relative to ROOT -> text)."""
    files: dict[Path, str] = {}
    for net_id, build in NETWORKS.items():
        directory = CONFIG_DIR / net_id
        for kind, stem in SOLVER_FILES.items():
            files[directory / f"{stem}.prototxt"] = solver_text(net_id, kind)
        for kind in KINDS:
            files[directory / f"{kind}.prototxt"] = build(kind).text()
    return files


def stale_files(root: Path, files: dict[Path, str]) -> list[Path]:
    """The files under `root` that are missing or differ from `files`."""
    return [path for path, text in files.items()
            if not (root / path).is_file() or (root / path).read_text(encoding="utf-8") != text]


def write_tree(root: Path, files: dict[Path, str]) -> None:
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rloss.models.write_exper", description=__doc__.split("\n")[0])
    parser.add_argument("root", nargs="?", default=".", type=Path, help="directory that receives exper/ (default: .)")
    parser.add_argument("--check", action="store_true", help="only report files that are missing or out of date")
    args = parser.parse_args(argv)
    files = exper_files()
    if has_small_fcn(args.root):
        files.update(small_fcn_files(args.root))
    else:
        print(f"no {args.root / SMALL_FCN_DIR}/trainwithdensecrfloss.prototxt and solverwithdensecrfloss.prototxt: "
              "the small net's phase-2 files are left out", file=sys.stderr)
    if args.check:
        stale = stale_files(args.root, files)
        for path in stale:
            print(f"out of date: {args.root / path}", file=sys.stderr)
        return 1 if stale else 0
    write_tree(args.root, files)
    print(f"wrote {len(files)} files under {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
