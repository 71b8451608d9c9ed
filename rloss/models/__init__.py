"""The networks and solvers of the pascal_scribble experiments, generated in Python (see
`rloss.models.deeplab`, `rloss.models.solvers`, and `python -m rloss.models.write_exper`)."""

from rloss.models.deeplab import (
    KINDS,
    NETWORKS,
    ORIGINAL_KINDS,
    NetOptions,
    deeplab_largefov,
    deeplab_msc_largefov,
    deeplab_vgg16,
    resnet101_msc,
)
from rloss.models.regularizers import REGULARIZERS
from rloss.models.solvers import ORIGINAL_SOLVER_FILES, SOLVER_FILES, solver, solver_text

__all__ = [
    "KINDS", "NETWORKS", "NetOptions", "ORIGINAL_KINDS", "ORIGINAL_SOLVER_FILES", "REGULARIZERS", "SOLVER_FILES",
    "deeplab_largefov", "deeplab_msc_largefov", "deeplab_vgg16", "resnet101_msc", "solver", "solver_text",
]
