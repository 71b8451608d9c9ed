"""The networks and solvers of the pascal_scribble experiments, generated in Python (see
`rloss.models.deeplab`, `rloss.models.solvers`, and `python -m rloss.models.write_exper`)."""

from rloss.models.deeplab import (
    KINDS,
    NETWORKS,
    NetOptions,
    deeplab_largefov,
    deeplab_msc_largefov,
    deeplab_vgg16,
    resnet101_msc,
)
from rloss.models.solvers import SOLVER_FILES, solver, solver_text

__all__ = [
    "KINDS", "NETWORKS", "NetOptions", "SOLVER_FILES", "deeplab_largefov", "deeplab_msc_largefov", "deeplab_vgg16",
    "resnet101_msc", "solver", "solver_text",
]
