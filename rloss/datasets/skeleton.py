"""Skeletons of regions and their longest paths, in numpy and scipy (no image-processing library
beyond what rloss already needs): what a scribble along a region's middle follows."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components, dijkstra

# (dy, dx) of the 8 neighbours in the order Zhang-Suen's rules read them: N, NE, E, SE, S, SW, W, NW
_AROUND = ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))
_FORWARD = ((0, 1), (1, -1), (1, 0), (1, 1))  # each 8-neighbour pair once


def thin(mask: np.ndarray) -> np.ndarray:
    """Zhang and Suen's thinning (1984): peel boundary pixels that do not disconnect the region until
    none can go, leaving a one-pixel-wide 8-connected skeleton along the middle. A region of a few
    pixels can vanish (a 2x2 block does); callers fall back on its innermost pixel."""
    image = np.pad(mask.astype(np.uint8), 1)
    height, width = mask.shape
    while True:
        changed = False
        for second in (False, True):
            centre = image[1:-1, 1:-1]
            p = [image[1 + dy:1 + dy + height, 1 + dx:1 + dx + width] for dy, dx in _AROUND]
            count = sum(p)
            transitions = sum((p[i] == 0) & (p[(i + 1) % 8] == 1) for i in range(8))
            north, east, south, west = p[0], p[2], p[4], p[6]
            if second:
                sides = (north * east * west == 0) & (north * south * west == 0)
            else:
                sides = (north * east * south == 0) & (east * south * west == 0)
            peel = (centre == 1) & (count >= 2) & (count <= 6) & (transitions == 1) & sides
            if peel.any():
                centre[peel] = 0
                changed = True
        if not changed:
            return image[1:-1, 1:-1].astype(bool)


def innermost_pixel(mask: np.ndarray) -> np.ndarray:
    """A map of the one pixel of `mask` farthest from its outside (the first such, row-major)."""
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    point = np.zeros_like(mask, dtype=bool)
    point[np.unravel_index(int(np.argmax(distance)), mask.shape)] = True
    return point


def longest_paths(skeleton: np.ndarray) -> list[np.ndarray]:
    """For each 8-connected piece of `skeleton`, its longest path as (N, 2) (row, column) pixels in
    order: the two-sweep search (the farthest pixel from any pixel, then the farthest from that one),
    exact on the tree-shaped skeletons of regions without holes and close on others."""
    coords = np.argwhere(skeleton)
    if len(coords) == 0:
        return []
    index = np.full(skeleton.shape, -1, dtype=np.int64)
    index[tuple(coords.T)] = np.arange(len(coords))
    rows, cols, weights = [], [], []
    for dy, dx in _FORWARD:
        target = coords + (dy, dx)
        inside = (target[:, 0] < skeleton.shape[0]) & (target[:, 1] >= 0) & (target[:, 1] < skeleton.shape[1])
        source, target = np.flatnonzero(inside), target[inside]
        neighbour = index[target[:, 0], target[:, 1]]
        linked = neighbour >= 0
        rows.append(source[linked])
        cols.append(neighbour[linked])
        weights.append(np.full(int(linked.sum()), np.hypot(dy, dx)))
    graph = coo_matrix((np.concatenate(weights), (np.concatenate(rows), np.concatenate(cols))),
                       shape=(len(coords), len(coords))).tocsr()
    count, piece = connected_components(graph, directed=False)
    paths = []
    for label in range(count):
        first = int(np.flatnonzero(piece == label)[0])
        distances = dijkstra(graph, directed=False, indices=first)
        start = int(np.argmax(np.where(np.isfinite(distances), distances, -1)))
        distances, previous = dijkstra(graph, directed=False, indices=start, return_predecessors=True)
        node = int(np.argmax(np.where(np.isfinite(distances), distances, -1)))
        path = [node]
        while node != start:
            node = int(previous[node])
            path.append(node)
        paths.append(coords[path[::-1]])
    return paths
