"""rloss: Caffe-faithful training of segmentation CNNs from scribbles with regularized losses, on PyTorch."""

__version__ = "0.1.0"

from rloss.losses import DenseCRFLoss, GatedCRFLoss, GatedKernel, NormalizedCutLoss, SizeConstraintLoss  # noqa: E402

__all__ = ["DenseCRFLoss", "GatedCRFLoss", "GatedKernel", "NormalizedCutLoss", "SizeConstraintLoss", "__version__"]
