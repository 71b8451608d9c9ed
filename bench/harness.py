"""What the LargeFOV benches share: a timer and the flags of the net's size and of the repeats
(imported as a sibling module: the benches run as `python bench/NAME.py`)."""

from __future__ import annotations

import argparse
import time
from typing import Callable


def timed(step: Callable[[], object]) -> float:
    """Seconds `step()` takes."""
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def size_parser(description: str, repeats: int) -> argparse.ArgumentParser:
    """--crop, --batch, --repeats and --threads, with this bench's default repeat count."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--crop", type=int, default=321)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=2)
    return parser
