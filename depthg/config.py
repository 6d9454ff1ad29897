"""Configuration: one dataclass per section, defaults in code, YAML as sparse diffs.

Precedence is CLI dotted overrides > YAML file > defaults. Unknown keys and values of
the wrong type are rejected with a message naming the key and listing the valid ones.
Every job saves the resolved config beside its outputs (``save_config``).
A new key goes into its section's dataclass below (type, default, a comment); a key with a fixed set of values
gets a ``Literal`` alias in "allowed values"; a check across keys goes into ``validate``. Parsing the command
line's ``key=value`` overrides lives in ``depthg.overrides`` (re-exported here).

    cfg = load_config("configs/demo.yaml", ["train.micro_batch_per_gpu=8", "loss.depth.mode=distance"])
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping, get_args, get_origin

import yaml

from depthg import io
from depthg.errors import ConfigError
from depthg.overrides import merge, parse_overrides, split_cli  # noqa: F401 - part of this module's interface


# ----------------------------------------------------------------------------- allowed values
# The one list of allowed values per key: fields are typed with these, ``from_dict`` checks them, and the
# library modules that take the same values (losses, sampling, backbones) derive their tuples from them.
Dataset = Literal["synthetic", "folder", "camvid", "cocostuff27", "cityscapes", "potsdam"]
DepthCast = Literal["none", "uint8", "int"]
DepthSource = Literal["dataset", "transformers", "none"]
DeviceChoice = Literal["auto", "cpu", "cuda"]
BackboneName = Literal["dino_vits8", "dino_vits8_800ep", "dino_vitb8", "dinov2_vits14", "effnet_lite0", "tiny_vit"]
PosEmbed = Literal["timm", "dino"]  # how a ViT's position table is resampled to another grid (models/backbones.py)
DropoutMasks = Literal["shared", "independent"]
DepthMode = Literal["none", "paper", "distance", "reference"]
LHPMode = Literal["improved", "reference"]
SamplingMode = Literal["fps", "fps_reference", "random"]
SamplingStart = Literal["first", "random"]
Precision = Literal["auto", "fp32", "bf16"]
DepthPrecision = Literal["auto", "fp32", "bf16", "fp16"]
Selection = Literal["none", "label_free", "val_miou"]
ShiftMode = Literal["fixed", "quantile"]
Finish = Literal["none", "fit"]
ZeroStage = Literal[0, 1]
RgbCodec = Literal["png", "jpeg", "webp"]  # stage-2 encodings (depthg.codecs)
DepthCodec = Literal["png16", "raw16", "raw16z", "png8"]


def choices(alias) -> tuple[str, ...]:
    """The allowed values of a ``Literal`` alias above, e.g. ``choices(DepthMode)``."""
    return tuple(get_args(alias))


# ----------------------------------------------------------------------------- sections
@dataclass
class DataConfig:
    dataset: Dataset = "synthetic"
    root: str = ""  # dataset folder (unused for synthetic)
    num_train: int = 240  # synthetic scenes in the train split
    num_val: int = 60  # synthetic scenes in the val split
    height: int = 240  # synthetic render size
    width: int = 320
    five_crop: bool = True  # five-crop the train split at crop_ratio (val is never cropped)
    crop_ratio: float = 0.5
    resolution: int = 224  # training resolution (shorter side resize + centre crop)
    limit: int = 0  # use at most this many source images per split (0 = all)
    seed: int = 0  # synthetic scene seed
    # How the step reads depth (docs/METHOD.md s7): none = float in [0, 1]; uint8 = the reference's 8-bit PNG as
    # integers 0..255 (COCO, Cityscapes); int = its Potsdam loader, [0, 1] cast to integers (1 only at 255/255).
    depth_cast: DepthCast = "none"


@dataclass
class ShardConfig:
    root: str = "shards/synthetic"  # local folder or s3://bucket/prefix
    samples_per_shard: int = 64
    overwrite: bool = False  # redo shards that are already complete
    strict: bool = False  # an unreadable source image is an error instead of being skipped


@dataclass
class DepthGenConfig:
    source: DepthSource = "dataset"  # dataset (depth shipped with the data) | transformers | none (no depth)
    model: str = "Intel/zoedepth-nyu"  # transformers model id or local folder
    batch_size: int = 8
    flip_average: bool = True
    num_actors: int = 0  # 0 = one per GPU, or 2 on a CPU-only cluster
    device: DeviceChoice = "auto"  # auto (GPU when the cluster has or may add GPUs) | cpu | cuda
    precision: DepthPrecision = "auto"  # auto (fp16 autocast on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    cpus_per_actor: int = 0  # torch + PNG-encoding threads per actor; 0 = the GPU node's CPUs per GPU


@dataclass
class MiningConfig:
    k: int = 30  # cosine top-k searched per crop (global features); the row files keep ranks 1..num_positives
    num_positives: int = 7  # positives per training sample (neighbour ranks 1..K, with their byte ranges in the rows)
    # how stage 2 stores each sample at data.resolution (depthg.codecs; bench/datapath.json measures them)
    rgb_codec: RgbCodec = "jpeg"
    rgb_quality: int = 95  # JPEG / WebP quality
    depth_codec: DepthCodec = "raw16z"  # raw16z / raw16 / png16: exact 16-bit levels; png8: 8-bit
    batch_size: int = 16
    num_actors: int = 0  # 0 = one per GPU, or 2 on a CPU-only cluster
    device: DeviceChoice = "auto"  # as depthgen.device
    cache_dir: str = ""  # per-node depth-shard cache; "" = $DEPTHG_CACHE_DIR, else the system temp dir


@dataclass
class ModelConfig:
    # Defaults: the offline CPU demo, EfficientNet-Lite0 ImageNet weights standing in for DINO. configs/ select
    # dino_vits8 (DINO's 300-epoch ViT-S/8, as STEGO and DepthG) or dino_vitb8; dino_vits8_800ep is timm's.
    backbone: BackboneName = "effnet_lite0"
    weights: str = ""  # local weights file/folder or https URL; empty = the backbone's default source
    pos_embed: PosEmbed = "timm"  # dino: DINO's own position-table interpolation (imported reference models)
    code_dim: int = 70
    n_classes: int = 0  # 0 = taken from the dataset (shard manifest / source)
    extra_clusters: int = 0  # over-clustering: cluster probe gets n_classes + extra_clusters
    dropout: float = 0.1  # Dropout2d on the frozen features in training
    # shared: one mask per image (head input = correlation target); independent: the reference's three masks
    dropout_masks: DropoutMasks = "shared"


@dataclass
class DepthLossConfig:
    mode: DepthMode = "paper"
    weight: float = 0.19  # lambda_depth at batch 0
    shift: float = 0.03  # b_depth at batch 0
    decay_every: int = 250  # batches between decays (0 = constant)
    first_decay: int = 0  # first batch that uses a decayed value (0 = decay_every); see depthg/schedules.py
    gamma: float = 0.6


@dataclass
class LHPConfig:
    enabled: bool = False
    # improved: weighted average of anchor and positive, projection trained; reference: docs/METHOD.md s6
    mode: LHPMode = "improved"
    weight: float = 0.2
    quantile: float = 0.01


@dataclass
class LossConfig:
    pointwise: bool = True
    zero_clamp: bool = True
    neg_rounds: int = 5
    self_weight: float = 0.58
    self_shift: float = 0.07
    knn_weight: float = 0.36
    knn_shift: float = 0.025
    neg_weight: float = 0.70
    neg_shift: float = 0.761
    # fixed: *_shift are the shifts b; quantile: b = the *_shift quantile of the batch's correlations (no labels)
    shift_mode: ShiftMode = "fixed"
    depth: DepthLossConfig = field(default_factory=DepthLossConfig)
    lhp: LHPConfig = field(default_factory=LHPConfig)


@dataclass
class SamplingConfig:
    mode: SamplingMode = "fps"
    samples: int = 11  # S: S*S locations per image
    min_samples: int = 1  # floor of the decay (the reference has none)
    decay_every: int = 0  # batches between S <- max(int(decay * S), min_samples) (0 = off)
    first_decay: int = 0  # first batch that uses a decayed value (0 = decay_every); see depthg/schedules.py
    decay: float = 0.9
    fov_deg: float = 90.0
    start: SamplingStart = "first"


@dataclass
class TrainConfig:
    micro_batch_per_gpu: int = 32
    grad_accum: int = 1
    num_batches: int = 2334  # optimizer steps
    lr: float = 5e-4
    probe_lr: float = 5e-3
    zero_stage: ZeroStage = 0  # DeepSpeed ZeRO: 0 (plain data parallel) or 1 (optimizer state sharded)
    precision: Precision = "fp32"  # fp32 everywhere (the reference) | bf16 (speed, backbone too) | auto (bf16 on GPU)
    loader_workers: int = -1  # per rank; -1 = auto: the node's CPUs per rank (per GPU) minus one
    shuffle_buffer: int = 256
    seed: int = 0
    log_every: int = 10
    val_every: int = 0  # quick validation every N batches (0 = off)
    ckpt_every: int = 200
    output: str = "runs/default"  # local folder or s3:// URL
    resume: str = ""  # "" (a new run: train.output must be empty) | auto (continue the newest checkpoint) | URL
    max_failures: int = 2  # Ray Train: worker-group restarts (from the newest checkpoint of the launch) before giving up
    select: Selection = "none"  # none | label_free | val_miou (uses the val labels, as the reference)
    # fit: segmenter.pt's probes refitted on finish_samples train crops' codes (k-means, L-BFGS; cluster/finish.py)
    finish: Finish = "fit"
    finish_samples: int = 512

    def global_batch(self, world_size: int) -> int:
        """Images per optimizer step over all ranks: micro_batch_per_gpu x grad_accum x world_size."""
        return self.micro_batch_per_gpu * self.grad_accum * int(world_size)


@dataclass
class EvalConfig:
    resolution: int = 320
    flip: bool = True
    crf: bool = True
    kmeans: bool = False
    batch_size: int = 8
    num_workers: int = 0  # Ray evaluation actors; 0 = one per GPU (2 on a CPU-only cluster)
    device: DeviceChoice = "auto"  # as depthgen.device
    report_images: int = 8


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    depthgen: DepthGenConfig = field(default_factory=DepthGenConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------- building
def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check (and where lossless, convert) one leaf value against its declared type."""
    if get_origin(typ) is Literal:
        allowed = get_args(typ)
        if value not in allowed:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, str) or value is None:
            return value or ""
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported type {typ}")


def from_dict(cls, data: Mapping[str, Any] | None, prefix: str = ""):
    """Build dataclass ``cls`` from a (sparse) mapping, rejecting unknown keys."""
    data = dict(data or {})
    types = _field_types(cls)
    unknown = sorted(set(data) - set(types))
    if unknown:
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' in {where}; valid keys: {', '.join(types)}")
    kwargs = {}
    for name, typ in types.items():
        if name not in data:
            continue
        key = prefix + name
        if dataclasses.is_dataclass(typ):
            if not isinstance(data[name], Mapping):
                raise ConfigError(f"config key '{key}': expected a mapping of {typ.__name__} keys")
            kwargs[name] = from_dict(typ, data[name], key + ".")
        else:
            kwargs[name] = _coerce(data[name], typ, key)
    return cls(**kwargs)


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def read_yaml(path: str) -> dict[str, Any]:
    try:
        with io.open_url(path, "r") as fh:
            data = yaml.safe_load(fh) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return data


def load_config(path: str | None = None, overrides: Iterable[str] = (), base: Mapping | None = None) -> Config:
    """Defaults < ``base`` (e.g. a checkpoint's config) < YAML ``path`` < ``overrides``."""
    data: dict[str, Any] = dict(base or {})
    if path:
        data = merge(data, read_yaml(path))
    data = merge(data, parse_overrides(overrides))
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def depth_readers(cfg: Config) -> list[str]:
    """The settings that read depth maps, as ``key=value`` (empty: the STEGO baseline, no depth needed)."""
    out = [f"loss.depth.mode={cfg.loss.depth.mode}"] if cfg.loss.depth.mode != "none" else []
    out += [f"sampling.mode={cfg.sampling.mode}"] if cfg.sampling.mode != "random" else []
    return out + (["loss.lhp.enabled=true"] if cfg.loss.lhp.enabled else [])


def check_depth_free(cfg: Config, what: str) -> None:
    """Raise naming the settings when data without depth maps (``what``) meets settings that read depth."""
    readers = depth_readers(cfg)
    if readers:
        raise ConfigError(f"{what} has no depth maps, but {', '.join(readers)} reads depth: train without depth "
                          "with loss.depth.mode=none sampling.mode=random loss.lhp.enabled=false (STEGO)")


def validate(cfg: Config) -> None:
    if cfg.depthgen.source == "none":
        check_depth_free(cfg, "depthgen.source=none")
    for key in ("train.micro_batch_per_gpu", "train.grad_accum", "sampling.samples", "sampling.min_samples",
                "shards.samples_per_shard", "train.finish_samples"):
        if _get(cfg, key) < 1:
            raise ConfigError(f"config key '{key}': expected a positive integer")
    if cfg.train.max_failures < -1:
        raise ConfigError(f"config key 'train.max_failures': {cfg.train.max_failures}; expected restarts >= 0 "
                          "(-1 = unlimited)")
    for section in ("loss.depth", "sampling"):
        every, first = _get(cfg, section + ".decay_every"), _get(cfg, section + ".first_decay")
        if every < 0 or first < 0:
            raise ConfigError(f"config keys '{section}.decay_every' / '{section}.first_decay': expected >= 0 batches")
        if every == 0 and first > 0:
            raise ConfigError(f"config key '{section}.first_decay': {first} but '{section}.decay_every' is 0 "
                              "(no decay); set decay_every or drop first_decay")
    for key in ("self_shift", "knn_shift", "neg_shift") if cfg.loss.shift_mode == "quantile" else ():
        if not 0.0 <= getattr(cfg.loss, key) <= 1.0:
            raise ConfigError(f"config key 'loss.{key}': {getattr(cfg.loss, key)} is not a quantile in [0, 1] "
                              "(loss.shift_mode=quantile reads the shifts as quantiles)")
    if not 1 <= cfg.mining.rgb_quality <= 100:
        raise ConfigError(f"config key 'mining.rgb_quality': {cfg.mining.rgb_quality}, expected 1..100")
    if cfg.data.depth_cast != "none" and cfg.loss.depth.mode == "paper":
        raise ConfigError(f"config key 'data.depth_cast': {cfg.data.depth_cast!r} reads depth as the reference's "
                          "integers, but loss.depth.mode=paper needs depth in [0, 1]; use depth_cast=none")


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(io.mask_secrets(to_dict(cfg)), sort_keys=False)


def save_config(cfg, url: str) -> None:
    """Write the resolved config (secrets masked) to ``url`` (a file path or s3:// URL)."""
    io.write_bytes(url, dump_yaml(cfg).encode())
