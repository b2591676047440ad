"""Rotary position embedding on the rope dimensions, with YaRN scaling.

DeepSeek-V3 rotates consecutive pairs (x[2i], x[2i+1]) as complex numbers
(`rope_interleave=True`, the official inference code); `rope_interleave=False`
pairs x[i] with x[i + d/2] (the "rotate half" layout). Either way we return the
rotated pairs as [real parts | imaginary parts]: queries and keys share the
layout, so their dot products are unchanged by that reordering.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
from keras import ops


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention-temperature factor 0.1 * m * ln(s) + 1 (1 when s <= 1)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    # The dimension whose wavelength completes `num_rotations` turns over max_pos.
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def rope_parameters(dim: int, base: float, yarn: Optional[dict],
                    max_position_embeddings: int) -> Tuple[np.ndarray, float]:
    """Returns (inverse frequencies [dim/2] float64, cos/sin scale).

    With YaRN, high-frequency dimensions keep their original frequency
    (extrapolation), low-frequency ones are divided by `factor`
    (interpolation), with a linear ramp between the correction range found
    from beta_fast / beta_slow rotations over the original context.
    """
    exponents = np.arange(0, dim, 2, dtype=np.float64) / dim
    inv_freq = 1.0 / (base ** exponents)
    if not yarn:
        return inv_freq, 1.0
    factor = float(yarn["factor"])
    original = yarn.get("original_max_position_embeddings") or max_position_embeddings
    beta_fast = yarn.get("beta_fast") or 32
    beta_slow = yarn.get("beta_slow") or 1
    low = _correction_dim(beta_fast, dim, base, original)
    high = _correction_dim(beta_slow, dim, base, original)
    if yarn.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    extrapolation = 1.0 - ramp
    inv_freq = (inv_freq / factor) * (1.0 - extrapolation) + inv_freq * extrapolation

    attention_factor = yarn.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = yarn.get("mscale"), yarn.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_get_mscale(factor)
    return inv_freq, float(attention_factor)


def softmax_scale(qk_head_dim: int, yarn: Optional[dict]) -> float:
    """1/sqrt(d), times mscale(factor, mscale_all_dim)^2 under YaRN."""
    scale = qk_head_dim ** -0.5
    if yarn and yarn.get("mscale_all_dim"):
        m = yarn_get_mscale(float(yarn["factor"]), float(yarn["mscale_all_dim"]))
        scale *= m * m
    return scale


class RotaryEmbedding:
    """Stateless helper: rotates [..., S, (heads,) dim] by per-token positions."""

    def __init__(self, dim: int, base: float, yarn: Optional[dict],
                 max_position_embeddings: int, interleave: bool = True):
        inv_freq, self.attention_factor = rope_parameters(dim, base, yarn, max_position_embeddings)
        self.inv_freq = inv_freq.astype("float32")
        self.dim = dim
        self.interleave = interleave

    def cos_sin(self, positions):
        """positions [B, S] int -> (cos, sin) [B, S, dim/2] float32."""
        angles = ops.cast(positions, "float32")[..., None] * ops.convert_to_tensor(self.inv_freq)
        return (ops.cos(angles) * self.attention_factor, ops.sin(angles) * self.attention_factor)

    def apply(self, x, cos, sin):
        """x [B, S, H, dim] (or [B, S, dim]); cos/sin [B, S, dim/2]."""
        if len(x.shape) == 4:
            cos, sin = cos[:, :, None, :], sin[:, :, None, :]
        dtype = x.dtype
        x = ops.cast(x, "float32")
        half = self.dim // 2
        if self.interleave:
            pairs = ops.reshape(x, tuple(ops.shape(x)[:-1]) + (half, 2))
            real, imag = pairs[..., 0], pairs[..., 1]
        else:
            real, imag = x[..., :half], x[..., half:]
        rotated = ops.concatenate([real * cos - imag * sin, real * sin + imag * cos], axis=-1)
        return ops.cast(rotated, dtype)
