"""pycaffe's caffe.Classifier: a TEST-phase Net that classifies H x W x K images (RGB in [0, 1], as
caffe.io.load_image gives them) by resizing, cropping or oversampling, preprocessing and averaging."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from rloss.caffe import TEST, Net
from rloss.caffe import io as caffe_io
from rloss.errors import DataError, NetError


class Classifier(Net):
    """`Classifier(model_file, pretrained_file, image_dims, mean, input_scale, raw_scale, channel_swap)`:
    images are resized to `image_dims` (default: the input blob's H x W) before cropping to the input
    blob's size; the other arguments configure `self.transformer` for the first net input."""

    def __init__(self, model_file: str, pretrained_file: str | None, image_dims: Sequence[int] | None = None,
                 mean=None, input_scale: float | None = None, raw_scale: float | None = None,
                 channel_swap: Sequence[int] | None = None):
        super().__init__(model_file, TEST, weights=pretrained_file)
        in_ = self.inputs[0]
        self.transformer = caffe_io.Transformer({in_: self.blobs[in_].data.shape})
        self.transformer.set_transpose(in_, (2, 0, 1))
        if mean is not None:
            self.transformer.set_mean(in_, mean)
        if input_scale is not None:
            self.transformer.set_input_scale(in_, input_scale)
        if raw_scale is not None:
            self.transformer.set_raw_scale(in_, raw_scale)
        if channel_swap is not None:
            self.transformer.set_channel_swap(in_, channel_swap)
        self.crop_dims = np.array(self.blobs[in_].data.shape[2:])
        self.image_dims = self.crop_dims if image_dims is None or len(image_dims) == 0 else image_dims

    def predict(self, inputs: Sequence, oversample: bool = True) -> np.ndarray:
        """Class probabilities (N x classes: the first net output) of N images: the mean over each
        image's 10 crops (corners, centre and their mirrors) when `oversample`, else of its centre crop."""
        images = np.stack([caffe_io.resize_image(image, self.image_dims) for image in _same_channels(inputs)])
        if oversample:
            crops = caffe_io.oversample(images, self.crop_dims)
        else:
            top, left = caffe_io.center_crop_corner(self.image_dims, self.crop_dims)
            crops = images[:, top:top + self.crop_dims[0], left:left + self.crop_dims[1]]
        in_ = self.inputs[0]
        caffe_in = np.stack([self.transformer.preprocess(in_, crop) for crop in crops])
        predictions = self._forward_in_batches(in_, caffe_in)
        if oversample:
            predictions = predictions.reshape(len(predictions) // 10, 10, -1).mean(axis=1)
        return predictions

    def _forward_in_batches(self, in_: str, caffe_in: np.ndarray) -> np.ndarray:
        """The first output for every item of `caffe_in`, forwarded in batches of the input blob's size
        with the last batch padded by zeros (as pycaffe's forward_all)."""
        blob_shape = self.blobs[in_].data.shape
        if caffe_in.shape[1:] != blob_shape[1:]:
            raise NetError(f"preprocessed images of shape {caffe_in.shape[1:]} do not fit input '{in_}' of shape "
                           f"{blob_shape}: check the images' channels and channel_swap")
        batch, output = blob_shape[0], self.outputs[0]
        results = []
        for start in range(0, len(caffe_in), batch):
            chunk = caffe_in[start:start + batch]
            padded = np.zeros(blob_shape, dtype=np.float32)
            padded[:len(chunk)] = chunk
            results.append(np.array(self.forward(**{in_: padded})[output][:len(chunk)]))
        return np.concatenate(results)


def _same_channels(inputs: Sequence) -> list[np.ndarray]:
    """The images as arrays, checked to be H x W x K with one K (pycaffe stacks them into one array)."""
    images = [np.asarray(image) for image in inputs]
    if not images:
        raise DataError("Classifier.predict: no images given")
    channels = {image.shape[2] if image.ndim == 3 else None for image in images}
    if len(channels) != 1 or None in channels:
        raise DataError(f"Classifier.predict: images must be H x W x K with one K; got shapes "
                        f"{[image.shape for image in images]}")
    return images
