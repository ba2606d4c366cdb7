"""Config: YAML + overrides, one-line errors naming the key, the resolved config on disk."""

import pytest

from conftest import TINY
from sleep_jax import cli
from sleep_jax.config import Config, ConfigError, diff, load_config, to_yaml


def test_every_documented_override_works(tmp_path):
  cfg = load_config(TINY, [f"run_dir={tmp_path}", "train.steps=7", "checkpoint.every=3", "sleep.passes=4",
                           "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "seed=5"])
  assert (cfg.run_dir, cfg.train.steps, cfg.checkpoint.every, cfg.sleep.passes) == (str(tmp_path), 7, 3, 4)
  assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg.seed) == (2, 2, 2, 5)
  assert isinstance(cfg, Config) and isinstance(cfg.train.steps, int)


def test_resolved_config_round_trips(tmp_path):
  cfg = load_config(TINY, ["sleep.passes=3", "data.task_options.K=3"])
  path = tmp_path / "config.yaml"
  path.write_text(to_yaml(cfg))
  again = load_config(str(path))
  assert diff(cfg, again) == []
  assert again.data.task_options["K"] == 3


@pytest.mark.parametrize("overrides, expected", [
    (["train.stepz=3"], "unknown config key 'train.stepz'"),
    (["bogus=1"], "unknown config key 'bogus'"),
    (["train.steps=abc"], "bad value for config key 'train.steps'"),
    (["model.kind=rnn"], "bad value for config key 'model.kind'"),
    (["mesh.tensor=0"], "bad value for config key 'mesh.tensor'"),
    (["train.batch_size=30", "train.grad_accum=4"], "bad value for config key 'train.grad_accum'"),
    (["train.steps"], "not of the form key=value"),
    (["model.attn_conv=-1"], "bad value for config key 'model.attn_conv'"),
])
def test_bad_overrides_name_the_key(overrides, expected):
  with pytest.raises(ConfigError) as e:
    load_config(TINY, overrides)
  assert expected in str(e.value)
  assert "\n" not in str(e.value)


def test_malformed_and_missing_yaml(tmp_path):
  bad = tmp_path / "bad.yaml"
  bad.write_text("train:\n  steps: [3\n")
  with pytest.raises(ConfigError, match="malformed YAML"):
    load_config(str(bad))
  with pytest.raises(ConfigError, match="not found"):
    load_config(str(tmp_path / "nope.yaml"))
  wrong_type = tmp_path / "wrong.yaml"
  wrong_type.write_text("train:\n  lr: fast\n")
  with pytest.raises(ConfigError, match="'train.lr'"):
    load_config(str(wrong_type))


def test_cli_prints_one_line_without_traceback(capsys):
  code = cli.main(["train", TINY, "train.stepz=3"])
  err = capsys.readouterr().err.strip()
  assert code == 2
  assert err == "error: unknown config key 'train.stepz'"
