"""`python -m rloss plot LOG [LOG ...] -o out.png [--csv out.csv]`: the training curves of our logs
and caffe.bin's in one figure (rloss.plotting), and all their values as a table (one row per value:
log, run, iteration, quantity, value). Every log is read before anything is written, and each file
is written atomically, so a bad log leaves no output behind."""

from __future__ import annotations

import argparse
import csv
import io
import logging

from rloss.errors import LogError
from rloss.io import write_file_atomic
from rloss.plotting import Logs, draw, render
from rloss.training_log import read_log

log = logging.getLogger("rloss")

CSV_COLUMNS = ("log", "run", "iteration", "quantity", "value")


def add_plot_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("logs", nargs="+", metavar="LOG", help="training logs (rloss's or caffe.bin's)")
    parser.add_argument("--output", "-o", required=True, metavar="FIGURE",
                        help="figure to write; its name's ending gives the format (.png, .pdf, .svg)")
    parser.add_argument("--csv", default="", metavar="TABLE", help="also write every value to this CSV file")


def plot(args: argparse.Namespace) -> None:
    logs = [(name, read_log(name)) for name in args.logs]
    figure = render(draw(logs), args.output)
    table = csv_text(logs).encode("utf-8") if args.csv else b""
    write_output(args.output, figure)
    log.info("Training curves of %d log%s written to %s", len(logs), "s" if len(logs) > 1 else "", args.output)
    if args.csv:
        write_output(args.csv, table)
        log.info("Their values written to %s", args.csv)


def write_output(path: str, data: bytes) -> None:
    """Write `data` atomically (rloss.io); an OS error names `path`, not the temporary file."""
    try:
        write_file_atomic(path, lambda temporary: temporary.write_bytes(data))
    except OSError as error:
        raise LogError(f"cannot write {path}: {error.strerror or error}") from None


def csv_text(logs: Logs) -> str:
    """The table of every value: runs numbered from 1, values as Python's repr reads them back."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for name, runs in logs:
        for number, run in enumerate(runs, start=1):
            for record in run.records:
                writer.writerows((name, number, record.iteration, quantity, repr(value))
                                 for quantity, value in record.quantities().items())
    return text.getvalue()
