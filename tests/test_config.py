"""Config: defaults, YAML diffs, dotted overrides, validation errors that name the key."""
import pytest

from depthg.config import Config, ConfigError, load_config, parse_overrides, split_cli, to_dict
from depthg.io import mask_secrets


def test_defaults_build():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.loss.depth.mode == "paper" and cfg.model.dropout_masks == "shared"


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
    # a sweep's row override (NAME:key=value) and a flag's ROW=URL value are not overrides
    argv = ["demo:train.lr=2", "--checkpoint", "smoke=s3://b/x.pt", "train.lr=1", "--seeds", "2"]
    assert split_cli(argv, value_flags=("--checkpoint",)) == (
        ["train.lr=1"], ["demo:train.lr=2", "--checkpoint", "smoke=s3://b/x.pt", "--seeds", "2"])


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


def test_allowed_values_come_from_the_field_types():
    import typing

    from depthg import losses, sampling
    from depthg.config import BackboneName, DepthMode, SamplingMode, choices
    from depthg.models.backbones import BACKBONES

    with pytest.raises(ConfigError, match=r"'loss\.lhp\.mode': 'best' is not one of improved, reference"):
        load_config(overrides=["loss.lhp.mode=best"])
    with pytest.raises(ConfigError, match=r"'data\.depth_cast'"):
        load_config(overrides=["data.depth_cast=float"])
    assert tuple(BACKBONES) == choices(BackboneName)  # one list: the registry and the config agree
    assert losses.DEPTH_MODES == tuple(m for m in choices(DepthMode) if m != "none")
    assert sampling.MODES == choices(SamplingMode) == typing.get_args(SamplingMode)


def test_global_batch_is_derived_in_one_place():
    cfg = load_config(overrides=["train.micro_batch_per_gpu=4", "train.grad_accum=2"])
    assert cfg.train.global_batch(8) == 64 and cfg.train.global_batch(1) == 8


@pytest.mark.parametrize("overrides,match", [
    (["sampling.decay_every=0", "sampling.first_decay=3"], r"sampling\.first_decay"),
    (["loss.depth.first_decay=-1"], r"loss\.depth\.first_decay"),
    (["sampling.min_samples=0"], r"sampling\.min_samples"),
    (["data.depth_cast=uint8", "loss.depth.mode=paper"], r"data\.depth_cast"),
])
def test_cross_key_checks_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=overrides)


# ----------------------------------------------------------------------------- the configs in configs/
def _repo_configs():
    import glob
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {os.path.basename(p)[:-5]: p for p in sorted(glob.glob(os.path.join(root, "configs", "*.yaml")))}


def _leaves(data, prefix=""):
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


@pytest.mark.parametrize("name", sorted(_repo_configs()))
def test_configs_are_sparse(name):
    """Every key a YAML file sets differs from the code default (configs are diffs, docs/DESIGN.md)."""
    from depthg.config import _get, read_yaml

    defaults = Config()
    same = [k for k, v in _leaves(read_yaml(_repo_configs()[name])) if _get(defaults, k) == v]
    assert not same, f"configs/{name}.yaml repeats defaults: {same}"


PAPER = {  # config -> (backbone, code_dim, dataset, published number quoted, reproduces the reference recipe)
    "coco_vits8": ("dino_vits8", 70, "cocostuff27", "56.3 acc / 25.6 mIoU", True),
    "coco_vits8_lhp": ("dino_vits8", 70, "cocostuff27", "55.1 acc / 26.7 mIoU", True),
    "coco_vitb8": ("dino_vitb8", 90, "cocostuff27", "58.6 acc / 29.0 mIoU", True),
    "cityscapes_vitb8": ("dino_vitb8", 100, "cityscapes", "81.6 acc / 23.1 mIoU", True),
    "potsdam_vits8": ("dino_vits8", 90, "potsdam", "80.4 acc", True),
    "coco_vits8_paper": ("dino_vits8", 70, "cocostuff27", None, False),
    "coco_vits8_lhp_paper": ("dino_vits8", 70, "cocostuff27", None, False),
    "coco_vitb8_paper": ("dino_vitb8", 90, "cocostuff27", None, False),
    "cityscapes_vitb8_paper": ("dino_vitb8", 100, "cityscapes", None, False),
    "potsdam_vits8_paper": ("dino_vits8", 90, "potsdam", None, False),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_say_what_they_reproduce(name):
    from depthg.models.backbones import DINO_VITS8_300EP_URL

    backbone, code_dim, dataset, number, reference = PAPER[name]
    path = _repo_configs()[name]
    text = open(path).read()
    cfg = load_config(path)
    assert (cfg.model.backbone, cfg.model.code_dim, cfg.data.dataset) == (backbone, code_dim, dataset)
    assert cfg.train.num_batches == 2334 and cfg.train.global_batch(1) == (16 if dataset == "potsdam" else 32)
    assert "--print-schedule" in text or "schedules as in" in text
    assert cfg.train.finish == "none"  # both report the probes trained in the loop, as the reference did (no refit)
    if backbone == "dino_vits8":
        assert cfg.model.weights == DINO_VITS8_300EP_URL  # the 300-epoch checkpoint STEGO and DepthG load
    if reference:
        assert number in text and "REFERENCE RECIPE" in text
        assert cfg.loss.depth.mode == "reference" and cfg.model.dropout_masks == "independent"
        assert cfg.sampling.mode == ("random" if dataset == "cityscapes" else "fps_reference")
        assert cfg.data.depth_cast == ("int" if dataset == "potsdam" else "uint8")
        assert cfg.loss.lhp.mode == ("reference" if cfg.loss.lhp.enabled else "improved")
        assert "instead of 31" in text or "see configs/coco_vits8.yaml" in text
    else:
        assert "NO PUBLISHED NUMBER" in text
        assert (cfg.loss.depth.mode, cfg.sampling.mode, cfg.data.depth_cast) == ("paper", "fps", "none")
        assert cfg.loss.lhp.mode == "improved"
    assert cfg.loss.lhp.enabled == ("lhp" in name)
