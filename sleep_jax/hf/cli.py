"""`sleep-jax import-hf`, `export-hf` and `generate`: real checkpoints in and out, and text out.

A model PATH is any of: a Hugging Face directory (config.json + safetensors), a sleep_jax
model directory written by `import-hf` (config.yaml + params/, orbax), or a run directory
(config.yaml + checkpoints/: its newest readable checkpoint).
"""

from __future__ import annotations

import os
import sys

EXIT_USAGE = 2


def _model_dir_params(path: str, abstract):
  import orbax.checkpoint as ocp

  return ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(path, "params")), abstract)


def load_model(path: str, *, dtype: str = "float32"):
  """(cfg, model, tokenizer directory or None) from a model PATH (see the module docstring)."""
  from flax import nnx

  from sleep_jax import hf
  from sleep_jax.config import ConfigError, load_config

  if os.path.exists(os.path.join(path, "config.json")):
    cfg, model = hf.load(path, dtype=dtype)
    return cfg, model, path
  if not os.path.exists(os.path.join(path, "config.yaml")):
    raise ConfigError(f"{path} is neither a Hugging Face directory (config.json) nor a sleep_jax model or run "
                      "directory (config.yaml)")
  from sleep_jax.checkpoint import CheckpointError, Checkpointer
  from sleep_jax.train import Trainer

  cfg = load_config(os.path.join(path, "config.yaml"), [f"run_dir={path}", "mesh.data=1", "mesh.fsdp=1",
                                                        "mesh.tensor=1"])
  import jax

  from sleep_jax import sharding as shd

  trainer = Trainer(cfg, mesh=shd.make_mesh(cfg.mesh, devices=jax.devices()[:1]))
  if os.path.isdir(os.path.join(path, "params")):
    params = _model_dir_params(path, trainer.abstract_state["params"])
  else:
    ckpt = Checkpointer(path, keep=cfg.checkpoint.keep, async_save=False)
    restored = ckpt.restore_latest(trainer.abstract_state)
    ckpt.close()
    if restored is None:
      raise CheckpointError(f"no readable checkpoint in {ckpt.directory}")
    params = restored[1]["params"]
  tok = path if os.path.exists(os.path.join(path, "tokenizer.json")) else cfg.model.init_from
  return cfg, nnx.merge(trainer.graphdef, params), tok


def cmd_import(args) -> int:
  import orbax.checkpoint as ocp
  from flax import nnx

  from sleep_jax import hf
  from sleep_jax.config import to_yaml
  from sleep_jax.tokenizer import TokenizerError, load_tokenizer

  cfg, model = hf.load(args.hf_dir, dtype=args.dtype)
  out = os.path.abspath(args.out)
  if os.path.exists(os.path.join(out, "params")):
    print(f"error: {out} already holds an imported model (params/)", file=sys.stderr)
    return EXIT_USAGE
  os.makedirs(out, exist_ok=True)
  import dataclasses

  cfg = dataclasses.replace(cfg, run_dir=out)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(out, "params"), params)
  ckptr.wait_until_finished()
  with open(os.path.join(out, "config.yaml"), "w") as f:
    f.write(to_yaml(cfg))
  try:
    load_tokenizer(args.hf_dir).save(out)
  except TokenizerError:
    pass
  n = sum(x.size for x in __import__("jax").tree.leaves(params))
  pattern = cfg.model.layer_pattern if cfg.model.kind == "hybrid" else ["attn"]
  print(f"imported {cfg.model.hf_arch} ({n / 1e6:.2f}M parameters, {args.dtype}, layers {pattern} x "
        f"{cfg.model.pattern_repeats if cfg.model.kind == 'hybrid' else cfg.model.n_layers}) -> {out}")
  return 0


def cmd_export(args) -> int:
  from sleep_jax import hf

  cfg, model, tok = load_model(args.run_dir)
  names = hf.save(model, cfg, args.out, dtype=args.dtype)
  if tok and tok != cfg.model.init_from and os.path.exists(os.path.join(tok, "tokenizer.json")):
    from sleep_jax.tokenizer import load_tokenizer

    load_tokenizer(tok).save(args.out)
  print(f"exported {cfg.model.hf_arch or 'model'} -> {args.out} ({', '.join(names)})")
  return 0


def cmd_generate(args) -> int:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from sleep_jax.generate import generate
  from sleep_jax.tokenizer import TokenizerError, load_tokenizer

  cfg, model, tok_dir = load_model(args.path, dtype=args.dtype)
  if not tok_dir:
    print(f"error: {args.path} has no tokenizer (tokenizer.json or tokenizer.model)", file=sys.stderr)
    return EXIT_USAGE
  try:
    tok = load_tokenizer(tok_dir)
  except TokenizerError as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_USAGE
  ids = tok.encode(args.prompt, add_bos=tok.add_bos_default)
  if not ids:
    print("error: the prompt encodes to no tokens", file=sys.stderr)
    return EXIT_USAGE
  out = generate(model, jnp.asarray([ids], jnp.int32), cfg, steps=args.max_new_tokens, rng=jax.random.key(args.seed),
                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
  new = [int(t) for t in np.asarray(out)[0, len(ids):]]
  stops = set(tok.eos_ids or ([tok.eos_id] if tok.eos_id is not None else []))
  for i, t in enumerate(new):
    if t in stops:
      new = new[:i]
      break
  print(args.prompt + tok.decode(new))
  return 0


def register(sub) -> None:
  i = sub.add_parser("import-hf", help="import a Hugging Face checkpoint as a sleep_jax model directory",
                     description="Read HF_DIR (config.json, safetensors, tokenizer) and write OUT/config.yaml + "
                                 "OUT/params (orbax) + the tokenizer. Unsupported architectures and missing, extra "
                                 "or misshapen tensors get one line and exit 2.")
  i.add_argument("hf_dir")
  i.add_argument("out")
  i.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  i.set_defaults(func=cmd_import)
  e = sub.add_parser("export-hf", help="write a run (or model) directory as a Hugging Face checkpoint",
                     description="Safetensors shards + index + config.json + tokenizer that transformers loads "
                                 "as it is (AutoModelForCausalLM.from_pretrained(OUT)).")
  e.add_argument("run_dir", help="a run directory (newest checkpoint) or an import-hf model directory")
  e.add_argument("out")
  e.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default: float32")
  e.set_defaults(func=cmd_export)
  g = sub.add_parser("generate", help="sample a continuation of a prompt",
                     description="Wake decoding: one pass per token with the decoder's caches; a model trained "
                                 "with eviction sleeps (sleep.passes) each time its KV cache fills.")
  g.add_argument("path", help="a Hugging Face, model or run directory")
  g.add_argument("--prompt", required=True)
  g.add_argument("--max-new-tokens", type=int, default=32)
  g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  g.add_argument("--top-k", type=int, default=0)
  g.add_argument("--top-p", type=float, default=1.0)
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  g.set_defaults(func=cmd_generate)
