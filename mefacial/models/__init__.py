"""Motion backbones and their registry (in the spirit of timm's `register_model` / `create_model`).

Each backbone module (`fomm.py`, `mraa.py`, `warp.py`) declares ONE `BackboneSpec` with
`register_backbone(...)`: its label, motion modes and default movement-scale adaptation, the points it
consumes, its checkpoint parts, whether it needs weights, its builder, the class that animates one clip,
and its variants (backbone x prior, each with one label). Everything else (engine, app, CLI, bench,
generate, evaluate, train) asks the registry (`get_backbone(name)`, `build_model(config)`,
`mefacial.variants.get_variant(id)`) and never compares backbone names.

Adding a backbone is one module plus one registration:

    # mefacial/models/mybackbone.py
    class MyClip(ClipRunner): ...                      # how a clip is animated (see ClipRunner)
    register_backbone(BackboneSpec(
        name="mine", label="My generator", builder=lambda config, for_training: MyModel(config),
        clip=MyClip, motion_modes={"relative": "relative"}, points="landmarks", needs_weights=False,
        variants=(VariantDecl("mine", config="mine", label="My generator"),)))

then add its module name to `BACKBONE_MODULES` below (the module's name is the backbone's name) and its architecture YAML to `mefacial/configs/`
(`backbone: mine`). A variant with weights also gets an entry in `mefacial/registry.yaml`.

The learned backbones (FOMM, MRAA) share one batched protocol, which `MotionTransferClip` drives (the
source is encoded once per clip, driving frames go in batches):

    src  = model.detect(source, au_points)            # motion params of frames (B x ...)
    init = model.detect(driving[:1], au_points[:1])   # of the clip's first frame
    cache = model.encode_source(source)               # generator encoder features, once per clip
    for batch in driving:
        drv = model.detect(batch, au_batch)
        new = model.transfer(src, drv, init, mode=..., adapt_scale=..., magnify=...)
        out = model.generate(source, cache, src, new)  # {"prediction": B x 3 x H x W, ...}

`au_points` are the 18 AU points in pixel units of the model input (B x 18 x 2, (x, y)); backbones without
a prior ignore them. Every backbone with a prior also has `model.prior_maps(au_points)`: the prior maps it
computes itself ({"prior": B x 1 x h x w, "per_au": B x 18 x h x w for AWP}), drawn by the app's Prior tab.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch

from .. import prior as prior_lib
from ..errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from ..config import ModelConfig

# Modules that register a backbone when imported (one line per backbone).
BACKBONE_MODULES = ("dense", "warp", "fomm", "mraa")  # also the order of menus and listings
POINT_KINDS = ("landmarks", "au_points", "mesh")


@dataclasses.dataclass(frozen=True)
class VariantDecl:
    """One variant of a backbone: id, architecture config (a name in mefacial/configs/) and its one label.

    `prior_option` is what the user picks as "facial prior" (default: the config's prior); two variants of
    one backbone may share a prior kind and differ in flavour (fomm-ewp and fomm-ewp-mm21)."""

    id: str
    config: str
    label: str
    prior_option: str | None = None
    prior_label: str | None = None


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """Everything the rest of the package knows about one backbone."""

    name: str  # the `backbone:` of its configs
    label: str  # short, for menus ("FOMM")
    title: str  # long, for model cards
    builder: Callable[["ModelConfig", bool], "nn.Module"]  # (config, for_training) -> model
    clip: type  # a ClipRunner subclass: animates one clip with a built model
    motion_modes: Mapping[str, str]  # mode -> label; the first one is the default
    points: str  # "landmarks": 68 landmarks always; "au_points": 18 AU points, only with a prior;
    # "mesh": the 478-point face mesh of mefacial.mesh, always
    variants: tuple[VariantDecl, ...]
    adapt_scale_default: bool = False  # what the original code does in relative mode
    adapt_scale: bool = True  # whether movement-scale adaptation means anything here
    confine: bool = False  # whether `confine` (fade motion out with the EWP map) applies
    priors: tuple[str, ...] = ("none", "ewp", "awp")
    needs_weights: bool = True
    checkpoint_parts: tuple[str, ...] = ()  # sub-modules an original (training) checkpoint holds
    inference_parts: tuple[str, ...] = ()  # the ones inference loads
    num_points: Callable[["ModelConfig"], int] = lambda config: 0  # keypoints / regions of a config
    points_name: str = "points"  # what num_points counts ("keypoints", "regions")
    tiny_params: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # model_params of a tiny network
    # frames per batch on the CPU where the engine's batch size is left to its default (None: the engine's, 4)
    cpu_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.points not in POINT_KINDS:
            raise ValueError(f"backbone {self.name!r}: points must be one of {POINT_KINDS}, got {self.points!r}")
        if not self.motion_modes:
            raise ValueError(f"backbone {self.name!r}: declare at least one motion mode")

    @property
    def default_motion(self) -> str:
        return next(iter(self.motion_modes))

    def needs_landmarks(self, prior: str) -> bool:
        """Whether a model of this backbone with `prior` consumes landmarks (68 points or 18 AU points)."""
        return self.points in ("landmarks", "mesh") or prior != "none"

    @property
    def points_per_face(self) -> tuple[int, ...]:
        """How many points per face may be given: 68 landmarks (or, for AU-point models, the 18 AU points)."""
        if self.points == "landmarks":
            return (prior_lib.NUM_LANDMARKS,)
        if self.points == "mesh":
            from ..mesh import NUM_VERTICES

            return (NUM_VERTICES,)
        return (prior_lib.NUM_LANDMARKS, prior_lib.NUM_AU_POINTS)


_BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone to the registry (once per name); returns the spec."""
    if spec.name in _BACKBONES and _BACKBONES[spec.name] is not spec:
        raise ValueError(f"backbone {spec.name!r} is registered twice")
    _BACKBONES[spec.name] = spec
    return spec


def _load_all() -> None:
    for module in BACKBONE_MODULES:
        importlib.import_module(f"{__name__}.{module}")


def backbones() -> dict[str, BackboneSpec]:
    """Every registered backbone, by name: those of BACKBONE_MODULES in its order, then any other."""
    _load_all()
    rank = {name: i for i, name in enumerate(BACKBONE_MODULES)}
    return dict(sorted(_BACKBONES.items(), key=lambda item: rank.get(item[0], len(rank))))


def get_backbone(name: str) -> BackboneSpec:
    """The spec of backbone `name`, or a ConfigError listing the known ones."""
    _load_all()
    try:
        return _BACKBONES[name]
    except KeyError:
        raise ConfigError(f"unknown backbone {name!r}; known: {', '.join(_BACKBONES)}") from None


def build_model(config: "ModelConfig", for_training: bool = False) -> "nn.Module":
    """Build the backbone of `config` (with its training-only parts, e.g. a discriminator, when `for_training`)."""
    return get_backbone(config.backbone).builder(config, for_training)


def tiny_config(config: "ModelConfig", image_size: int = 64) -> "ModelConfig":
    """A tiny version of an architecture (its backbone's `tiny_params` deep-merged into `model_params`, at
    `image_size` px): the same code paths with few channels, for fast tests and smoke runs."""
    def merge(base: Any, over: Any) -> Any:
        if isinstance(base, Mapping) and isinstance(over, Mapping):
            return {**base, **{k: merge(base.get(k), v) for k, v in over.items()}}
        return over

    spec = get_backbone(config.backbone)
    return dataclasses.replace(config, name=f"tiny-{config.name}", image_size=image_size,
                               model_params=merge(config.model_params, spec.tiny_params))


class _PartsView(Mapping):
    """backbone name -> checkpoint parts, read from the registry (so later registrations show up)."""

    def __init__(self, field: str):
        self.field = field

    def __getitem__(self, name: str) -> tuple[str, ...]:
        spec = backbones().get(name)
        if spec is None or not getattr(spec, self.field):
            raise KeyError(name)
        return getattr(spec, self.field)

    def __iter__(self) -> Iterator[str]:
        return iter([name for name, spec in backbones().items() if getattr(spec, self.field)])

    def __len__(self) -> int:
        return len(list(iter(self)))


# Which sub-modules an original checkpoint of each backbone holds, and which inference needs.
CHECKPOINT_PARTS: Mapping[str, tuple[str, ...]] = _PartsView("checkpoint_parts")
INFERENCE_PARTS: Mapping[str, tuple[str, ...]] = _PartsView("inference_parts")


# ---- animating one clip --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClipSettings:
    """What a clip runner needs of the animation options."""

    motion: str = "relative"
    adapt_scale: bool = False
    magnify: float = 1.0
    confine: bool = False


class ClipRunner:
    """Animates one clip with a built model: `__init__` encodes the source and the clip's first frame once,
    `__call__(frames, points)` animates a batch of driving frames.

    Tensors: source and first frame 1 x 3 x H x W in [0, 1] (the engine's device and memory format); points
    are the landmarks the model consumes in pixels of the model-size frames (source 1 x P x 2, first frame
    1 x P x 2, each batch B x P x 2), or None where it consumes none. `stage(name)` is a context manager
    that adds the wall time of a block to the engine's "motion" / "generator" timings.
    """

    def __init__(self, model: "nn.Module", source: torch.Tensor, first_frame: torch.Tensor,
                 source_points: torch.Tensor | None, first_points: torch.Tensor | None, settings: ClipSettings,
                 to_tensor: Callable[[np.ndarray], torch.Tensor], stage: Callable[[str], Any] | None = None):
        self.model, self.source, self.settings, self.to_tensor = model, source, settings, to_tensor
        self.stage = stage or (lambda name: contextlib.nullcontext())
        self.prior_map: np.ndarray | None = None  # h x w, the source's prior map fed to the network

    def __call__(self, frames: np.ndarray, points: torch.Tensor | None, planned: Any = None) -> torch.Tensor:
        """B x H x W x 3 uint8 frames (and their B x P x 2 points) -> B x 3 x H x W predictions in [0, 1];
        `planned` is what `plan` made of these points, where the engine had it done ahead (else None)."""
        raise NotImplementedError

    def plan(self, points: torch.Tensor | None) -> Any:
        """Work of a batch that needs its points alone, no frames (for the dense generator, its motion): the engine
        may run it in another thread while earlier batches are animated and pass its result to `__call__`. Must
        only read what `__init__` made. None by default (nothing to do ahead)."""
        return None

    @classmethod
    def prepare_source(cls, model: "nn.Module", source: np.ndarray, source_points: np.ndarray | None) -> None:
        """Work of `__init__` that needs the source alone (S x S x 3 uint8, its 1 x P x 2 points), done ahead by the
        engine while the clip's onset points are still being found, and kept by the model; none by default."""

    @classmethod
    def original_loop(cls, model: "nn.Module", source: torch.Tensor, driving: np.ndarray,
                      source_points: torch.Tensor | None, driving_points: torch.Tensor | None, settings: ClipSettings,
                      to_tensor: Callable[[np.ndarray], torch.Tensor], stage: Callable[[str, int], Any]) -> list[torch.Tensor]:
        """The original demos' per-frame loop (for `python -m mefacial bench`): one 1 x 3 x H x W prediction per
        frame. `stage(name, t)` times a block of frame t."""
        raise NotImplementedError


def au_points(config: "ModelConfig", src_points: torch.Tensor | None, drv_points: torch.Tensor | None
              ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """AU points (pixels) of source 1 x 18 x 2 and frames T x 18 x 2 from 68 landmarks (or given AU points);
    fixed to the first given frame for MM 2021 configs; (None, None) without a prior."""
    if config.prior == "none" or src_points is None:
        return None, None
    src, drv = src_points, drv_points
    if src.shape[1] == prior_lib.NUM_LANDMARKS:
        src = prior_lib.au_points_from_landmarks(src)
    if drv is not None and drv.shape[1] == prior_lib.NUM_LANDMARKS:
        drv = prior_lib.au_points_from_landmarks(drv)
    if drv is not None and config.au_points == "first_frame":
        drv = drv[:1].expand_as(drv)
    return src.float(), None if drv is None else drv.float()


class MotionTransferClip(ClipRunner):
    """The detect / transfer / generate protocol of the learned backbones (FOMM, MRAA)."""

    def __init__(self, model, source, first_frame, source_points, first_points, settings, to_tensor, stage=None):
        super().__init__(model, source, first_frame, source_points, first_points, settings, to_tensor, stage)
        self.config = model.config
        self.options = dict(mode=settings.motion, adapt_scale=settings.adapt_scale, magnify=settings.magnify)
        self.source_points = source_points
        self.src_au, self.first_au = au_points(self.config, source_points, first_points)  # 1 x 18 x 2 each
        with self.stage("motion"):
            self.src = model.detect(source, self.src_au)
            self.init = model.detect(first_frame, self.first_au)
        with self.stage("generator"):
            self.cache = model.encode_source(source)
        if "prior" in self.src:
            self.prior_map = self.src["prior"][0, 0].float().cpu().numpy()

    def __call__(self, frames: np.ndarray, points: torch.Tensor | None, planned: Any = None) -> torch.Tensor:
        if self.first_au is None:
            au = None
        elif self.config.au_points == "first_frame":
            au = self.first_au.expand(len(frames), -1, -1)  # B x 18 x 2: fixed for the clip (ACM MM 2021)
        else:
            au = au_points(self.config, self.source_points, points)[1]  # B x 18 x 2
        with self.stage("motion"):
            drv = self.model.detect(self.to_tensor(frames), au)
            new = self.model.transfer(self.src, drv, self.init, **self.options)
        with self.stage("generator"):
            return self.model.generate(self.source, self.cache, self.src, new)["prediction"]

    @classmethod
    def original_loop(cls, model, source, driving, source_points, driving_points, settings, to_tensor, stage):
        """Per frame, as the original demos: detect the frame, transfer, generate (re-encoding the source),
        plus the dead computation the original MRAA-with-prior region predictor runs (`dead_computation`)."""
        src_au, drv_au = au_points(model.config, source_points, driving_points)  # 1 x 18 x 2, T x 18 x 2
        au = (lambda t: None) if drv_au is None else (lambda t: drv_au[t:t + 1])  # noqa: E731
        with stage("motion", -1):
            src = model.detect(source, src_au)
            init = model.detect(to_tensor(driving[:1]), au(0))
        preds = []
        for t in range(len(driving)):
            with stage("motion", t):
                frame = to_tensor(driving[t:t + 1])
                drv = model.detect(frame, au(t))
                dead = getattr(model, "dead_computation", None)
                if dead is not None:
                    dead(frame, drv)
                new = model.transfer(src, drv, init, mode=settings.motion, adapt_scale=settings.adapt_scale)
            with stage("generator", t):
                preds.append(model.generate(source, model.encode_source(source), src, new)["prediction"])
        return preds
