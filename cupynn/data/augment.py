"""Random affine augmentation of flattened images, on the device of the batch.

Each image of a batch gets its own rotation, translation and scale, drawn on
the host from a ``numpy.random.Generator`` (so the same seed gives the same
transforms on the CPU and the GPU); the resampling then runs where the batch
lives, vectorised over the whole batch with the array module of its backend:
for every output pixel of every image, the source position is computed by the
inverse transform, and the four neighbouring pixels are gathered and blended
bilinearly. Source positions outside the image read 0 (KMNIST's background).

Conventions, in pixel units with rows pointing down the image:

- the transform is about the image centre ``((h - 1) / 2, (w - 1) / 2)``;
- a positive angle turns the content counter-clockwise as displayed
  (90 degrees is ``numpy.rot90(image)``);
- a shift ``(dy, dx)`` moves the content ``dy`` rows down and ``dx`` columns
  right (an integer shift is ``numpy.roll`` with zeros coming in);
- a scale above 1 enlarges the content.

The defaults (±10 degrees, ±2 pixels, scale 0.9–1.1) are modest on purpose: the
paper names the three transforms but gives no values, and on 28x28 characters
these keep every stroke inside the frame while changing each training image
from epoch to epoch. ``RandomAffine(0, 0, (1, 1))`` is the identity and
returns its input unchanged.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy

from ..backend import backend_of
from ..validation import check_int, check_real

DEFAULT_ROTATION = 10.0
DEFAULT_TRANSLATION = 2.0
DEFAULT_SCALE = (0.9, 1.1)


class RandomAffine:
    """Random rotation, translation and scale of each image in a batch.

    Parameters
    ----------
    rotation : float in [0, 180]
        Angles are drawn uniformly from [-rotation, rotation] degrees.
    translation : float >= 0
        Shifts along each axis are drawn uniformly from [-translation,
        translation] pixels, independently for rows and columns.
    scale : (float, float)
        Scales are drawn uniformly from [low, high], 0 < low <= high.
    image_shape : (int, int)
        (height, width); a batch has ``height * width`` features per row.

    Examples
    --------
    >>> augment = RandomAffine(image_shape=(28, 28))
    >>> x_aug = augment(x_batch, rng)   # (batch, 784) float, same backend and dtype
    """

    def __init__(self, rotation: float = DEFAULT_ROTATION, translation: float = DEFAULT_TRANSLATION,
                 scale: tuple[float, float] = DEFAULT_SCALE,
                 image_shape: tuple[int, int] = (28, 28)) -> None:
        owner = "RandomAffine"
        self.rotation = check_real(rotation, "rotation", owner, 0.0, 180.0)
        self.translation = check_real(translation, "translation", owner, 0.0)
        if (not isinstance(scale, (tuple, list)) or len(scale) != 2
                or not all(isinstance(s, numbers.Real) and not isinstance(s, bool) for s in scale)
                or not 0 < scale[0] <= scale[1] or not numpy.isfinite(scale[1])):
            raise ValueError(f"The 'scale' parameter of {owner} must be a pair (low, high) with "
                             f"0 < low <= high. Got {scale!r} instead.")
        self.scale = (float(scale[0]), float(scale[1]))
        self.image_shape = _check_image_shape(image_shape, owner)

    @property
    def is_identity(self) -> bool:
        """True when every draw is the identity (the augmentation is off)."""
        return self.rotation == 0 and self.translation == 0 and self.scale == (1.0, 1.0)

    def sample(self, n: int, rng: numpy.random.Generator,
               ) -> tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray]:
        """Draw the parameters of ``n`` transforms on the host.

        One ``rng.random((n, 4))`` call per batch, so the stream advances the
        same way whatever the settings.

        Returns
        -------
        angles : (n,) float64, degrees
        shifts : (n, 2) float64, (dy, dx) in pixels
        scales : (n,) float64
        """
        n = check_int(n, "n", "RandomAffine.sample", 0)
        u = rng.random((n, 4))
        angles = (2 * u[:, 0] - 1) * self.rotation
        shifts = (2 * u[:, 1:3] - 1) * self.translation
        low, high = self.scale
        scales = low + u[:, 3] * (high - low)
        return angles, shifts, scales

    def __call__(self, x: Any, rng: numpy.random.Generator, *,
                 rows: tuple[int, int] | None = None, total: int | None = None) -> Any:
        """Augment a batch, or one rank's rows of a batch.

        Parameters
        ----------
        x : (batch, height * width) float array, NumPy or CuPy
        rng : numpy.random.Generator
            Source of the per-image parameters (drawn on the host).
        rows, total : optional
            ``x`` is rows ``[start, stop)`` of a batch of ``total`` images (a
            rank's share in data-parallel training): the parameters of all
            ``total`` are drawn, so the stream advances as for the whole batch,
            and those of ``x``'s rows are applied.

        Returns
        -------
        (batch, height * width) array of ``x``'s dtype, on ``x``'s device;
        ``x`` itself when :attr:`is_identity`.
        """
        if not isinstance(rng, numpy.random.Generator):
            raise TypeError("The 'rng' parameter of RandomAffine must be a numpy.random.Generator. "
                            f"Got {type(rng).__name__} instead.")
        _check_batch(x, self.image_shape, "RandomAffine")
        if self.is_identity:
            return x
        if rows is None:
            start, stop = 0, x.shape[0]
            total = x.shape[0]
        else:
            start, stop = (int(r) for r in rows)
            if total is None or not 0 <= start <= stop <= total or stop - start != x.shape[0]:
                raise ValueError(f"RandomAffine: rows {rows!r} of a batch of total={total!r} "
                                 f"images do not match the {x.shape[0]} given.")
        angles, shifts, scales = self.sample(total, rng)
        if stop == start:
            return x
        return affine_transform(x, self.image_shape, angles[start:stop], shifts[start:stop],
                                scales[start:stop])

    def __repr__(self) -> str:
        return (f"RandomAffine(rotation={self.rotation:g}, translation={self.translation:g}, "
                f"scale=({self.scale[0]:g}, {self.scale[1]:g}), image_shape={self.image_shape})")


def affine_transform(x: Any, image_shape: tuple[int, int], angles: Any, shifts: Any,
                     scales: Any) -> Any:
    """Rotate, scale and shift each image of a batch by its own parameters.

    Each output pixel ``p`` (row, column; centred on the image centre ``c``)
    reads the input at ``c + R(-angle) (p - c - shift) / scale`` by bilinear
    interpolation, 0 outside the image. With angle 0, shift 0 and scale 1 the
    source positions are the pixel positions themselves and the output equals
    the input exactly.

    Parameters
    ----------
    x : (batch, height * width) float array, NumPy or CuPy
    image_shape : (int, int)
    angles : (batch,) degrees, counter-clockwise as displayed
    shifts : (batch, 2) pixels, (dy, dx): down and right
    scales : (batch,) positive

    Returns
    -------
    (batch, height * width) array, ``x``'s dtype and device.
    """
    owner = "affine_transform"
    height, width = _check_image_shape(image_shape, owner)
    _check_batch(x, (height, width), owner)
    n = x.shape[0]
    angles = numpy.asarray(angles, dtype=numpy.float64)
    shifts = numpy.asarray(shifts, dtype=numpy.float64)
    scales = numpy.asarray(scales, dtype=numpy.float64)
    if angles.shape != (n,) or shifts.shape != (n, 2) or scales.shape != (n,):
        raise ValueError(f"The parameters of {owner} must have shapes ({n},), ({n}, 2) and ({n},) "
                         f"for a batch of {n}. Got {angles.shape}, {shifts.shape} and "
                         f"{scales.shape} instead.")
    if not (numpy.all(numpy.isfinite(angles)) and numpy.all(numpy.isfinite(shifts))
            and numpy.all(numpy.isfinite(scales)) and numpy.all(scales > 0)):
        raise ValueError(f"The parameters of {owner} must be finite, with positive scales.")
    xp = backend_of(x).xp
    dtype = x.dtype

    # Inverse map, on the host in float64: [r_src, c_src] = (1/s) [[cos, sin], [-sin, cos]]
    # [r - dy, c - dx] about the centre. cos(0) = 1 and sin(0) = 0 exactly, so the identity
    # gives integer source positions and hence the input unchanged.
    theta = numpy.deg2rad(angles)
    a = numpy.cos(theta) / scales
    b = numpy.sin(theta) / scales
    coefs = xp.asarray(numpy.stack([a, b, shifts[:, 0], shifts[:, 1]]).astype(dtype))
    a, b, dy, dx = (coefs[i][:, None] for i in range(4))           # each (n, 1)
    cy, cx = (height - 1) / 2, (width - 1) / 2
    rows = xp.repeat(xp.arange(height, dtype=dtype) - dtype.type(cy), width)[None, :]   # (1, P)
    cols = xp.tile(xp.arange(width, dtype=dtype) - dtype.type(cx), height)[None, :]
    rows = rows - dy                                                 # (n, P), centred, unshifted
    cols = cols - dx
    src_r = a * rows + b * cols + dtype.type(cy)
    src_c = a * cols - b * rows + dtype.type(cx)

    r0 = xp.floor(src_r)
    c0 = xp.floor(src_c)
    fr = src_r - r0
    fc = src_c - c0
    r0 = r0.astype(numpy.int32)
    c0 = c0.astype(numpy.int32)
    out = xp.zeros_like(x)
    for drow, dcol, weight in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc),
                               (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
        r = r0 + drow
        c = c0 + dcol
        inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
        flat = xp.where(inside, r * width + c, 0)
        values = xp.take_along_axis(x, flat, axis=1)
        out += xp.where(inside, weight * values, 0).astype(dtype, copy=False)
    return out


def _check_image_shape(image_shape: Any, owner: str) -> tuple[int, int]:
    if (not isinstance(image_shape, (tuple, list)) or len(image_shape) != 2
            or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0
                       for s in image_shape)):
        raise ValueError(f"The 'image_shape' parameter of {owner} must be a pair of positive "
                         f"ints (height, width). Got {image_shape!r} instead.")
    return int(image_shape[0]), int(image_shape[1])


def _check_batch(x: Any, image_shape: tuple[int, int], owner: str) -> None:
    pixels = image_shape[0] * image_shape[1]
    if getattr(x, "ndim", None) != 2 or x.shape[1] != pixels:
        raise ValueError(f"The 'x' parameter of {owner} must have shape (batch, {pixels}) for "
                         f"images of shape {image_shape}. "
                         f"Got {getattr(x, 'shape', type(x).__name__)} instead.")
    if x.dtype.kind != "f":
        raise TypeError(f"The 'x' parameter of {owner} must be a float array. "
                        f"Got {x.dtype} instead.")
