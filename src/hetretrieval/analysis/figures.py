"""Figures written straight to PNG files (matplotlib's Agg canvas: no display, no pyplot global state)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

INLIER_COLOUR = "#1a9641"
OUTLIER_COLOUR = "#d7191c"


def _side_by_side(image_a: np.ndarray, image_b: np.ndarray) -> np.ndarray:
    """Two `(H, W, 3)` RGB or `(H, W)` gray uint8 images -> one RGB canvas, tops aligned, black-padded."""
    rgb_a, rgb_b = (np.repeat(im[..., None], 3, axis=2) if im.ndim == 2 else im for im in (image_a, image_b))
    canvas = np.zeros((max(len(rgb_a), len(rgb_b)), rgb_a.shape[1] + rgb_b.shape[1], 3), dtype=np.uint8)
    canvas[: len(rgb_a), : rgb_a.shape[1]] = rgb_a
    canvas[: len(rgb_b), rgb_a.shape[1] :] = rgb_b
    return canvas


def draw_matches(
    image_a: np.ndarray,
    image_b: np.ndarray,
    keypoints_a: np.ndarray,
    keypoints_b: np.ndarray,
    matches: np.ndarray,
    inlier_mask: np.ndarray,
    path: str | Path,
    show_outliers: bool = True,
) -> Path:
    """Write a PNG of two images side by side with their correspondences: inliers green, outliers red.

    Images are `(H, W, 3)` RGB or `(H, W)` gray uint8; keypoints `(N_a, 2)`, `(N_b, 2)` xy pixels; `matches`
    `(M, 2)` index pairs into them; `inlier_mask` `(M,)` bool (e.g. from RANSAC). The figure keeps the canvas'
    pixel size. Returns the written path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure

    canvas = _side_by_side(image_a, image_b)
    starts = keypoints_a[matches[:, 0]]
    ends = keypoints_b[matches[:, 1]] + np.array([image_a.shape[1], 0])
    segments = np.stack([starts, ends], axis=1)  # (M, 2 ends, xy)

    dpi = 100
    figure = Figure(figsize=(canvas.shape[1] / dpi, canvas.shape[0] / dpi), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0, 0, 1, 1))
    axes.imshow(canvas)
    axes.set_axis_off()
    inlier_mask = np.asarray(inlier_mask, dtype=bool)
    layers = ([(~inlier_mask, OUTLIER_COLOUR)] if show_outliers else []) + [(inlier_mask, INLIER_COLOUR)]
    for selected, colour in layers:  # inliers drawn last, on top
        axes.add_collection(LineCollection(segments[selected], colors=colour, linewidths=0.8, alpha=0.8))
        axes.scatter(*segments[selected].reshape(-1, 2).T, s=4, c=colour)
    axes.set(xlim=(-0.5, canvas.shape[1] - 0.5), ylim=(canvas.shape[0] - 0.5, -0.5))
    return save_figure(figure, path, dpi)


def save_figure(figure, path: str | Path, dpi: int = 150) -> Path:
    """Write a matplotlib `Figure` to `path` (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path
