"""Image conversion shared by the data loaders and the streams: uint8 to float, centre crop and resize.

Pure NumPy / PIL functions of one image [H, W, C] or a batch [N, H, W, C]; the results are float32 in [0, 1].
"""
from __future__ import annotations

import numpy as np

__all__ = ["crop_resize", "crop_resize_batch", "to_unit_float"]


def to_unit_float(images: np.ndarray) -> np.ndarray:
  """uint8 [..] -> float32 in [0, 1]; float input is passed through."""
  if images.dtype == np.uint8:
    return images.astype(np.float32) / np.float32(255.0)
  return images.astype(np.float32)


def crop_resize(image: np.ndarray, size: int | None, crop: int | None):
  """Centre-crops an image [H, W, C] to a square and resizes it.

  Args:
    image: uint8 or float array of shape [H, W, C].
    size: output side, or None to only crop.
    crop: side of the centre crop; None crops to the shorter side. A crop
      larger than the image is clipped to the shorter side.

  Returns:
    float32 array of shape [size, size, C] in [0, 1].
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  h, w, c = image.shape
  side = min(h, w) if crop is None else min(crop, h, w)
  top, left = (h - side) // 2, (w - side) // 2
  image = image[top:top + side, left:left + side]
  if size is None or size == side:
    return to_unit_float(image)
  resample = Image.Resampling.BICUBIC
  if image.dtype == np.uint8 and c in (1, 3):
    pil = Image.fromarray(image[..., 0] if c == 1 else image)
    out = np.asarray(pil.resize((size, size), resample))
    return to_unit_float(out.reshape(size, size, c))
  image = to_unit_float(image)
  channels = [
      np.asarray(Image.fromarray(np.ascontiguousarray(image[..., k])).resize(
          (size, size), resample)) for k in range(c)
  ]
  return np.clip(np.stack(channels, axis=-1), 0.0, 1.0).astype(np.float32)


def crop_resize_batch(images: np.ndarray, size: int, crop: int | None):
  """Applies :func:`crop_resize` to images of shape [N, H, W, C]."""
  out = np.empty((images.shape[0], size, size, images.shape[-1]), np.float32)
  for i, image in enumerate(images):
    out[i] = crop_resize(image, size, crop)
  return out
