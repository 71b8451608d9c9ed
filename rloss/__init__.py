"""rloss: Caffe-faithful training of segmentation CNNs from scribbles with regularized losses, on PyTorch."""

__version__ = "0.1.0"
