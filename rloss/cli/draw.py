"""`python -m rloss draw NET OUT [--rankdir LR] [--phase TRAIN|TEST|ALL] [--display_lrm]`: Caffe's
python/draw_net.py, a picture of a net's layers and blobs (rloss.caffe.draw). OUT's extension picks the
format: .dot or .gv are the graph as DOT text, anything else (.png, .svg, .pdf, ...) is drawn by Graphviz's
`dot` program, which must then be installed. The net's `${VAR}`s get their values as in every command
(--set, the environment, the run script's defaults)."""

from __future__ import annotations

import argparse
import logging

from rloss.caffe.draw import RANKDIRS, draw_net_to_file
from rloss.cli.common import add_set_flag, read_model
from rloss.proto import caffe_pb2
from rloss.variables import parse_assignments

log = logging.getLogger("rloss")

PHASES = {"TRAIN": caffe_pb2.TRAIN, "TEST": caffe_pb2.TEST, "ALL": None}


def add_draw_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="NET", help="net prototxt")
    parser.add_argument("output", metavar="OUT", help="the drawing; its extension is the format (.png, .svg, "
                                                      ".pdf need Graphviz; .dot, .gv: DOT text)")
    parser.add_argument("--rankdir", default="LR", choices=RANKDIRS,
                        help="direction of the graph: LR (left to right, the default), TB (top to bottom), BT, RL")
    parser.add_argument("--phase", default="ALL", choices=tuple(PHASES),
                        help="the layers of the TRAIN or the TEST net, or ALL layers whatever their phase "
                             "(the default)")
    parser.add_argument("--display_lrm", action="store_true",
                        help="show the learning layers' (Convolution, Deconvolution, InnerProduct) lr_mult "
                             "values when one is not 0")
    add_set_flag(parser)


def draw(args: argparse.Namespace) -> None:
    path, net = read_model(args.input, parse_assignments(args.set))
    log.info("Drawing net %s to %s", path, args.output)
    draw_net_to_file(net, args.output, args.rankdir, PHASES[args.phase], args.display_lrm)
