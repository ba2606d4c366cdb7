"""Importing a ~1B-parameter Hugging Face checkpoint: seconds, GB/s and peak host memory.

    python experiments/benchmarks/hf_import.py [--dir DIR] [--params-scale 1.0] [--dtype bfloat16]
                                               [--shard-mb 500] [--generate-only]

Step 1 (once, cached in --dir): a Qwen3.5-shaped text checkpoint (model_type qwen3_5_text,
Qwen3_5ForCausalLM) with random bf16 weights, written by sleep_jax.hf.safetensors_io in
shards, with tensor names and shapes exactly those of transformers' state dict (lm_head is
tied, so absent, as save_pretrained leaves it). The widths are Qwen3.5's (hidden 2048, head_dim
256, 8/2 attention heads, 16x128 linear-attention heads, MLP 6144, vocab 151936); the depth is
cut to 12 layers (3 linear_attention then full_attention, 3 times) so the total is ~1.0e9.
--params-scale s < 1 shrinks widths, heads and vocab (same depth) to ~s * 1e9 for a smoke test.

Step 2, in a fresh subprocess (so nothing of step 1 is resident): import jax and sleep_jax,
start the backend, measure RSS, then time `sleep_jax.hf.load(dir, dtype=...)` until every
parameter is ready. peak_host_memory_over_model_bytes = (ru_maxrss - that RSS) / the loaded
model's own bytes; the goal is <= 1.3 (no host ever holds a second full copy). For scale, the
same process first times a plain sequential read of the checkpoint files (read_gb_per_s) in
the same page-cache state (hot, right after step 1). Prints a table, then one JSON object on
its last line (params, checkpoint_bytes, seconds, gb_per_s, peak_host_memory_over_model_bytes,
dtype, device, read_gb_per_s, model_bytes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import numpy as np  # noqa: E402

BASE = dict(hidden_size=2048, num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=2, head_dim=256,
            intermediate_size=6144, linear_num_key_heads=16, linear_num_value_heads=16, linear_key_head_dim=128,
            linear_value_head_dim=128, linear_conv_kernel_dim=4, vocab_size=151936)
DEFAULT_DIR = "/tmp/sleep_jax_bench/qwen35_1b"


def hf_config(width: float = 1.0) -> dict:
  """config.json as transformers' Qwen3_5TextConfig.save_pretrained writes it, widths * `width`."""
  r = lambda n, m: max(m, int(round(n * width / m)) * m)  # noqa: E731  (round to a multiple of m)
  kv = max(1, round(BASE["num_key_value_heads"] * width))
  c = dict(BASE, hidden_size=r(2048, 128), intermediate_size=r(6144, 128), vocab_size=r(151936, 64),
           num_key_value_heads=kv, num_attention_heads=kv * 4, linear_num_key_heads=max(1, round(16 * width)))
  c["linear_num_value_heads"] = c["linear_num_key_heads"]
  if width == 1.0:
    c = dict(BASE)
  n = c["num_hidden_layers"]
  return {"architectures": ["Qwen3_5ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
          "bos_token_id": None, "dtype": "bfloat16", "eos_token_id": None, "hidden_act": "silu",
          "initializer_range": 0.02, **c,
          "layer_types": ["full_attention" if i % 4 == 3 else "linear_attention" for i in range(n)],
          "max_position_embeddings": 32768, "model_type": "qwen3_5_text", "pad_token_id": None,
          "rms_norm_eps": 1e-6,
          "rope_parameters": {"partial_rotary_factor": 0.25, "rope_theta": 10000000, "rope_type": "default"},
          "tie_word_embeddings": True, "use_cache": True}


def tensor_specs(c: dict) -> list[tuple[str, tuple[int, ...], str]]:
  """(name, shape, init) in Qwen3_5ForCausalLM.state_dict() order; init is how transformers
  initialises it: "normal" (std 0.02), "zeros" (RMSNorm is 1 + w), "ones", "A_log"."""
  d, hd, f = c["hidden_size"], c["head_dim"], c["intermediate_size"]
  key_dim = c["linear_num_key_heads"] * c["linear_key_head_dim"]
  value_dim = c["linear_num_value_heads"] * c["linear_value_head_dim"]
  hv = c["linear_num_value_heads"]
  out = [("model.embed_tokens.weight", (c["vocab_size"], d), "normal")]
  for i, kind in enumerate(c["layer_types"]):
    p = f"model.layers.{i}."
    if kind == "linear_attention":
      conv_dim = 2 * key_dim + value_dim
      out += [(p + "linear_attn.dt_bias", (hv,), "ones"), (p + "linear_attn.A_log", (hv,), "A_log"),
              (p + "linear_attn.conv1d.weight", (conv_dim, 1, c["linear_conv_kernel_dim"]), "normal"),
              (p + "linear_attn.norm.weight", (c["linear_value_head_dim"],), "ones"),
              (p + "linear_attn.out_proj.weight", (d, value_dim), "normal"),
              (p + "linear_attn.in_proj_qkv.weight", (conv_dim, d), "normal"),
              (p + "linear_attn.in_proj_z.weight", (value_dim, d), "normal"),
              (p + "linear_attn.in_proj_b.weight", (hv, d), "normal"),
              (p + "linear_attn.in_proj_a.weight", (hv, d), "normal")]
    else:
      h, kv = c["num_attention_heads"], c["num_key_value_heads"]
      out += [(p + "self_attn.q_proj.weight", (2 * h * hd, d), "normal"),  # x2: queries and the output gate
              (p + "self_attn.k_proj.weight", (kv * hd, d), "normal"),
              (p + "self_attn.v_proj.weight", (kv * hd, d), "normal"),
              (p + "self_attn.o_proj.weight", (d, h * hd), "normal"),
              (p + "self_attn.q_norm.weight", (hd,), "zeros"), (p + "self_attn.k_norm.weight", (hd,), "zeros")]
    out += [(p + "mlp.gate_proj.weight", (f, d), "normal"), (p + "mlp.up_proj.weight", (f, d), "normal"),
            (p + "mlp.down_proj.weight", (d, f), "normal"),
            (p + "input_layernorm.weight", (d,), "zeros"), (p + "post_attention_layernorm.weight", (d,), "zeros")]
  return out + [("model.norm.weight", (d,), "zeros")]


def count(c: dict) -> int:
  return sum(math.prod(s) for _, s, _ in tensor_specs(c))


def config_for_scale(scale: float) -> dict:
  """The widths whose parameter count is closest to scale * count(BASE) (depth fixed)."""
  if scale == 1.0:
    return hf_config(1.0)
  target = scale * count(hf_config(1.0))
  widths = np.geomspace(0.02, 2.0, 400)
  return hf_config(float(min(widths, key=lambda w: abs(count(hf_config(float(w))) - target))))


def random_tensors(c: dict, seed: int = 0):
  """Lazily, one tensor at a time (write_checkpoint holds at most one shard)."""
  import ml_dtypes

  rng = np.random.default_rng(seed)
  for name, shape, init in tensor_specs(c):
    if init == "normal":
      x = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    elif init == "zeros":  # plus a little noise, so an import that drops a norm shows up
      x = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.01)
    elif init == "ones":
      x = np.ones(shape, np.float32)
    else:  # A_log = log(U(0.01, 16)), as Qwen3_5GatedDeltaNet initialises it
      x = np.log(rng.uniform(0.01, 16, shape)).astype(np.float32)
    yield name, x.astype(ml_dtypes.bfloat16)
    del x


def generate(out_dir: str, c: dict, shard_bytes: int) -> bool:
  """Write the checkpoint unless out_dir already holds this exact one. Returns True if written."""
  from sleep_jax.hf.safetensors_io import CheckpointReader, HFError, write_checkpoint

  path = os.path.join(out_dir, "config.json")
  if os.path.exists(path):
    try:
      with open(path) as f, CheckpointReader(out_dir) as r:
        same = json.load(f) == c and sorted(r.names()) == sorted(n for n, _, _ in tensor_specs(c))
      if same:
        return False
    except (HFError, ValueError):
      pass
  os.makedirs(out_dir, exist_ok=True)
  _remove(path)  # the directory names a config only once its weights are complete
  write_checkpoint(out_dir, random_tensors(c), max_shard_bytes=shard_bytes)
  with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
    json.dump({"_from_model_config": True, "transformers_version": "5.0.0"}, f, indent=2)
  _tokenizer(out_dir)
  with open(path + ".tmp", "w") as f:
    json.dump(c, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)
  return True


def _tokenizer(out_dir: str) -> None:
  """A small byte-level BPE so the directory is complete (load reads tokenizer.json); its
  vocabulary is smaller than the model's, as Qwen's own is (151669 < 151936)."""
  from sleep_jax.tokenizer import train_bpe

  train_bpe([os.path.join(os.path.dirname(os.__file__), "json")], out_dir, vocab_size=1024, show_progress=False)


def _remove(path: str) -> None:
  if os.path.exists(path):
    os.remove(path)


def _rss_bytes() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
  raise RuntimeError("no VmRSS in /proc/self/status")


def child(args) -> None:
  """The measured process: prints one JSON line."""
  import resource

  import jax

  import sleep_jax.hf

  files = [os.path.join(args.dir, f) for f in sorted(os.listdir(args.dir)) if f.endswith(".safetensors")]
  ckpt_bytes = sum(os.path.getsize(f) for f in files)
  buf = bytearray(2**20)  # small: its pages would count in the peak measured below
  t0 = time.perf_counter()
  for f in files:  # plain sequential read, same page-cache state as the load that follows
    with open(f, "rb", buffering=0) as fh:
      while fh.readinto(buf):
        pass
  read_s = time.perf_counter() - t0
  del buf
  # Start the backend first: a GPU client's host-side setup (hundreds of MB) is not the load's.
  jax.block_until_ready(jax.numpy.zeros(8) + 1)
  rss0 = _rss_bytes()
  t0 = time.perf_counter()
  cfg, model = sleep_jax.hf.load(args.dir, dtype=args.dtype)
  leaves = _arrays(model)
  jax.block_until_ready(leaves)
  seconds = time.perf_counter() - t0
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
  model_bytes = sum(x.nbytes for x in leaves)
  params = sum(x.size for x in _arrays(model, params_only=True))
  d = jax.devices()[0]
  print(json.dumps({"params": int(params), "checkpoint_bytes": ckpt_bytes, "seconds": seconds,
                    "gb_per_s": ckpt_bytes / seconds / 1e9, "read_gb_per_s": ckpt_bytes / read_s / 1e9,
                    "peak_host_memory_over_model_bytes": (peak - rss0) / model_bytes, "model_bytes": model_bytes,
                    "peak_host_bytes_over_start": peak - rss0, "dtype": args.dtype,
                    "device": f"{d.platform}:{d.device_kind} x{jax.device_count()}"}))


def _arrays(model, params_only: bool = False) -> list:
  import jax
  from flax import nnx

  tree = nnx.state(model, nnx.Param) if params_only else nnx.state(model)
  return [x for x in jax.tree.leaves(tree) if hasattr(x, "nbytes")]


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--dir", default=None, help=f"checkpoint cache (default {DEFAULT_DIR}[_scaleS])")
  p.add_argument("--params-scale", type=float, default=1.0, help="~S * 1e9 parameters (e.g. 0.05 for a smoke test)")
  p.add_argument("--dtype", default="bfloat16", help="dtype hf.load casts to (default bfloat16)")
  p.add_argument("--shard-mb", type=float, default=500, help="max shard size in MB (default 500)")
  p.add_argument("--generate-only", action="store_true", help="write the checkpoint and stop")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.dir is None:
    args.dir = DEFAULT_DIR if args.params_scale == 1.0 else f"{DEFAULT_DIR}_scale{args.params_scale:g}"
  if args.child:
    child(args)
    return 0
  c = config_for_scale(args.params_scale)
  n = count(c)
  t0 = time.perf_counter()
  wrote = generate(args.dir, c, int(args.shard_mb * 1e6))
  shards = sorted(f for f in os.listdir(args.dir) if f.endswith(".safetensors"))
  print(f"checkpoint: {args.dir}  {n:,} params ({n / 1e9:.3f}e9), {len(shards)} shard(s), hidden "
        f"{c['hidden_size']}, {c['num_hidden_layers']} layers, vocab {c['vocab_size']}  "
        f"({'written in %.1f s' % (time.perf_counter() - t0) if wrote else 'cached'})", flush=True)
  if args.generate_only:
    return 0
  r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--dir", args.dir, "--dtype", args.dtype],
                     capture_output=True, text=True)
  if r.returncode != 0:
    sys.stderr.write(r.stderr[-4000:])
    print(f"error: the load subprocess exited {r.returncode}", file=sys.stderr)
    return 1
  res = json.loads(r.stdout.strip().splitlines()[-1])
  rows = [("parameters", f"{res['params']:,}"), ("checkpoint", f"{res['checkpoint_bytes'] / 1e9:.3f} GB"),
          ("load seconds", f"{res['seconds']:.2f}"), ("load GB/s", f"{res['gb_per_s']:.2f}"),
          ("plain read GB/s", f"{res['read_gb_per_s']:.2f}"),
          ("peak host / model bytes", f"{res['peak_host_memory_over_model_bytes']:.3f} (goal <= 1.3)"),
          ("dtype", res["dtype"]), ("device", res["device"])]
  for k, v in rows:
    print(f"{k:<24} {v}")
  keys = ("params", "checkpoint_bytes", "seconds", "gb_per_s", "peak_host_memory_over_model_bytes", "dtype", "device",
          "read_gb_per_s", "model_bytes")
  print(json.dumps({k: res[k] for k in keys}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
