"""`python -m rloss data {prepare,check,scribbles,scribblesup}`: one's own data as ImageSegData reads
it (rloss.datasets). Problems in the user's files end with one error listing every problem (exit 1),
and nothing is written then; bad flags exit 2.

* `prepare --images DIR --scribbles DIR [--ground-truth DIR] [--classes FILE] [--val FRACTION |
  --val-list FILE] [--seed N] --out DATA_ROOT`: pair, check and write a DATA_ROOT tree.
* `check DATA_ROOT [--classes FILE]`: the same checks on an existing tree, through its list files.
* `scribbles --from-masks DIR --out DIR [--seed N] [--width W] [--margin M]`: strokes from full masks.
* `scribblesup --annotations DIR --out DIR [--classes FILE]`: ScribbleSup's XML files as label PNGs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from rloss.datasets.check_tree import check_tree
from rloss.datasets.masks import scribbles_from_masks
from rloss.datasets.prepare import PrepareOptions, prepare
from rloss.datasets.scribblesup import convert_annotations


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction between 0 and 1 (exclusive), got '{text}'")
    return value


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got '{text}'")
        return value

    return parse


def _add_prepare(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "prepare", help="pair, check and write images and labels as a DATA_ROOT tree",
        description="Pair images (jpg/jpeg/png/bmp) with scribble label PNGs (grey or palette; 255 = unlabelled) "
                    "by file stem, check every pair, and write DATA_ROOT with images/, scribbles/, "
                    "SegmentationClass/ (with --ground-truth), list/{train,val,train_full,train_id,val_id}.txt, "
                    "classes.txt and report.txt. Any problem stops it before anything is written.")
    parser.add_argument("--images", required=True, type=Path, metavar="DIR", help="folder of the images")
    parser.add_argument("--scribbles", required=True, type=Path, metavar="DIR",
                        help="folder of the scribble label PNGs")
    parser.add_argument("--ground-truth", "--ground_truth", dest="truth", type=Path, metavar="DIR",
                        help="folder of full label PNGs: val.txt and train_full.txt use them")
    parser.add_argument("--classes", type=Path, metavar="FILE",
                        help="classes file: 'INDEX NAME' or 'NAME' lines, indices 0..K-1 (default: the label values "
                             "found, named class_0, class_1, ...)")
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--val", type=_fraction, default=0.2, metavar="FRACTION",
                       help="fraction of the images drawn for val (default 0.2)")
    split.add_argument("--val-list", "--val_list", type=Path, metavar="FILE",
                       help="file naming the val images, one per line (stems, file names or paths)")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the val draw (default 0)")
    parser.add_argument("--out", required=True, type=Path, metavar="DATA_ROOT",
                        help="the DATA_ROOT to write (must not exist)")


def _add_others(commands: argparse._SubParsersAction) -> None:
    check = commands.add_parser("check", help="check an existing DATA_ROOT tree and its list files",
                                description="Check every line of DATA_ROOT/list/*.txt (not *_id.txt): its image "
                                            "and label exist and read, have one size, and the label values are "
                                            "classes of DATA_ROOT/classes.txt or 255.")
    check.add_argument("root", type=Path, metavar="DATA_ROOT")
    check.add_argument("--classes", type=Path, metavar="FILE", help="classes file (default: DATA_ROOT/classes.txt)")
    scribbles = commands.add_parser("scribbles", help="make scribbles from full label masks",
                                    description="For every piece of every class in each mask, a seeded stroke along "
                                                "the middle of the piece; label PNGs with 255 elsewhere.")
    scribbles.add_argument("--from-masks", "--from_masks", dest="masks", required=True, type=Path, metavar="DIR",
                           help="folder of full label PNGs")
    scribbles.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder to write (must not exist)")
    scribbles.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the strokes (default 0)")
    scribbles.add_argument("--width", type=_at_least(1), default=3, metavar="W",
                           help="stroke width in pixels (default 3)")
    scribbles.add_argument("--margin", type=_at_least(0), default=3, metavar="M",
                           help="distance in pixels kept from a region's edge where the region allows (default 3)")
    sup = commands.add_parser("scribblesup", help="convert ScribbleSup's PASCAL-Scribble XML files to label PNGs",
                              description="Draw the scribbles of each XML file (3 px wide) into a label PNG; "
                                          "also writes OUT/classes.txt.")
    sup.add_argument("--annotations", required=True, type=Path, metavar="DIR", help="folder of the .xml files")
    sup.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder to write (must not exist)")
    sup.add_argument("--classes", type=Path, metavar="FILE",
                     help="class names in index order, the tags of the files (default: PASCAL VOC's 21 classes)")


def _prepare(args: argparse.Namespace) -> None:
    report = prepare(PrepareOptions(args.images, args.scribbles, args.out, args.truth, args.classes, args.val,
                                    args.val_list, args.seed))
    print(report, end="")
    print(f"wrote {args.out} (report.txt has the lines above); train on it with DATA_ROOT={args.out}/")


def _check(args: argparse.Namespace) -> None:
    print(check_tree(args.root, args.classes).describe(args.root))


def _scribbles(args: argparse.Namespace) -> None:
    count = scribbles_from_masks(args.masks, args.out, args.seed, args.width, args.margin)
    print(f"wrote {count} scribble label maps to {args.out}")


def _scribblesup(args: argparse.Namespace) -> None:
    count = convert_annotations(args.annotations, args.out, args.classes)
    print(f"wrote {count} scribble label maps and classes.txt to {args.out}")


_RUN: dict[str, Callable[[argparse.Namespace], None]] = {
    "prepare": _prepare, "check": _check, "scribbles": _scribbles, "scribblesup": _scribblesup,
}


def add_data_parser(commands: argparse._SubParsersAction) -> None:
    """The `data` command and its subcommands."""
    parser = commands.add_parser("data", help="prepare and check one's own data (ImageSegData trees)")
    subcommands = parser.add_subparsers(dest="data_command", metavar="{" + ",".join(_RUN) + "}")
    subcommands.required = True
    _add_prepare(subcommands)
    _add_others(subcommands)


def data(args: argparse.Namespace) -> None:
    _RUN[args.data_command](args)
