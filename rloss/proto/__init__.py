"""Caffe's schema and files: message classes, prototxt reading, V1 upgrade, blobs."""
