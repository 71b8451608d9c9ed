"""The data layers' background loaders are stopped and joined on every way out: `close()` returns
only when no loader thread is left, and a run that fails while they are decoding ends with our
one-line error, its loaders already gone when the interpreter finalizes (a daemon thread killed inside
a decoder there can abort the process): 20 runs in a row."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from PIL import Image

from rloss.layers import layer_class
from rloss.proto import caffe_pb2

# Registered before the layer exists, so it runs after the layer's own exit hook (atexit is LIFO):
# it reports the loader threads still alive at that point, just before finalization.
SCRIPT = """
import atexit, sys, threading
atexit.register(lambda: print("loaders alive at exit:",
                              sum(t.name.startswith("rloss-data") and t.is_alive() for t in threading.enumerate()),
                              file=sys.stderr))
from google.protobuf import text_format
from rloss.cli.common import run
from rloss.errors import SolverError
from rloss.layers import layer_class
from rloss.proto import caffe_pb2

def start(args):
    text = open(sys.argv[1]).read()
    layer = layer_class("ImageSegData")(text_format.Parse(text, caffe_pb2.LayerParameter()), [], caffe_pb2.TRAIN)
    layer()  # the loaders are now decoding the next batches
    raise SolverError("the solver's test net cannot be built (a failed start)")

sys.exit(run(start, None))
"""


@pytest.fixture(scope="module")
def layer_file(tmp_path_factory) -> Path:
    """An ImageSegData layer over images large enough that decoding is under way when a run stops."""
    folder = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    lines = []
    for index in range(12):
        Image.fromarray(rng.integers(0, 255, (700, 700, 3), dtype=np.uint8)).save(folder / f"{index}.png")
        Image.fromarray(np.zeros((700, 700), np.uint8)).save(folder / f"{index}_label.png")
        lines.append(f"{index}.png {index}_label.png\n")
    (folder / "list.txt").write_text("".join(lines))
    path = folder / "layer.prototxt"
    path.write_text(f'name: "data" type: "ImageSegData" top: "data" top: "label" '
                    f'image_data_param {{ root_folder: "{folder}/" source: "{folder / "list.txt"}" '
                    f'batch_size: 2 label_type: PIXEL }} transform_param {{ crop_size: 321 }}')
    return path


def test_close_returns_when_every_loader_has_ended(layer_file):
    param = text_format.Parse(layer_file.read_text(), caffe_pb2.LayerParameter())
    layer = layer_class("ImageSegData")(param, [], caffe_pb2.TRAIN)
    layer()
    threads = list(layer.prefetcher._threads)
    assert any(thread.is_alive() for thread in threads)
    layer.close()
    assert not any(thread.is_alive() for thread in threads)


def test_a_failed_start_ends_with_our_error_and_no_loader_left(layer_file):
    for attempt in range(20):
        done = subprocess.run([sys.executable, "-c", SCRIPT, str(layer_file)], capture_output=True, text=True,
                              timeout=120)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1, (attempt, done.returncode, done.stderr[-2000:])
        assert lines[-2:] == ["rloss: error: the solver's test net cannot be built (a failed start)",
                              "loaders alive at exit: 0"], (attempt, done.stderr[-2000:])
