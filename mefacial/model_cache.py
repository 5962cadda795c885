"""Models by (variant, weights), built and loaded once, shared by concurrent requests.

The cache's lock is held only to look up and to store: a model's weights are resolved (a Hub download
included) and loaded under a lock of its (variant, weights) key alone, so a first-use download of one
variant never stalls requests for another, and two requests for the same one load it once.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

from torch import nn

from .checkpoints import load_weights, resolve_checkpoint, trained_config
from .models import build_model
from .variants import Variant

Key = tuple[str, str]  # (variant id, weights path or "")


class ModelCache:
    """`get(variant, checkpoint)` -> (model ready for inference, where its weights came from)."""

    def __init__(self, prepare: Callable[[nn.Module], nn.Module]):
        self.prepare = prepare  # built and loaded model -> the model to serve (device, fusion, compile)
        self._models: dict[Key, tuple[nn.Module, str]] = {}
        self._lock = threading.Lock()  # guards the two dicts, never held while loading
        self._loading: dict[Key, threading.Lock] = {}  # one lock per model being loaded

    def get(self, spec: Variant, checkpoint: str | Path | None = None) -> tuple[nn.Module, str]:
        key = (spec.id, str(checkpoint or ""))
        with self._lock:
            if key in self._models:
                return self._models[key]
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._models:  # loaded by the request we waited for
                    return self._models[key]
            weights = "none (training-free)"
            if spec.needs_weights:  # the architecture the weights were trained with (recorded), else the variant's
                resolved = resolve_checkpoint(spec.id, checkpoint)
                model = build_model(trained_config(resolved.path, spec.config))
                load_weights(model, resolved.path, spec.spec.inference_parts)
                weights = f"{resolved.path} ({resolved.source})"
            else:
                model = build_model(spec.config)
            served = (self.prepare(model), weights)
            with self._lock:
                self._models[key] = served
                self._loading.pop(key, None)
            return served

    def put(self, spec: Variant, model: nn.Module, weights: str) -> nn.Module:
        """Serve `spec` (without an explicit checkpoint) with an already built model; returns the served one."""
        served = self.prepare(model)
        with self._lock:
            self._models[(spec.id, "")] = (served, weights)
        return served

    def apply(self, fn: Callable[[nn.Module], nn.Module]) -> None:
        """Replace every cached model by `fn(model)` (e.g. a move to another device), under the cache's lock."""
        with self._lock:
            self._models = {key: (fn(model), weights) for key, (model, weights) in self._models.items()}
