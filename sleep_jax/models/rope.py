"""Rotary position embedding: the half-split ("rotate_half") convention of Llama and Qwen,
with partial rotary (only the first `rotary_dim` channels of a head turn) and Llama 3's
frequency scaling.

The frequencies are built in the traced program (XLA folds them to constants), as
base^(-i / half) for the i-th of the half = rotary_dim / 2 channel pairs -- the same angles
as transformers' 1 / base^(2i / rotary_dim), to float32 rounding.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sleep_jax.ops.dense import materialize


def inv_frequencies(rotary_dim: int, base: float, scaling: tuple = ()) -> jax.Array:
  """float32 [rotary_dim // 2]: the angle per position of each rotated channel pair.
  scaling: the checkpoint's rope_scaling as sorted (key, value) pairs, () for none."""
  half = rotary_dim // 2
  inv = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  opts = dict(scaling)
  kind = opts.get("rope_type", opts.get("type", "default"))
  if kind in ("default", None):
    return inv
  if kind == "linear":
    return inv / opts["factor"]
  if kind == "llama3":
    # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between.
    factor = float(opts["factor"])
    low, high = float(opts.get("low_freq_factor", 1.0)), float(opts.get("high_freq_factor", 4.0))
    old_len = float(opts["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(medium, smoothed, scaled)
  raise ValueError(f"unsupported RoPE scaling {kind!r} (supported: default, linear, llama3)")


def check_scaling(scaling: dict) -> None:
  """A one-line ValueError for a scaling this module cannot apply (at config time)."""
  kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
  if kind not in ("default", "linear", "llama3"):
    raise ValueError(f"unsupported RoPE scaling {kind!r} (supported: default, linear, llama3)")


def rope(x_BTHK: jax.Array, positions_BT: jax.Array, rotary_dim: int, base: float, scaling: tuple = ()) -> jax.Array:
  """Rotate the first rotary_dim channels of each head (pairs i, i + rotary_dim / 2); the
  rest pass through."""
  half = rotary_dim // 2
  angle_BTF = positions_BT[..., None].astype(jnp.float32) * inv_frequencies(rotary_dim, base, scaling)
  sin, cos = materialize((jnp.sin(angle_BTF)[:, :, None, :], jnp.cos(angle_BTF)[:, :, None, :]))
  x = x_BTHK.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:rotary_dim]
  out = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
  if rotary_dim < x.shape[-1]:
    out.append(x[..., rotary_dim:])
  return jnp.concatenate(out, axis=-1).astype(x_BTHK.dtype)
