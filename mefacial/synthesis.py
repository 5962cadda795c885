"""Synthesise a micro-expression from a FACS specification, with no driving clip: `Engine.synthesize`.

    result = engine.synthesize("face.png", "4:C,7:B", au.Timing(onset_ms=60, apex_ms=40, offset_ms=120, fps=200))

The source face is cut to the model size around the face (as `animate` cuts it), its dense mesh is found
(`mefacial.mesh`), the AU library (`mefacial.au`) moves the mesh frame by frame, and the dense generator's
renderer (`mefacial.models.dense`) draws the source at every moved mesh, shaded by the AUs' appearance cues.
The clip spans exactly the event (first frame = the neutral source face) plus any lead-in / lead-out.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from . import au
from . import video
from .errors import InputError
from .options import AnimateOptions

RENDER_VARIANT = "dense"  # the generator whose renderer draws the moved meshes
MODEL_SIZE = 256


@dataclasses.dataclass(frozen=True)
class SynthesisOptions(AnimateOptions):
    """The animation options (`AnimateOptions`: crop, margin, paste_back, magnify, landmarks, slowdown, ... with
    their validation) plus what only synthesis has. magnify multiplies every AU's motion and appearance (1 = the
    templates' FACS intensities; the eyelid and lip contact rules still hold); options about a driving clip
    (motion, adapt_scale, smooth, confine, fps) do not apply. appearance: paint the AUs' appearance cues
    (furrows, lash line, mouth opening)."""

    appearance: bool = True

    @classmethod
    def of(cls, options: Any) -> "SynthesisOptions":
        """These options from an `AnimateOptions` (its fields of the same names) or a dict of these fields (checked);
        None -> the defaults."""
        if options is None or isinstance(options, cls):
            return options or cls()
        if isinstance(options, Mapping):
            return cls().replace(**options)
        if not isinstance(options, AnimateOptions):
            raise InputError("options must be a SynthesisOptions or a dict of its fields, got "
                             f"{type(options).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{n: getattr(options, n) for n in names if getattr(options, n, None) is not None})


def synthesize(engine: Any, source: Any, aus: str | Sequence, timing: au.Timing | None = None,
               options: SynthesisOptions | None = None, progress: Callable[[float, str], None] | None = None,
               sink: Callable[[np.ndarray], None] | None = None):
    """The clip of `source` performing the AU specification `aus` ('4:C,7:B', or AUSpecs) with `timing`;
    returns an `AnimationResult` whose `meshes` are the moved meshes and `action_units` the specification.
    `sink`: each batch of frames goes there as it is made (pasted back where asked), and the result keeps none
    (`Engine.collect`)."""
    from .engine import AnimationResult, gather_frames, to_tensor, to_uint8
    from .mesh import detect_mesh
    from .models.dense import carry_lash_bands

    timing = timing or au.Timing()
    options = SynthesisOptions.of(options)
    report = progress or (lambda fraction, message: None)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    specs = au.parse_aus(aus, timing)
    plan = au.plan(specs, timing, max_frames=engine.limits.max_frames, max_seconds=engine.limits.max_seconds)
    report(0.0, "reading the face")
    image = video.read_image(source, engine.limits)
    model, weights = engine.model(RENDER_VARIANT)
    size = getattr(getattr(model, "config", None), "image_size", MODEL_SIZE)

    t0 = time.perf_counter()
    box = None
    if options.crop:
        report(0.02, "finding the face")
        points = engine.find_face(image, "source", options.landmarks)
        box = video.face_box(points, image.shape, margin=options.margin)
        face = video.crop_to_model(image[None], box, size)[0]
    else:
        face = video.resize_frames(image[None], size, size)[0]
    neutral = detect_mesh(face, role="source")[0].astype(np.float64)  # V x 2
    timings["landmarks_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    scaled = dataclasses.replace(plan, activations=plan.activations * options.magnify)
    targets = carry_lash_bands(neutral, au.target_meshes(neutral, scaled))  # T x V x 2 (closing lids: lash lines carried)
    cues = au.appearance(face.shape[:2], neutral, targets, plan, gain=options.magnify) if options.appearance else None
    timings["motion_s"] = time.perf_counter() - t0

    total = plan.num_frames
    seconds = {"generator": 0.0}

    def batches() -> Iterator[np.ndarray]:  # n x S x S x 3, or pasted back n x H x W x 3
        with engine.inference_context():
            t0 = time.perf_counter()
            state = model.prepare(to_tensor(face, engine.device), neutral)
            seconds["generator"] += time.perf_counter() - t0
            for start in range(0, total, engine.batch_size):
                t0 = time.perf_counter()
                batch = slice(start, min(start + engine.batch_size, total))
                ratio = None if cues is None else torch.from_numpy(cues.source_ratio(batch))[:, None]  # B x 1 x H x W
                out = to_uint8(model.render(state, targets[batch], ratio)["prediction"])
                out = out if cues is None else cues.apply_output(out, batch.start)
                seconds["generator"] += time.perf_counter() - t0
                yield video.paste_back(out, image, box) if options.paste_back else out
                report(0.05 + 0.95 * batch.stop / total, f"frames {batch.stop}/{total}")

    rendered, count = gather_frames(batches(), total, sink)
    timings["generator_s"] = seconds["generator"]
    timings["total_s"] = time.perf_counter() - started
    timings["ms_per_frame"] = 1000 * timings["total_s"] / total
    return AnimationResult(
        frames=rendered, fps=plan.fps, variant=RENDER_VARIANT, weights=weights, model_source=face,
        landmark_backend="mediapipe face mesh", crop_box=box, timings=timings, meshes=targets.astype(np.float32),
        action_units=labels(plan), frame_count=None if sink is None else count)


def labels(plan: au.Plan) -> dict[str, Any]:
    """What a synthesised clip holds, for manifests and status lines: the specification in FACS notation, each AU's
    intensity (letter and fraction), its frames of onset / apex / offset, and the timing."""
    timing = plan.timing
    return {
        "spec": au.describe(plan.specs),
        "aus": [{"au": s.au, "side": s.side, "intensity": s.letter or round(s.intensity, 3),
                 "fraction": round(s.intensity, 3), "apex_frames": list(plan.apex_frames[k])}
                for k, s in enumerate(plan.specs)],
        "onset_ms": timing.onset_ms, "apex_ms": timing.apex_ms, "offset_ms": timing.offset_ms, "fps": timing.fps,
        "lead_in_ms": timing.lead_in_ms, "lead_out_ms": timing.lead_out_ms,
        "event_frames": list(plan.event_frames), "frames": plan.num_frames,
    }
