"""Training configs: `configs/train/<name>.yaml` -> a typed, validated `TrainConfig`.

A training config names the architecture config it trains (`model:`, a name
in `configs/` or a path; `model_overrides:` is deep-merged into it, which is
how the tiny test configs shrink the widths) and holds the schedule of the
papers in sections that mirror the original YAML files:

    name: fomm-awp
    variant: fomm-awp            # the engine variant the weights are for
    model: fomm-awp              # configs/fomm-awp.yaml
    stage: reconstruction        # reconstruction | avd (MRAA's second stage)
    dataset: {root_dir, num_repeats, landmarks, augmentation: {...}}
    train: {num_epochs, epoch_milestones, batch_size, lr_*, betas, scales, transform_params, loss_weights}
    avd: {...}                   # MRAA only: train_avd_params of the original
    runtime: {seed, precision, num_workers, log_every, visualize_every, checkpoint_every, eval_pairs}

Unknown keys are errors naming the section, so a typo never silently falls
back to a default. `--set section.key=value` on the command line edits a
loaded config the same way (`apply_overrides`).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import yaml

from mefacial.config import CONFIG_DIR, ModelConfig, load_config
from mefacial.errors import ConfigError

TRAIN_CONFIG_DIR = CONFIG_DIR / "train"
STAGES = ("reconstruction", "avd")
PRECISIONS = ("fp32", "bf16", "fp16")
LANDMARK_BACKENDS = ("auto", "fan", "dlib")

# Loss weights each backbone understands (the originals' names), with their defaults.
FOMM_LOSS_WEIGHTS: dict[str, Any] = {
    "perceptual": [10, 10, 10, 10, 10],  # per VGG19 slice, summed over the pyramid scales
    "reconstruction": 0,  # pixel L1 over the pyramid; not in the papers (tiny configs use it instead of VGG)
    "generator_gan": 1,
    "discriminator_gan": 1,
    "feature_matching": [10, 10, 10, 10],  # per discriminator block
    "equivariance_value": 10,
    "equivariance_jacobian": 10,
}
MRAA_LOSS_WEIGHTS: dict[str, Any] = {
    "perceptual": [10, 10, 10, 10, 10],
    "reconstruction": 0,
    "equivariance_shift": 10,
    "equivariance_affine": 10,
}


@dataclasses.dataclass
class AugmentationConfig:
    """The originals' `augmentation_params`: random flips and a colour jitter shared by both frames of a pair."""

    horizontal_flip: bool = True
    time_flip: bool = True
    jitter: dict[str, float] = dataclasses.field(default_factory=lambda: {"hue": 0.1})

    def __post_init__(self) -> None:
        unknown = sorted(set(self.jitter) - {"brightness", "contrast", "saturation", "hue"})
        if unknown:
            raise ConfigError(f"dataset.augmentation.jitter: unknown key(s) {unknown}; "
                              "known: brightness, contrast, saturation, hue")
        if not 0 <= float(self.jitter.get("hue", 0)) <= 0.5:
            raise ConfigError("dataset.augmentation.jitter.hue must be in [0, 0.5]")


@dataclasses.dataclass
class DatasetConfig:
    """Where the clips are and how pairs are drawn from them."""

    root_dir: str = "data/microexpressions"
    num_repeats: int = 50  # passes over the videos per epoch (the originals' DatasetRepeater)
    landmarks: str = "auto"  # backend of mefacial.landmarks for the prior variants
    landmark_cache: str | None = None  # default: <root_dir>/.landmarks next to the data
    augmentation: AugmentationConfig = dataclasses.field(default_factory=AugmentationConfig)
    video_cache: int = 8  # decoded video files kept per worker (frame folders need none)

    def __post_init__(self) -> None:
        if isinstance(self.augmentation, dict):
            self.augmentation = _from_dict(AugmentationConfig, self.augmentation, "dataset.augmentation")
        if self.landmarks not in LANDMARK_BACKENDS:
            raise ConfigError(f"dataset.landmarks must be one of {LANDMARK_BACKENDS}, got {self.landmarks!r}")
        if int(self.num_repeats) < 1:
            raise ConfigError("dataset.num_repeats must be >= 1")


@dataclasses.dataclass
class OptimConfig:
    """The reconstruction stage (`train_params` of the originals)."""

    num_epochs: int = 100
    epoch_milestones: list[int] = dataclasses.field(default_factory=lambda: [60, 90])
    gamma: float = 0.1  # MultiStepLR factor at each milestone
    batch_size: int = 9  # global: split across DDP ranks
    lr_generator: float = 2.0e-4
    lr_kp_detector: float = 2.0e-4  # FOMM
    lr_discriminator: float = 2.0e-4  # FOMM
    lr: float = 2.0e-4  # MRAA: one optimiser over region predictor, background predictor and generator
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.5, 0.999])
    scales: list[float] = dataclasses.field(default_factory=lambda: [1, 0.5, 0.25, 0.125])
    transform_params: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"sigma_affine": 0.05, "sigma_tps": 0.005, "points_tps": 5})
    loss_weights: dict[str, Any] = dataclasses.field(default_factory=dict)
    grad_clip: float | None = None  # max global grad norm; None as in the originals
    vgg19_weights: str | None = None  # a local VGG19 weight file (torchvision names); default: torchvision's ImageNet

    def __post_init__(self) -> None:
        if int(self.batch_size) < 1 or int(self.num_epochs) < 1:
            raise ConfigError("train.batch_size and train.num_epochs must be >= 1")
        unknown = sorted(set(self.transform_params) - {"sigma_affine", "sigma_tps", "points_tps"})
        if unknown:
            raise ConfigError(f"train.transform_params: unknown key(s) {unknown}")


@dataclasses.dataclass
class AVDConfig:
    """MRAA's animation-via-disentanglement stage (`train_avd_params` of the original)."""

    num_epochs: int = 100
    num_repeats: int = 150
    batch_size: int = 256
    epoch_milestones: list[int] = dataclasses.field(default_factory=lambda: [20, 25])
    gamma: float = 0.1
    lr: float = 1.0e-3
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.5, 0.999])
    random_scale: float = 0.25
    lambda_shift: float = 1.0
    lambda_affine: float = 1.0


@dataclasses.dataclass
class RuntimeConfig:
    """Seeds, precision and how often to log, draw and save."""

    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 with a gradient scaler; GPU only)
    device: str = "auto"  # auto | cpu | cuda
    num_workers: int = 4  # DataLoader workers per rank
    log_every: int = 10  # steps between TensorBoard scalars (the JSONL file gets every step)
    visualize_every: int = 500  # steps between visualisation PNGs (and one at the end)
    checkpoint_every: int = 1000  # steps between `last` checkpoints (also at each epoch end and at the end)
    eval_pairs: int = 16  # pairs of the test split scored for `best` (0: use the training loss)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"runtime.precision must be one of {PRECISIONS}, got {self.precision!r}")


@dataclasses.dataclass
class TrainConfig:
    """A whole training run: what to train, on what, and how."""

    name: str
    model: ModelConfig
    variant: str = ""
    stage: str = "reconstruction"
    description: str = ""
    dataset: DatasetConfig = dataclasses.field(default_factory=DatasetConfig)
    train: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    avd: AVDConfig = dataclasses.field(default_factory=AVDConfig)
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)
    source: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)  # the YAML as loaded

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ConfigError(f"config {self.name!r}: stage must be one of {STAGES}, got {self.stage!r}")
        if self.model.backbone not in ("fomm", "mraa"):
            raise ConfigError(f"config {self.name!r}: the {self.model.backbone!r} backbone has nothing to train")
        if self.stage == "avd" and self.model.backbone != "mraa":
            raise ConfigError(f"config {self.name!r}: the AVD stage exists for MRAA only")
        defaults = FOMM_LOSS_WEIGHTS if self.model.backbone == "fomm" else MRAA_LOSS_WEIGHTS
        unknown = sorted(set(self.train.loss_weights) - set(defaults))
        if unknown:
            raise ConfigError(f"config {self.name!r}: train.loss_weights has unknown key(s) {unknown} for "
                              f"{self.model.backbone}; known: {sorted(defaults)}")
        self.train.loss_weights = {**copy.deepcopy(defaults), **self.train.loss_weights}
        for key in ("perceptual", "feature_matching", "reconstruction"):
            value = self.train.loss_weights.get(key)
            if isinstance(value, (int, float)) and key != "reconstruction":
                self.train.loss_weights[key] = [value] * len(defaults[key])
        if self.stage == "reconstruction" and self.perceptual_weight == 0 and not self.train.loss_weights.get(
                "reconstruction"):  # (the published configs' reconstruction is the perceptual loss alone)
            raise ConfigError(f"config {self.name!r}: no reconstruction loss is left (train.loss_weights.perceptual is 0 "
                              "and train.loss_weights.reconstruction, the pixel L1, is 0): the generator would learn "
                              "from the GAN and equivariance terms alone. Without the VGG-19 weights, set the L1 "
                              "instead: --set train.loss_weights.perceptual=0 --set train.loss_weights.reconstruction=10")
        if self.variant:  # the engine variant the weights are for: one it knows, of this backbone
            from mefacial.variants import get_variant

            if get_variant(self.variant).backbone != self.model.backbone:
                raise ConfigError(f"config {self.name!r}: variant {self.variant!r} is not a {self.model.backbone} "
                                  "variant; name the one these weights are for")
        self.variant = self.variant or self.name

    @property
    def needs_landmarks(self) -> bool:
        """Prior variants consume AU points, hence landmarks of every frame."""
        return self.model.prior != "none"

    @property
    def perceptual_weight(self) -> float:
        return float(sum(self.train.loss_weights.get("perceptual", [0])))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON / YAML / weights_only-safe), the resolved architecture included."""
        data = dataclasses.asdict(self)
        data.pop("source")
        data["model"] = self.model.to_dict()
        return data


def _from_dict(cls: type, data: Any, section: str) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{section}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{section}: unknown key(s) {unknown}; known: {sorted(known)}")
    try:
        return cls(**data)
    except (TypeError, ValueError) as exc:  # a value of the wrong kind (--set train.batch_size=abc)
        raise ConfigError(f"{section}: {exc} (check the config's {section} section and any --set)") from None


def deep_merge(base: dict, update: dict) -> dict:
    """`base` with `update` merged in recursively (mappings merge, anything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _model_config(spec: Any, overrides: dict | None, name: str) -> ModelConfig:
    """The architecture: a config name / path (`configs/<name>.yaml`) or an inline mapping, plus overrides."""
    if isinstance(spec, ModelConfig):
        base = spec.to_dict()
    elif isinstance(spec, str):
        base = load_config(spec).to_dict()
    elif isinstance(spec, dict):
        base = dict(spec)
    else:
        raise ConfigError(f"config {name!r}: 'model' must name an architecture config in configs/ (e.g. fomm-awp)")
    merged = deep_merge(base, overrides or {})
    return ModelConfig.from_dict(merged, name=merged.get("name"))


def config_from_dict(data: dict[str, Any], name: str | None = None) -> TrainConfig:
    """Build and validate a `TrainConfig` from the YAML mapping."""
    if not isinstance(data, dict):
        raise ConfigError(f"training config {name!r}: expected a mapping at the top level")
    known = {"name", "variant", "stage", "description", "model", "model_overrides", "dataset", "train", "avd", "runtime"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"training config {name!r}: unknown key(s) {unknown}; known: {sorted(known)}")
    name = str(data.get("name") or name or "unnamed")
    if "model" not in data:
        raise ConfigError(f"training config {name!r}: missing 'model' (an architecture config in configs/, e.g. fomm-awp)")
    return TrainConfig(
        name=name,
        model=_model_config(data["model"], data.get("model_overrides"), name),
        variant=str(data.get("variant") or ""),
        stage=str(data.get("stage") or "reconstruction"),
        description=str(data.get("description") or ""),
        dataset=_from_dict(DatasetConfig, data.get("dataset"), "dataset"),
        train=_from_dict(OptimConfig, data.get("train"), "train"),
        avd=_from_dict(AVDConfig, data.get("avd"), "avd"),
        runtime=_from_dict(RuntimeConfig, data.get("runtime"), "runtime"),
        source=copy.deepcopy(data),
    )


def parse_override(item: str) -> tuple[list[str], Any]:
    """"train.batch_size=4" -> (["train", "batch_size"], 4) (the value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.batch_size=4")
    key, value = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `--set a.b=c` edits to a config mapping (before validation)."""
    data = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
        node[path[-1]] = value
    return data


def read_yaml(path_or_name: str | Path) -> tuple[dict[str, Any], str]:
    """The YAML mapping of a training config given by path or by name in configs/train/."""
    path = Path(path_or_name)
    if not path.suffix and not path.exists():
        path = TRAIN_CONFIG_DIR / f"{path_or_name}.yaml"
    elif not path.exists() and path.parent.as_posix().endswith("configs/train"):
        path = TRAIN_CONFIG_DIR / path.name  # configs/train/X.yaml: the package's copy (mefacial/configs/train/)
    if not path.is_file():
        available = sorted(p.stem for p in TRAIN_CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"training config {path} does not exist; available in {TRAIN_CONFIG_DIR}: {available}")
    with open(path, encoding="utf-8") as f:
        try:
            return yaml.safe_load(f) or {}, path.stem
        except yaml.YAMLError as exc:  # where the file stops being YAML (line and column), on one line
            raise ConfigError(f"training config {path} is not valid YAML: {' '.join(str(exc).split())}") from None


def load_train_config(path_or_name: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Load `configs/train/<name>.yaml` (or a path), apply `--set` overrides, validate."""
    data, stem = read_yaml(path_or_name)
    return config_from_dict(apply_overrides(data, overrides or []), name=stem)


# The original YAML's train_params / train_avd_params keys this trainer has no use for (DataParallel /
# sync-BN / DataLoader settings and the original's checkpoint period in epochs).
_ORIGINAL_IGNORED = {"use_sync_bn", "dataloader_workers", "checkpoint_freq", "num_repeats"}


def config_from_original(block: dict[str, Any], model: ModelConfig, name: str = "original",
                         **sections: dict[str, Any]) -> TrainConfig:
    """A `TrainConfig` from an original implementation's YAML (`train_params`, `train_avd_params`).

    `model` is the architecture (e.g. `mefacial.config.config_from_reference` of the same YAML);
    `sections` add or override sections of this project's format (e.g. `train={"vgg19_weights": path}`).
    Keys of the original this trainer does not know are errors; DataLoader / sync-BN settings are ignored.
    """
    params = dict(block.get("train_params") or {})
    train = {k: v for k, v in params.items() if k not in _ORIGINAL_IGNORED}
    data: dict[str, Any] = {"name": name, "model": model, "train": train,
                            "dataset": {"num_repeats": params.get("num_repeats", DatasetConfig.num_repeats)}}
    if block.get("train_avd_params"):
        avd_params = dict(block["train_avd_params"])
        data["avd"] = {k: v for k, v in avd_params.items() if k not in _ORIGINAL_IGNORED - {"num_repeats"}}
    for section, values in sections.items():
        data[section] = deep_merge(data.get(section) or {}, values) if isinstance(values, dict) else values
    return TrainConfig(
        name=name, model=model, variant=str(data.get("variant") or ""), stage=str(data.get("stage") or "reconstruction"),
        dataset=_from_dict(DatasetConfig, data.get("dataset"), "dataset"),
        train=_from_dict(OptimConfig, data["train"], "train_params"),
        avd=_from_dict(AVDConfig, data.get("avd"), "train_avd_params"),
        runtime=_from_dict(RuntimeConfig, data.get("runtime"), "runtime"), source=copy.deepcopy(block))
