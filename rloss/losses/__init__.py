"""Regularized losses for PyTorch users, each a `torch.nn.Module` with the PyTorch port's conventions:
images RGB in [0, 255] (N, 3, H, W), segmentations softmax probabilities (N, K, H, W), rois (N, H, W),
float32 inside, any device in and out, a (1,) tensor out. The Caffe layers of `rloss.layers` use the
same computations."""

from rloss.losses.densecrf import DenseCRFLoss
from rloss.losses.gated_crf import GatedCRFLoss, GatedKernel
from rloss.losses.normalized_cut import NormalizedCutLoss
from rloss.losses.size_constraint import SizeConstraintLoss

__all__ = ["DenseCRFLoss", "GatedCRFLoss", "GatedKernel", "NormalizedCutLoss", "SizeConstraintLoss"]
