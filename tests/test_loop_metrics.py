"""The loop's observability: metrics read one step late log exactly the losses of stepping the
Trainer by hand; throughput keys (tokens/s per device, FLOPs, MFU); train.profile_steps
writes a jax.profiler trace."""

import glob
import os

import numpy as np
import pytest

from conftest import TINY
from sleep_jax import data as data_lib
from sleep_jax import sharding as shd
from sleep_jax import throughput
from sleep_jax.config import ConfigError, load_config
from sleep_jax.loop import train
from sleep_jax.metrics import read_metrics
from sleep_jax.train import Trainer


def test_late_read_metrics_equal_stepping_by_hand_and_carry_throughput(tiny_overrides, tmp_path):
  # Steps 1, 2, 4 and 6 are read one step late; 3 and 5 (saves) and 6 (the last) at once.
  cfg = load_config(TINY, tiny_overrides + ["train.steps=6", "checkpoint.every=3", "train.profile_steps=[2,3]",
                                            "train.peak_flops_per_device=1e12", "train.batch_size=8"])
  train(cfg)
  rows = [r for r in read_metrics(cfg.run_dir) if "loss" in r]
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]

  trainer = Trainer(cfg)  # the reference: the same steps, each read at once
  state = trainer.init_state()
  it = data_lib.make_train_iterator(cfg.data, global_batch_size=cfg.train.batch_size, seed=cfg.seed)
  ref = []
  for _ in range(6):
    state, m = trainer.train_step(state, shd.global_batch(next(it), trainer.mesh))
    ref.append((float(m["loss"]), float(m["grad_norm"])))
  assert [(r["loss"], r["grad_norm"]) for r in rows] == ref  # identical, not close

  tokens_per_step = cfg.train.batch_size * (cfg.data.seq_len - 1)
  for r in rows:
    assert r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"] / 8)
    assert r["flops_per_step"] > 6 * 1e4 * tokens_per_step  # > 6 x (params: ~1e5) x tokens, roughly
    step_s = tokens_per_step / r["tokens_per_s"]
    assert r["mfu"] == pytest.approx(r["flops_per_step"] / 8 / step_s / 1e12)
  assert glob.glob(os.path.join(cfg.run_dir, "profile", "**", "*.xplane.pb"), recursive=True)


def test_peak_table_and_profile_steps_validation():
  assert throughput.known_peak("TPU v5 lite") == 197e12 and throughput.known_peak("TPU v5p") == 459e12
  assert throughput.known_peak("NVIDIA H100 80GB HBM3") == 989e12 and throughput.known_peak("TPU v4") == 275e12
  assert throughput.known_peak("some new chip") is None
  assert throughput.peak_flops_per_device(3.0) == 3.0
  assert throughput.peak_flops_per_device(0.0) > 1e8  # CPU: a jnp.dot timed here
  for bad in ("[3]", "[0,2]", "[4,2]"):
    with pytest.raises(ConfigError, match="train.profile_steps"):
      load_config(None, [f"train.profile_steps={bad}"])
  np.testing.assert_equal(load_config(None, ["train.profile_steps=[2,2]"]).train.profile_steps, [2, 2])
