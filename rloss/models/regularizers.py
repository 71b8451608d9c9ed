"""The regularizers a phase-2 net can carry: per regularizer its net kind and file stems, its layer and
the `${VAR}` of its loss weight. DenseCRF is the original experiments'; the others are rloss's.

`REGULARIZER=<name>` in the run script picks `solverwith<...>loss.prototxt` / `trainwith<...>loss.prototxt`.
"""

from __future__ import annotations

from dataclasses import dataclass

from rloss.netspec import NetBuilder, Var


@dataclass(frozen=True)
class Regularizer:
    """One regularized loss as the generated phase-2 nets add it (on the full-resolution softmax)."""

    name: str  # the run script's REGULARIZER value
    layer_type: str
    title: str
    needs_label: bool = False  # a third bottom: the label (image-level tags for the size constraint)

    @property
    def kind(self) -> str:
        """The net kind and file stem of its phase-2 net, e.g. trainwithdensecrfloss."""
        return f"trainwith{self.name.replace('_', '')}loss"

    @property
    def solver_stem(self) -> str:
        return f"solverwith{self.name.replace('_', '')}loss"

    @property
    def layer_name(self) -> str:
        return f"{self.name}_loss"

    @property
    def weight(self) -> Var:
        return Var(f"{self.name.upper()}_LOSS_WEIGHT")

    def param(self, bi_xy_std: float | Var, bi_rgb_std: float | Var) -> dict:
        """The layer's `*_param` field, given the net's bilateral kernel."""
        return {
            "densecrf": {"densecrf_loss_param": {"bi_xy_std": bi_xy_std, "bi_rgb_std": bi_rgb_std}},
            "normalized_cut": {"normalized_cut_loss_param": {"bi_xy_std": bi_xy_std, "bi_rgb_std": bi_rgb_std}},
            # Local kernels at a quarter of the resolution (20 pixels of the input around each pixel).
            "gated_crf": {"gated_crf_loss_param": {"kernel": [{"weight": 1.0, "xy_std": 10.0, "rgb_std": 25.0}],
                                                   "radius": 5, "scale_factor": 0.25, "normalize": True}},
            # Tags from the scribbles: present classes cover 1% to all of the image, absent ones nothing.
            "size_constraint": {"size_constraint_loss_param": {"lower": 0.01, "upper": 1.0}},
        }[self.name]


REGULARIZERS: dict[str, Regularizer] = {r.name: r for r in (
    Regularizer("densecrf", "DenseCRFLoss", "DenseCRF loss"),
    Regularizer("normalized_cut", "NormalizedCutLoss", "Normalized cut loss"),
    Regularizer("gated_crf", "GatedCRFLoss", "Gated CRF loss"),
    Regularizer("size_constraint", "SizeConstraintLoss", "Size constraint loss", needs_label=True),
)}
REGULARIZED_KINDS: dict[str, Regularizer] = {r.kind: r for r in REGULARIZERS.values()}


def add_regularized_loss(builder: NetBuilder, regularizer: Regularizer, probabilities: str, weight: float | Var,
                         bi_xy_std: float | Var, bi_rgb_std: float | Var, **fields) -> None:
    """Append the regularizer's layer on [data, probabilities(, label)], gradient to the probabilities only;
    `fields` are more LayerParameter fields (the originals' ignored loss_param)."""
    bottoms = ["data", probabilities] + (["label"] if regularizer.needs_label else [])
    builder.add(regularizer.layer_name, regularizer.layer_type, bottoms, [regularizer.layer_name],
                loss_weight=[weight], propagate_down=[False, True] + [False] * (len(bottoms) - 2),
                **fields, **regularizer.param(bi_xy_std, bi_rgb_std))
