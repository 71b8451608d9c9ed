"""Data handling for the image data layers: list files, Caffe-exact transforms and resizing, image
reading, background prefetching, and a synthetic scribble dataset for demos and tests."""
