"""The training loop: one process, or one per GPU / CPU slot under torchrun (DistributedDataParallel).

    summary = run(load_train_config("fomm-awp"), data_dir="data/casme2", out_dir="runs/fomm-awp")

What a run does, in order: set up torch.distributed from torchrun's
environment (NCCL on GPUs, gloo on CPUs); check the VGG19 weights of the
perceptual loss (before anything slow); seed; list the videos and load or
detect their landmarks (rank 0 detects, the others read the cache); build the
model and the recipe of its backbone and stage (`recipes.py`); restore a
checkpoint (`--resume`) or start from weights (`--init`); then train for
`num_epochs` epochs of `num_repeats` passes over the videos, stepping the
learning rates at the epoch milestones, logging every step (rank 0) and
saving `last.pth.tar` every `checkpoint_every` steps, at each epoch's end and
at the end, and `best.pth.tar` when the validation metric improves (L1 of
reconstructed test-split frames, or the training L1 without a test split).

Exact resume: every random draw of a step comes from a generator seeded by
(seed, step, rank) and every sample from (seed, epoch, index), the sampler
skips the batches of the epoch already trained on, and model, optimiser,
scheduler, scaler and global RNG states are restored, so the steps after a
resume compute the same losses as an uninterrupted run (on the CPU; GPU
kernels may differ in the last bits).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from mefacial.device import pick_device
from mefacial.distributed import Ranks, barrier, init_process_group
from mefacial.errors import CheckpointError, ConfigError
from mefacial.models import build_model

from . import checkpointing as ckpt
from .config import TrainConfig
from .datasets import EpochSampler, PairDataset, discover_videos, landmark_cache_dir, load_landmarks, split_dir
from .losses import ensure_vgg19_weights, load_vgg19
from .monitor import Monitor
from .recipes import RECIPES, Recipe

log = logging.getLogger("train")
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUNS_DIR = REPO_ROOT / "runs"
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ---- torch.distributed ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DistContext:
    """This process's place in the run (`Ranks`, read from torchrun's environment) and its device."""

    ranks: Ranks = Ranks()
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.ranks.rank == 0

    @property
    def distributed(self) -> bool:
        return self.ranks.distributed

    def barrier(self) -> None:
        barrier()


def setup_distributed(device: str = "auto") -> DistContext:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK, pick the device, init the process group (NCCL or gloo)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"runtime.device is {device!r} but no CUDA GPU is available; use auto or cpu")
    ranks = Ranks.from_env()
    chosen = pick_device(ranks.device(device))  # auto / cuda: this rank's GPU (LOCAL_RANK) when there is one
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    init_process_group(ranks, chosen)
    return DistContext(ranks, chosen)


def teardown_distributed(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def _mean_over_ranks(values: dict[str, float], ctx: DistContext) -> dict[str, float]:
    if not ctx.distributed:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor)
    return {k: float(v) / ctx.ranks.world for k, v in zip(keys, tensor.tolist())}


def parameter_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter (names and bytes): equal on all ranks when DDP kept the replicas in sync."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# ---- set-up pieces ----------------------------------------------------------------------------------


def _step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The random numbers of one training step (the equivariance warp, AVD scaling)."""
    state = np.random.SeedSequence([seed, step, rank]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _precision(precision: str, device: torch.device):
    """An autocast context factory and a grad scaler (enabled for fp16 only)."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("runtime.precision fp16 needs a CUDA GPU (with a gradient scaler); on the CPU use bf16 or fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU has no bf16; use runtime.precision fp16 or fp32")
    dtype = AMP_DTYPES.get(precision)

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    return autocast, scaler


def _datasets(cfg: TrainConfig, root: Path, ctx: DistContext, num_repeats: int) -> tuple[PairDataset, PairDataset | None]:
    """Training pairs (augmented) and fixed validation pairs from the test split (None without one)."""
    train_videos = discover_videos(root, "train")
    test_videos = discover_videos(root, "test") if split_dir(root, "test") is not None else []
    landmarks = None
    if cfg.needs_landmarks:
        backend = cfg.dataset.landmarks
        cache = landmark_cache_dir(root, backend, cfg.dataset.landmark_cache)
        device = ctx.device if ctx.device.type == "cuda" else "cpu"
        # One process per machine detects and writes the cache (atomically), the others then read it.
        if ctx.ranks.local_rank == 0:
            landmarks = load_landmarks(train_videos + test_videos, backend, cache, device)
        ctx.barrier()
        if ctx.ranks.local_rank != 0:
            landmarks = load_landmarks(train_videos + test_videos, backend, cache, device)
    common = dict(image_size=cfg.model.image_size, seed=cfg.runtime.seed, landmarks=landmarks,
                  au_points=cfg.model.au_points, video_cache=cfg.dataset.video_cache)
    train = PairDataset(train_videos, num_repeats=num_repeats, augmentation=cfg.dataset.augmentation, **common)
    evaluation = None
    usable = [v for v in test_videos if landmarks is None or v.name in landmarks]
    if usable and cfg.runtime.eval_pairs > 0:
        evaluation = PairDataset(usable, num_repeats=math.ceil(cfg.runtime.eval_pairs / len(usable)),
                                 augmentation=None, **common)
    return train, evaluation


def _loader_workers(wanted: int, ctx: DistContext) -> int:
    """DataLoader workers per rank: `wanted`, at most the CPUs this process may use shared by the machine's ranks
    (more only compete for them; PyTorch warns). The pairs do not depend on it (each is drawn from its own seed)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    fitting = max(cpus // max(ctx.ranks.local_world, 1), 1)
    if wanted > fitting:
        if ctx.is_main:
            log.info("runtime.num_workers %d -> %d: %d CPU(s) for %d rank(s) on this machine", wanted, fitting, cpus,
                     ctx.ranks.local_world)
        return fitting
    return wanted


def perceptual_network(cfg: TrainConfig, device: torch.device, is_main: bool = True,
                       barrier=lambda: None) -> torch.nn.Module | None:
    """The VGG19 of the perceptual loss on `device` (None when the stage / config does not use it): from
    `train.vgg19_weights` when set, else torchvision's ImageNet weights (rank 0 downloads them once)."""
    if cfg.stage != "reconstruction" or cfg.perceptual_weight == 0:
        return None
    if cfg.train.vgg19_weights:
        return load_vgg19(path=cfg.train.vgg19_weights).to(device)
    if is_main:
        ensure_vgg19_weights()  # rank 0 downloads (once, into the torch hub cache) or stops with how to fix it
    barrier()
    return load_vgg19(download=False).to(device)


def build_recipe(cfg: TrainConfig, device: torch.device | str = "cpu", distributed: bool = False,
                 vgg: torch.nn.Module | None = None, init: str | Path | None = None, verbose: bool = True) -> Recipe:
    """The model of `cfg` (with the parts only training needs), optionally initialised from a checkpoint of this
    trainer or of an original implementation (`init`), and the recipe (optimisers, step) of its stage."""
    device = torch.device(device)
    model = build_model(cfg.model, for_training=True).to(device)
    if init is not None:
        loaded = ckpt.load_parts(model, ckpt.read_checkpoint(init), source=str(init))
        if cfg.stage == "avd" and not {"generator", "region_predictor", "bg_predictor"} <= set(loaded):
            raise CheckpointError(f"{init} lacks parts the AVD stage needs (has {loaded})")
        if verbose:
            log.info("initialised %s from %s", ", ".join(loaded), init)
    autocast, scaler = _precision(cfg.runtime.precision, device)
    return RECIPES[(cfg.model.backbone, cfg.stage)](cfg, model, device, distributed, autocast, scaler, vgg)


def _default_init(cfg: TrainConfig, out_dir: Path) -> Path | None:
    """The AVD stage starts from the reconstruction stage's `last` checkpoint in the same run folder."""
    candidate = out_dir / ckpt.LAST
    return candidate if cfg.stage == "avd" and candidate.is_file() else None


# ---- the run ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Progress:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_metric: float | None = None


def run(cfg: TrainConfig, data_dir: str | Path | None = None, out_dir: str | Path | None = None,
        max_steps: int | None = None, resume: str | Path | None = None, init: str | Path | None = None) -> dict[str, Any]:
    """Train `cfg`; returns the run summary (also written to `<out>/summary.json` by rank 0)."""
    ctx = setup_distributed(cfg.runtime.device)
    try:
        summary = _run(cfg, ctx, data_dir, out_dir, max_steps, resume, init)
        ctx.barrier()  # every rank done (rank 0 writes the summary last) before any of them shuts the group down
        return summary
    finally:
        teardown_distributed(ctx)


def _run(cfg: TrainConfig, ctx: DistContext, data_dir, out_dir, max_steps, resume, init) -> dict[str, Any]:
    root = Path(data_dir or cfg.dataset.root_dir)
    base_dir = Path(out_dir) if out_dir else DEFAULT_RUNS_DIR / cfg.name
    run_dir = base_dir / "avd" if cfg.stage == "avd" else base_dir
    if resume is None and (run_dir / ckpt.LAST).is_file():  # a new run would replace its checkpoints and logs
        raise ConfigError(f"{run_dir} holds a run already ({run_dir / ckpt.LAST}): continue it with --resume "
                          f"{run_dir / ckpt.LAST}, or start a new run in another folder (--out DIR)")
    if init is None and resume is None:
        init = _default_init(cfg, base_dir)
    if cfg.stage == "avd" and init is None and resume is None:
        raise ConfigError(f"the AVD stage starts from a trained reconstruction model: pass --init CKPT "
                          f"(or train the reconstruction stage into {base_dir} first)")

    vgg = perceptual_network(cfg, ctx.device, ctx.is_main, ctx.barrier)

    _seed_everything(cfg.runtime.seed)
    stage_params = cfg.avd if cfg.stage == "avd" else cfg.train
    num_repeats = cfg.avd.num_repeats if cfg.stage == "avd" else cfg.dataset.num_repeats
    train_set, eval_set = _datasets(cfg, root, ctx, num_repeats)

    recipe = build_recipe(cfg, ctx.device, ctx.distributed, vgg, init=None if resume is not None else init,
                          verbose=ctx.is_main)
    model, scaler = recipe.model, recipe.scaler

    progress = Progress()
    restored_rng = None
    if resume is not None:
        checkpoint = ckpt.read_checkpoint(resume)
        ckpt.check_resumable(checkpoint, resume, cfg.model.to_dict(), cfg.stage)
        ckpt.load_parts(model, checkpoint, parts=tuple(p for p in ckpt.CHECKPOINT_PARTS[cfg.model.backbone]
                                                         if hasattr(model, p)), source=str(resume))
        recipe.load_state(checkpoint)
        if checkpoint.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(checkpoint["scaler"])
        progress = Progress(checkpoint["step"], checkpoint["epoch"], checkpoint["batch_in_epoch"], checkpoint["best_metric"])
        restored_rng = checkpoint["rng"]
        if ctx.is_main:
            log.info("resumed %s at step %d (epoch %d)", resume, progress.step, progress.epoch)

    per_rank_batch = max(1, stage_params.batch_size // ctx.ranks.world)
    if ctx.is_main and per_rank_batch * ctx.ranks.world != stage_params.batch_size:
        log.warning("batch size %d does not split evenly over %d ranks: using %d per rank",
                    stage_params.batch_size, ctx.ranks.world, per_rank_batch)
    sampler = EpochSampler(train_set, ctx.ranks.world, ctx.ranks.rank, seed=cfg.runtime.seed)
    steps_per_epoch = sampler.num_samples // per_rank_batch
    if steps_per_epoch == 0:
        raise ConfigError(f"{len(train_set)} training pairs per epoch cannot fill one batch of {per_rank_batch} "
                          f"per rank: raise dataset.num_repeats or lower the batch size")
    workers = _loader_workers(cfg.runtime.num_workers, ctx)
    loader = DataLoader(train_set, batch_size=per_rank_batch, sampler=sampler, num_workers=workers,
                        drop_last=True, pin_memory=ctx.device.type == "cuda",
                        generator=torch.Generator().manual_seed(cfg.runtime.seed))
    total_steps = stage_params.num_epochs * steps_per_epoch
    stop = min(total_steps, max_steps) if max_steps else total_steps

    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt.remove_stale_temporaries(run_dir):
            log.info("removed %s, left by a run killed while saving", stale.name)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
        if max_steps and max_steps > total_steps:  # (the schedule's learning rates end there)
            log.warning("--max-steps %d is past the end of the config's schedule: training to step %d (%d epochs); "
                        "raise %s.num_epochs to train longer", max_steps, total_steps, stage_params.num_epochs,
                        "avd" if cfg.stage == "avd" else "train")
        log.info("%s (%s stage): %d videos, %d steps per epoch of %d per rank x %d rank(s), training to step %d on %s",
                 cfg.name, cfg.stage, len(train_set.videos), steps_per_epoch, per_rank_batch, ctx.ranks.world, stop,
                 ctx.device)
        if eval_set is None:
            log.info("no test split with faces under %s: best.pth.tar is picked on the training L1 (train.prepare "
                     "--test-fraction makes one)", root / "test")
    monitor = Monitor(run_dir, ctx.is_main, progress.step, stop, cfg.runtime.log_every)
    if restored_rng is not None:
        ckpt.restore_rng(restored_rng)

    window: list[float] = []  # training L1 since the last save (the metric without a test split)
    saved_at = progress.step

    def save() -> None:
        nonlocal saved_at, window
        metric = None
        if ctx.is_main:
            metric = _validate(recipe, model, eval_set, per_rank_batch, ctx) if eval_set is not None else (
                float(np.mean(window)) if window else None)
            improved = metric is not None and (progress.best_metric is None or metric < progress.best_metric)
            if improved:
                progress.best_metric = metric
            payload = ckpt.build_checkpoint(
                model, config=cfg.to_dict(), variant=cfg.variant, stage=cfg.stage, step=progress.step,
                epoch=progress.epoch, batch_in_epoch=progress.batch_in_epoch, optimizers=recipe.optimizers,
                schedulers=recipe.schedulers, scaler=scaler, best_metric=progress.best_metric, metric=metric,
                world_size=ctx.ranks.world)
            ckpt.atomic_save(payload, run_dir / ckpt.LAST)
            if improved:
                ckpt.atomic_save(payload, run_dir / ckpt.BEST)
            if metric is not None:
                monitor.log_metric("val/l1" if eval_set is not None else "train/l1_window", metric, progress.step)
        ctx.barrier()
        saved_at, window = progress.step, []

    recipe.train()
    started = time.time()
    last_values: dict[str, float] = {}
    while progress.step < stop:
        sampler.set_epoch(progress.epoch, skip=progress.batch_in_epoch * per_rank_batch)
        for batch in loader:
            batch = {k: v.to(ctx.device, non_blocking=True) for k, v in batch.items()}
            values = recipe.step(batch, _step_generator(cfg.runtime.seed, progress.step, ctx.ranks.rank))
            values = _mean_over_ranks(values, ctx)
            if not all(math.isfinite(v) for v in values.values()):
                raise FloatingPointError(f"non-finite loss at step {progress.step + 1}: {values}; lower the learning "
                                         "rate or use fp32, and resume from the last checkpoint")
            progress.step += 1
            progress.batch_in_epoch += 1
            window.append(values["l1"])
            last_values = values
            monitor.log_step(progress.step, progress.epoch, values, recipe.lrs())
            if progress.batch_in_epoch == steps_per_epoch:
                recipe.end_epoch()
                progress.epoch += 1
                progress.batch_in_epoch = 0
            if ctx.is_main and cfg.runtime.visualize_every and progress.step % cfg.runtime.visualize_every == 0:
                _visualise(recipe, model, monitor, progress.step)
            epoch_done = progress.batch_in_epoch == 0
            if epoch_done or progress.step % max(cfg.runtime.checkpoint_every, 1) == 0 or progress.step >= stop:
                save()
            if progress.step >= stop:
                break
    if saved_at != progress.step:
        save()
    if ctx.is_main:
        _visualise(recipe, model, monitor, progress.step)

    digests = [parameter_digest(model)]
    if ctx.distributed:
        gathered: list[Any] = [None] * ctx.ranks.world
        dist.all_gather_object(gathered, digests[0])
        digests = gathered
    summary = {
        "name": cfg.name, "variant": cfg.variant, "stage": cfg.stage, "step": progress.step, "epoch": progress.epoch,
        "steps_per_epoch": steps_per_epoch, "world_size": ctx.ranks.world, "device": str(ctx.device),
        "final_losses": last_values, "best_metric": progress.best_metric, "seconds": round(time.time() - started, 2),
        "parameter_sha256": digests, "replicas_identical": len(set(digests)) == 1,
        "last": str(run_dir / ckpt.LAST), "best": str(run_dir / ckpt.BEST) if (run_dir / ckpt.BEST).exists() else None,
    }
    if ctx.is_main:
        if not summary["replicas_identical"]:
            log.error("DDP replicas hold different parameters at the end: %s", digests)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    monitor.close()
    return summary


def _visualise(recipe: Recipe, model: torch.nn.Module, monitor: Monitor, step: int) -> None:
    model.eval()
    try:
        monitor.visualise(recipe.visuals(), step)
    finally:
        recipe.train()


@torch.no_grad()
def _validate(recipe: Recipe, model: torch.nn.Module, dataset: PairDataset, batch_size: int, ctx: DistContext) -> float:
    """The recipe's metric over fixed test-split pairs (eval mode; nothing random, no state changed)."""
    model.eval()
    try:
        total, count = 0.0, 0
        keys = list(range(min(len(dataset), max(recipe.cfg.runtime.eval_pairs, 1))))
        for start in range(0, len(keys), batch_size):
            items = [dataset[k] for k in keys[start:start + batch_size]]
            batch = {name: torch.stack([item[name] for item in items]).to(ctx.device) for name in items[0]}
            total += recipe.evaluate(batch) * len(items)
            count += len(items)
        return total / count
    finally:
        recipe.train()
