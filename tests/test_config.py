"""Config: defaults, YAML diffs, dotted overrides, validation errors that name the key."""
import pytest

from depthg.config import Config, ConfigError, load_config, mask_secrets, parse_overrides, split_cli, to_dict


def test_defaults_build():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.loss.depth.mode == "paper"


def test_precedence_cli_over_yaml_over_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.01\n  micro_batch_per_gpu: 4\nloss:\n  depth:\n    mode: distance\n")
    cfg = load_config(str(path), ["train.lr=1e-3", "loss.depth.gamma=0.5"])
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.train.micro_batch_per_gpu == 4
    assert cfg.loss.depth.mode == "distance"
    assert cfg.loss.depth.gamma == 0.5
    assert cfg.train.grad_accum == Config().train.grad_accum


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["train.learning_rate=1"])
    msg = str(err.value)
    assert "train.learning_rate" in msg and "micro_batch_per_gpu" in msg


def test_unknown_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="trainer"):
        load_config(str(path))


@pytest.mark.parametrize("override,key", [
    ("train.micro_batch_per_gpu=abc", "train.micro_batch_per_gpu"),
    ("train.lr=fast", "train.lr"),
    ("loss.pointwise=3", "loss.pointwise"),
    ("loss.depth.mode=bogus", "loss.depth.mode"),
    ("sampling.mode=grid", "sampling.mode"),
])
def test_wrong_type_or_value_names_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=[override])


def test_section_given_a_scalar():
    with pytest.raises(ConfigError, match="loss.depth"):
        load_config(overrides=["loss.depth=3"])


def test_parse_overrides_types():
    d = parse_overrides(["a.b=8", "a.c=true", "a.d=1e-3", "e=s3://bucket/x"])
    assert d == {"a": {"b": 8, "c": True, "d": 1e-3}, "e": "s3://bucket/x"}


def test_split_cli():
    over, rest = split_cli(["--config", "x.yaml", "train.lr=1", "--nodes", "4"])
    assert over == ["train.lr=1"] and rest == ["--config", "x.yaml", "--nodes", "4"]


def test_round_trip_and_masking(tmp_path):
    cfg = load_config(overrides=["shards.root=s3://AKIA:SECRET@bucket/p", "train.output=" + str(tmp_path)])
    from depthg.config import save_config

    save_config(cfg, str(tmp_path / "config.yaml"))
    text = (tmp_path / "config.yaml").read_text()
    assert "SECRET" not in text and "AKIA" not in text
    again = load_config(str(tmp_path / "config.yaml"), ["shards.root=x"])
    assert to_dict(again)["train"] == to_dict(cfg)["train"]
    assert mask_secrets({"aws_secret_access_key": "abc", "x": 1}) == {"aws_secret_access_key": "***", "x": 1}


def test_missing_yaml_file_named():
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config("nope.yaml")


def test_all_configs_in_repo_load():
    import glob
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = sorted(glob.glob(os.path.join(root, "configs", "*.yaml")))
    for path in files:
        load_config(path)
