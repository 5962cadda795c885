"""Dataset generation: many (source face, driving clip) pairs x variants -> videos + a manifest.

    python -m mefacial generate --pairs pairs.csv --variants warp,fomm-awp --out DIR
    torchrun --nproc_per_node=4 -m mefacial generate --pairs pairs.csv --variants ... --out DIR

Pairs come from a CSV (`read_pairs`: columns source, driving and optionally
label, relative paths resolved against the CSV's folder) or from the MEGC
layout (`megc_pairs`: every target face x every source clip, the emotion label
taken from the clip's name, `Positive_022_3_3`, or from a label folder).

Each pair and variant gives one video at `DIR/<variant>/<label>/<clip>-<face>.mp4`
(the naming of the published results, `022_3_3-normalized_asianFemale.gif`) and
one JSON line in the manifest (`DIR/manifest.jsonl`): the pair, the variant, the
output, the weights' path and sha256, the settings, the timings, and `status`
"ok" or "error" with the error. A failed pair is recorded and the run goes on.

Runs are resumable: a pair whose output exists and whose latest manifest line
is ok with the same settings (and weights) is skipped. Videos are written to
`DIR/.partial/` and renamed into place, and manifest lines are appended after
the rename, so a killed run never leaves a half-written video counted as done.

Sharding: under torchrun every rank (RANK of WORLD_SIZE) takes every
WORLD_SIZE-th work item of the full, deterministic list (so ranks agree without
talking, and no item is done twice or skipped), writes its own manifest part
`DIR/manifest.parts/rank-NNNNN.jsonl`, and after a barrier rank 0 merges the
parts into `DIR/manifest.jsonl` (`merge_manifest`, also `--merge`).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .errors import InputError, MefacialError
from .distributed import Ranks, barrier, init_process_group  # noqa: F401 - Ranks, barrier: public here
from .options import AnimateOptions
from .utils import atomic_write
from .video import ANIMATED_IMAGE_EXTENSIONS, IMAGE_EXTENSIONS, MP4_EXTENSIONS, list_frame_files, natural_key

log = logging.getLogger("mefacial")

MANIFEST = "manifest.jsonl"
PARTS_DIR = "manifest.parts"
PARTIAL_DIR = ".partial"
UNLABELLED = "unlabelled"
OUTPUT_FORMATS = ("mp4", "gif")
# Emotion labels of MEGC 2021 / 2022 (positive, negative, surprise) and the classes of CASME II / SAMM,
# recognised as a clip-name prefix ("Positive_022_3_3") or a folder name ("clips/positive/022_3_3.gif").
KNOWN_LABELS = ("positive", "negative", "surprise", "others", "happiness", "disgust", "repression", "fear",
                "sadness", "anger", "contempt")
CLIP_EXTENSIONS = tuple(e for e in ANIMATED_IMAGE_EXTENSIONS if e != ".webp") + MP4_EXTENSIONS + (
    ".webm", ".avi", ".mkv", ".mpg", ".mpeg", ".wmv")
CSV_COLUMNS = ("source", "driving", "label", "name")
BARRIER_TIMEOUT = dt.timedelta(hours=48)  # ranks wait this long for the slowest one before the merge


# ---- pairs ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pair:
    """One source face and one driving clip, with the label and the output name they go under."""

    source: str
    driving: str
    label: str = UNLABELLED
    name: str = ""  # output file stem, <clip>-<face>; set by `name_pairs`
    row: int | None = None  # data row in the pairs CSV (1 = first row after the header)
    error: str | None = None  # why the row itself is unusable (then no engine call is made)

    def output(self, variant: str, fmt: str = "mp4") -> str:
        """Output path relative to the output folder: <variant>/<label>/<name>.<fmt>."""
        return f"{variant}/{self.label}/{self.name}.{fmt}"

    def key(self, variant: str) -> str:
        """What identifies this pair x variant in the manifest."""
        return f"{variant}/{self.label}/{self.name}"


def safe_name(text: str) -> str:
    """A file-system-safe path component: letters, digits, '.', '_', '-' (others become '_')."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip()).strip("._")
    return cleaned or "_"


def _stem(path: str) -> str:
    p = Path(path)
    return p.stem if p.suffix.lower() in CLIP_EXTENSIONS + IMAGE_EXTENSIONS else p.name


def _strip_label(stem: str, label: str) -> str:
    """'Positive_022_3_3' under label 'positive' -> '022_3_3' (the published results' clip names)."""
    prefix = f"{label}_"
    return stem[len(prefix):] if label != UNLABELLED and stem.lower().startswith(prefix.lower()) else stem


def unique_names(paths: Iterable[str], stem: Callable[[str], str] = _stem) -> dict[str, str]:
    """Path -> short name: its stem, extended by parent folders ('sub01_EP02_01f') where stems collide, and by its
    extension ('clip_mp4') where they collide within one folder."""
    paths = sorted(set(paths))
    depth = {p: 0 for p in paths}
    typed: set[str] = set()  # paths named with their extension
    while True:
        names = {}
        for p in paths:
            parents = [q.name for q in Path(p).parents][: depth[p]][::-1]
            extension = [Path(p).suffix.lstrip(".")] if p in typed else []
            names[p] = "_".join([*parents, stem(p), *extension])
        groups: dict[str, list[str]] = {}
        for p, n in names.items():
            groups.setdefault(n, []).append(p)
        clashes = [ps for ps in groups.values() if len(ps) > 1]
        grown = False
        for ps in clashes:
            if len({Path(p).parent for p in ps}) == 1 and not typed.issuperset(ps):  # one folder: other extensions
                typed.update(ps)
                grown = True
                continue
            for p in ps:
                if depth[p] < len(Path(p).parents) - 1:
                    depth[p] += 1
                    grown = True
        if not clashes or not grown:
            return {p: safe_name(n) for p, n in names.items()}


def name_pairs(pairs: Sequence[Pair], face_names: dict[str, str] | None = None) -> list[Pair]:
    """Give each pair its output name <clip>-<face>, unique per label; drop exact duplicates (logged).

    Clip names lose a prefix equal to their label ('Positive_022_3_3' -> '022_3_3')
    unless that makes two names clash. `face_names` maps a source path to its name
    (default: `unique_names` of the sources). A name already set (a `name` column) is kept.
    """
    usable = [p for p in pairs if not p.error]
    faces = face_names or unique_names(p.source for p in usable)
    clip_label: dict[str, str] = {}
    for pair in usable:
        clip_label.setdefault(pair.driving, pair.label)
    clips = unique_names(clip_label, stem=lambda path: _strip_label(_stem(path), clip_label[path]))
    raw_clips = unique_names(clip_label)
    named, seen, taken = [], {}, set()
    for index, pair in enumerate(pairs, start=1):
        if pair.error:
            named.append(dataclasses.replace(pair, name=f"row-{pair.row}"))
            continue
        identity = (pair.source, pair.driving, pair.label)
        if identity in seen:
            log.warning("pairs: row %s repeats row %s; generated once", pair.row, seen[identity])
            continue
        seen[identity] = pair.row
        clip, raw, face = clips[pair.driving], raw_clips[pair.driving], faces[pair.source]
        stripped = clip if pair.label == clip_label[pair.driving] else raw
        candidates = [f"{stripped}-{face}", f"{raw}-{face}", f"{raw}-{face}-{index}"]
        if pair.name:  # given in the pairs file
            candidates = [pair.name, f"{pair.name}-{index}"]
        name = next(c for c in candidates if (pair.label, c) not in taken)
        taken.add((pair.label, name))
        named.append(dataclasses.replace(pair, name=name))
    return named


def read_pairs(csv_path: str | os.PathLike) -> list[Pair]:
    """Pairs from a CSV with a header naming `source` and `driving`, optionally `label` and `name` (the output
    file stem; default <clip>-<face>); other columns are ignored.

    Relative paths are resolved against the CSV's folder. A row without a source
    or a driving clip becomes a pair with an `error`, recorded as failed.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise InputError(f"pairs file {path} does not exist; pass a CSV with a header 'source,driving[,label]'")
    base = Path(os.path.abspath(path)).parent  # symlinks are kept: their names name the outputs
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip().lower() for c in reader.fieldnames or []]
        if "source" not in columns or "driving" not in columns:
            raise InputError(f"pairs file {path}: the header must name the columns 'source' and 'driving' "
                             f"(and optionally 'label', 'name'); it has {columns or 'no header'}")
        pairs = []
        for row_number, row in enumerate(reader, start=1):
            row = {(k or "").strip().lower(): (v or "").strip() if isinstance(v, str) else "" for k, v in row.items()}
            if not any(row.values()):
                continue  # blank line
            label = safe_name(row.get("label") or UNLABELLED)
            missing = [c for c in ("source", "driving") if not row.get(c)]
            if missing:
                pairs.append(Pair("", "", label, row=row_number,
                                  error=f"{path.name} row {row_number}: no {' and no '.join(missing)} given"))
                continue
            resolve = lambda p: os.path.abspath(base / Path(p).expanduser())  # noqa: E731
            pairs.append(Pair(resolve(row["source"]), resolve(row["driving"]), label,
                              name=safe_name(row["name"]) if row.get("name") else "", row=row_number))
    return name_pairs(pairs)


def _label_of(path: Path, root: Path) -> str:
    """The emotion label of a clip: a known label as its name prefix, else a known label folder above it."""
    prefix = _stem(str(path)).split("_", 1)[0].lower()
    if prefix in KNOWN_LABELS:
        return prefix
    for folder in path.relative_to(root).parts[:-1][::-1]:
        if folder.lower() in KNOWN_LABELS:
            return folder.lower()
    return UNLABELLED


def find_clips(root: str | os.PathLike) -> list[Path]:
    """Clips under `root`, recursively: video / GIF files, and folders that hold image frames (not searched
    further); `root` may also be one clip (a file, or a folder of its frames). None is an InputError."""
    root = Path(root)
    if root.is_file():
        if root.suffix.lower() not in CLIP_EXTENSIONS:
            raise InputError(f"{root} is not a clip ({', '.join(CLIP_EXTENSIONS)}) nor a folder of clips")
        return [root]
    if not root.is_dir():
        raise InputError(f"clip folder {root} does not exist")
    clips: list[Path] = []

    def walk(folder: Path) -> None:
        entries = sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: natural_key(p.name))
        for entry in entries:
            if entry.is_dir():
                (clips.append(entry) if list_frame_files(entry) else walk(entry))
            elif entry.suffix.lower() in CLIP_EXTENSIONS:
                clips.append(entry)

    walk(root)
    if not clips and list_frame_files(root):  # the folder is one clip's frames
        clips.append(root)
    if not clips:
        raise InputError(f"no clips under {root} (video or GIF files, or folders of frames)")
    return clips


def find_faces(root: str | os.PathLike) -> list[Path]:
    """Target faces: image files in `root`, and folders holding one image (MEGC 2021: normalized_asianFemale/);
    `root` may also be one face image."""
    root = Path(root)
    if root.is_file():
        if root.suffix.lower() not in IMAGE_EXTENSIONS:
            raise InputError(f"{root} is not a face image ({', '.join(IMAGE_EXTENSIONS)}) nor a folder of them")
        return [root]
    if not root.is_dir():
        raise InputError(f"face folder {root} does not exist")
    faces = []
    for entry in sorted(root.iterdir(), key=lambda p: natural_key(p.name)):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix.lower() in IMAGE_EXTENSIONS:
            faces.append(entry)
        elif entry.is_dir():
            images = list_frame_files(entry)
            if len(images) != 1:
                raise InputError(f"face folder {entry} holds {len(images)} images; a target face folder must hold "
                                 "exactly one (or put the face images directly in the faces folder)")
            faces.append(entry)
    if not faces:
        raise InputError(f"no face images ({', '.join(IMAGE_EXTENSIONS)}) in {root}")
    return faces


def face_image(face: Path) -> Path:
    """The image of a face `find_faces` found: the file itself, or the one image of a face folder."""
    return list_frame_files(face)[0] if face.is_dir() else face


def megc_pairs(faces_dir: str | os.PathLike, clips_dir: str | os.PathLike) -> list[Pair]:
    """Every target face x every source clip (MEGC 2021 / 2022 generation task), labelled from the clip names.

    MEGC 2021: 2 faces (normalized_westernMale, normalized_asianFemale) x 9 clips
    (Positive / Negative / Surprise, 3 each from CASME II, SAMM and SMIC-HS);
    MEGC 2022: 4 template faces. A face folder with one image is named after the folder.
    """
    clips_root = Path(os.path.abspath(clips_dir))
    faces = [Path(os.path.abspath(f)) for f in find_faces(faces_dir)]
    clips = find_clips(clips_root)
    face_file = {f: face_image(f) for f in faces}
    face_names = {str(face_file[Path(p)]): n for p, n in unique_names(map(str, faces)).items()}
    pairs = [Pair(str(face_file[f]), str(c), _label_of(c, clips_root)) for c in clips for f in faces]
    return name_pairs(pairs, face_names)


def write_pairs(pairs: Sequence[Pair], path: str | os.PathLike) -> Path:
    """Write pairs as a CSV (source, driving, label, name) that `read_pairs` reads back to the same outputs."""
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for pair in pairs:
            writer.writerow([pair.source, pair.driving, pair.label, pair.name])
    return path


# ---- settings, ranks ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings(AnimateOptions):
    """How every pair is animated (the AnimateOptions) and written; recorded in the manifest and compared on
    resume. `landmarks` and `precision` are recorded as the engine runs them."""

    format: str = "mp4"
    precision: str = "fp32"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.format not in OUTPUT_FORMATS:
            raise InputError(f"output format {self.format!r} is not supported; use one of {OUTPUT_FORMATS}")

    def animate_options(self) -> AnimateOptions:
        """The animation options alone (what Engine.animate takes)."""
        return AnimateOptions(**{name: getattr(self, name) for name in AnimateOptions.names()})

    def fingerprint(self) -> str:
        """Short hash of the settings: a finished pair counts as done only under the same one."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def init_distributed(ranks: Ranks, timeout: dt.timedelta = BARRIER_TIMEOUT) -> bool:
    """Join the torchrun process group (gloo: only the final barrier uses it); False when alone or already joined."""
    return init_process_group(ranks, "cpu", timeout)


# ---- manifest -------------------------------------------------------------------------------------


def part_path(out_dir: str | os.PathLike, rank: int) -> Path:
    return Path(out_dir) / PARTS_DIR / f"rank-{rank:05d}.jsonl"


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file; a line cut short by a killed run is skipped."""
    if not path.is_file():
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s line %d is incomplete (a killed run?); ignored", path, number)
    return records


def read_records(out_dir: str | os.PathLike) -> dict[str, dict]:
    """Key -> latest record, over the merged manifest and every rank's part."""
    out_dir = Path(out_dir)
    files = [out_dir / MANIFEST, *sorted((out_dir / PARTS_DIR).glob("rank-*.jsonl"))]
    latest: dict[str, dict] = {}
    for record in (r for f in files for r in read_jsonl(f)):
        key = record.get("key")
        if key and (key not in latest or record.get("finished", "") >= latest[key].get("finished", "")):
            latest[key] = record
    return latest


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


def merge_manifest(out_dir: str | os.PathLike) -> Path:
    """Merge every rank's part into DIR/manifest.jsonl (latest record per key, sorted by key), then drop the parts.

    Idempotent: the merged file is replaced atomically before any part is deleted.
    """
    out_dir = Path(out_dir)
    records = read_records(out_dir)
    path = out_dir / MANIFEST
    _atomic_write_text(path, "".join(json.dumps(records[k], sort_keys=True) + "\n" for k in sorted(records)))
    for part in sorted((out_dir / PARTS_DIR).glob("rank-*.jsonl")):
        part.unlink()
    for folder in (out_dir / PARTS_DIR, out_dir / PARTIAL_DIR):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return path


class ManifestPart:
    """Appends records to this rank's manifest part, one flushed and fsynced line each."""

    def __init__(self, out_dir: str | os.PathLike, rank: int):
        self.path = part_path(out_dir, rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+b")
        if self._file.tell() > 0:  # end a line cut short by a killed run, so it stays the only lost one
            self._file.seek(-1, os.SEEK_END)
            if self._file.read(1) != b"\n":
                self._file.write(b"\n")

    def write(self, record: dict) -> None:
        self._file.write((json.dumps(record, sort_keys=True) + "\n").encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "ManifestPart":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_done(record: dict | None, out_dir: Path, settings_id: str, weights_sha: str | None) -> bool:
    """A finished pair: latest record ok, its video present, same settings, and same weights when both are known."""
    if not record or record.get("status") != "ok" or record.get("settings_id") != settings_id:
        return False
    if not (out_dir / record.get("output", "")).is_file():
        return False
    previous = (record.get("weights") or {}).get("sha256")
    return previous is None or weights_sha is None or previous == weights_sha


# ---- generation -----------------------------------------------------------------------------------

# Errors that concern the variant, not the pair: once seen, the variant's other pairs fail without retrying.
VARIANT_ERRORS = ("WeightsNotFoundError", "CheckpointError", "UnknownVariantError", "ConfigError")
_SHA256_CACHE: dict[tuple[str, int, int], str] = {}


def weights_info(variant: str, checkpoint: str | os.PathLike | None = None) -> dict[str, Any]:
    """Where the variant's weights are on this machine and their sha256, without loading or downloading them.

    {"path": None, "source": "none", "sha256": None} for a training-free variant;
    "source": "unresolved" when they are not on this machine (the engine may still download them).
    """
    from .checkpoints import resolve_checkpoint, sha256_file
    from .variants import get_variant

    if not get_variant(variant).needs_weights:
        return {"path": None, "source": "none", "sha256": None}
    try:
        resolved = resolve_checkpoint(variant, checkpoint, offline=True, progress=False)
    except MefacialError:
        return {"path": None, "source": "unresolved", "sha256": None}
    stat = resolved.path.stat()
    cache_key = (str(resolved.path), stat.st_size, stat.st_mtime_ns)
    if cache_key not in _SHA256_CACHE:
        _SHA256_CACHE[cache_key] = resolved.sha256 or sha256_file(resolved.path)
    return {"path": str(resolved.path), "source": resolved.source, "sha256": _SHA256_CACHE[cache_key]}


@dataclasses.dataclass
class Summary:
    """What one rank did: pairs x variants generated, failed, and skipped as already done."""

    ok: int = 0
    failed: int = 0
    skipped: int = 0
    manifest: Path | None = None

    def describe(self) -> str:
        return f"{self.ok} generated, {self.failed} failed, {self.skipped} already done"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")


def _error_fields(exc: BaseException) -> dict[str, str]:
    return {"status": "error", "error_type": type(exc).__name__, "error": str(exc).strip() or type(exc).__name__}


def generate(pairs: Sequence[Pair], variants: Sequence[str], out_dir: str | os.PathLike, engine: Any,
             settings: Settings = Settings(), ranks: Ranks = Ranks(),
             on_item: Callable[[dict | None], None] | None = None) -> Summary:
    """Generate this rank's share of pairs x variants into `out_dir`, appending to its manifest part.

    `engine`: a mefacial Engine (explicit weights via its `checkpoints`); `on_item`
    is called after each item with its record (None for a skipped one). Every
    failure is recorded and the run goes on; returns the counts.
    """
    from .variants import get_variant
    from .video import VideoWriter

    variants = [get_variant(v).id for v in variants]  # an unknown id fails here, before any work
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / PARTIAL_DIR / f"rank-{ranks.rank:05d}"
    partial.mkdir(parents=True, exist_ok=True)
    records = read_records(out_dir)
    settings = dataclasses.replace(settings, landmarks=engine.landmarks, precision=engine.precision)  # as run
    settings_id = settings.fingerprint()
    weights = {v: weights_info(v, engine.checkpoint_overrides.get(v)) for v in variants}
    broken: dict[str, BaseException] = {}  # variant -> the error that stops all its pairs
    summary = Summary()
    context = {"rank": ranks.rank, "world": ranks.world, "host": socket.gethostname(), "device": str(engine.device)}
    options = settings.animate_options()
    prepared: dict[int, Any] = {}  # model size -> this pair's PreparedClip (or the error preparing it)

    def animate(pair: Pair, variant: str, started: float, path: Path):
        """One variant on the pair, whose inputs are read, cut and tracked once for all its variants (dense and
        dense-geometry share the face meshes, the 68-point variants the landmarks), written to `path` frame
        batch by frame batch (pasted back into a large photo, a frame is tens of MB)."""
        spec = get_variant(variant)
        options.for_variant(spec)  # a motion mode the variant lacks fails before any work
        model, _ = engine.model(spec)  # and missing weights, before any detection
        size = model.config.image_size
        if size not in prepared:
            try:
                prepared[size] = engine.prepare(pair.source, pair.driving, options, size=size)
            except Exception as exc:  # noqa: BLE001 - every variant of the pair records it
                prepared[size] = exc
        if isinstance(prepared[size], Exception):
            raise prepared[size]
        with VideoWriter(path, prepared[size].fps, settings.slowdown) as writer:
            return engine.collect(prepared[size], spec, options, started=started, sink=writer.write)

    with ManifestPart(out_dir, ranks.rank) as part:
        for pair in ranks.shard(pairs):  # a rank takes whole pairs, each prepared once for all its variants
            prepared.clear()
            for variant in variants:
                key = pair.key(variant)
                if is_done(records.get(key), out_dir, settings_id, weights[variant]["sha256"]):
                    summary.skipped += 1
                    if on_item:
                        on_item(None)
                    continue
                record: dict[str, Any] = {
                    "key": key, "variant": variant, "label": pair.label, "name": pair.name, "row": pair.row,
                    "source": pair.source, "driving": pair.driving, "output": pair.output(variant, settings.format),
                    "settings": dataclasses.asdict(settings), "settings_id": settings_id, **context,
                }
                started = time.perf_counter()
                try:
                    if pair.error:
                        raise InputError(pair.error)
                    if variant in broken:  # the variant cannot run at all: same error, no new attempt
                        raise InputError(f"{variant} cannot run: {broken[variant]}") from broken[variant]
                    final = out_dir / record["output"]
                    final.parent.mkdir(parents=True, exist_ok=True)
                    tmp = partial / final.name
                    result = animate(pair, variant, started, tmp)
                    os.replace(tmp, final)  # atomic
                    info = weights[variant]
                    if info["path"] is not None and info["path"] not in result.weights:  # e.g. an injected model
                        info = {"path": None, "source": "engine", "sha256": None}
                    record.update(status="ok", error=None, frames=result.num_frames, fps=result.fps,
                                  landmarks=result.landmark_backend, timings=result.timings,
                                  weights={**info, "description": result.weights})
                    summary.ok += 1
                except Exception as exc:  # noqa: BLE001 - any failure of one pair is recorded, the run goes on
                    if type(exc).__name__ in VARIANT_ERRORS:
                        broken[variant] = exc
                    failure = exc.__cause__ if variant in broken and exc.__cause__ is not None else exc
                    record.update(_error_fields(failure), weights=weights[variant])
                    log.warning("%s: %s: %s", key, record["error_type"], record["error"].splitlines()[0])
                    log.debug("%s failed", key, exc_info=True)
                    summary.failed += 1
                record.update(seconds=time.perf_counter() - started, finished=_now())
                part.write(record)
                if on_item:
                    on_item(record)
    for leftover in partial.glob("*"):  # an output whose write failed
        leftover.unlink()
    partial.rmdir()  # the shared .partial/ folder goes at the merge, when no rank writes any more
    return summary


def run(pairs: Sequence[Pair], variants: Sequence[str], out_dir: str | os.PathLike,
        make_engine: Callable[[str], Any], settings: Settings = Settings(), device: str = "auto",
        on_item: Callable[[dict | None], None] | None = None) -> Summary:
    """Generate on this rank (torchrun or alone), wait for every rank, and merge the manifest on rank 0.

    `make_engine(device)` builds the engine on this rank's device (cuda:LOCAL_RANK on GPUs).
    """
    ranks = Ranks.from_env()
    joined = init_distributed(ranks)
    try:
        device = ranks.device(device)
        if device.startswith("cuda"):
            import torch

            torch.cuda.set_device(torch.device(device))
        summary = generate(pairs, variants, out_dir, make_engine(device), settings, ranks, on_item)
        barrier()
        if ranks.rank == 0:
            summary.manifest = merge_manifest(out_dir)
        barrier()  # no rank exits (and no new run starts) before the merged manifest is in place
        return summary
    finally:
        if joined:
            import torch.distributed as dist

            dist.destroy_process_group()


def manifest_totals(path: str | os.PathLike) -> dict[str, int]:
    """Counts of a merged manifest by status."""
    totals: dict[str, int] = {}
    for record in read_jsonl(Path(path)):
        totals[record.get("status", "?")] = totals.get(record.get("status", "?"), 0) + 1
    return totals


# ---- datasets from action units (no driving clip) --------------------------------------------------

AU_CSV_COLUMNS = ("face", "aus", "label", "name", "onset_ms", "apex_ms", "offset_ms", "fps")
AU_LABELS = "labels.csv"
AU_FOLDER = "au"


@dataclasses.dataclass(frozen=True)
class AURow:
    """One row of an AU dataset CSV: a face, an AU specification ('4:C,7:B'), a label, and optional timing."""

    face: str
    aus: str
    label: str = UNLABELLED
    name: str = ""
    timing: Any = None  # au.Timing, or None for the run's timing
    row: int | None = None
    error: str | None = None

    def output(self, fmt: str = "mp4") -> str:
        return f"{AU_FOLDER}/{self.label}/{self.name}.{fmt}"

    def key(self) -> str:
        return f"{AU_FOLDER}/{self.label}/{self.name}"


def read_au_rows(csv_path: str | os.PathLike, timing: Any = None) -> list[AURow]:
    """Rows of an AU dataset CSV with a header naming `face` (or `source`) and `aus`, optionally `label`, `name`
    (the output stem; default <face>-<AUs>) and per-row `onset_ms`, `apex_ms`, `offset_ms`, `fps` (default: the
    run's `timing`). Relative paths resolve against the CSV's folder. A row whose specification is invalid is kept
    with its error (recorded as failed, the run goes on)."""
    from . import au

    path = Path(csv_path)
    if not path.is_file():
        raise InputError(f"AU file {path} does not exist; pass a CSV with a header 'face,aus,label'")
    timing = timing or au.Timing()
    base = Path(os.path.abspath(path)).parent
    rows: list[AURow] = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip().lower() for c in reader.fieldnames or []]
        if "aus" not in columns or not ({"face", "source"} & set(columns)):
            raise InputError(f"AU file {path}: the header must name the columns 'face' and 'aus' (and optionally "
                             f"'label', 'name', 'onset_ms', 'apex_ms', 'offset_ms', 'fps'); it has {columns or 'none'}")
        for number, raw in enumerate(reader, start=1):
            row = {(k or "").strip().lower(): (v or "").strip() if isinstance(v, str) else "" for k, v in raw.items()}
            if not any(row.values()):
                continue
            face = row.get("face") or row.get("source") or ""
            label = safe_name(row.get("label") or UNLABELLED)
            try:
                if not face or not row.get("aus"):
                    raise InputError(f"no {'face' if not face else 'AU specification'} given")
                changes = {k: float(row[k]) for k in ("onset_ms", "apex_ms", "offset_ms", "fps") if row.get(k)}
                own = dataclasses.replace(timing, **changes) if changes else timing
                specs = au.parse_aus(row["aus"], own)
                au.plan(specs, own)  # timing errors now, not mid-run
            except (InputError, ValueError) as exc:
                rows.append(AURow(face, row.get("aus", ""), label, f"row-{number}", None, number,
                                  f"{path.name} row {number}: {exc}"))
                continue
            resolved = os.path.abspath(base / Path(face).expanduser())
            stem = row.get("name") or f"{_stem(resolved)}-{au.describe(specs).replace('+', '_')}"
            rows.append(AURow(resolved, row["aus"], label, safe_name(stem), own, number))
    taken: dict[tuple[str, str], int] = {}
    named = []
    for r in rows:  # unique output names per label
        count = taken.get((r.label, r.name), 0)
        taken[(r.label, r.name)] = count + 1
        named.append(r if count == 0 else dataclasses.replace(r, name=f"{r.name}-{count + 1}"))
    return named


def au_label_columns(action_units: dict) -> dict[str, Any]:
    """One column per library AU (its intensity as a fraction of the maximum, 0 when absent; a unilateral AU is
    reported with its side in `AUk_side`), for a recogniser's data loader."""
    from . import au

    columns: dict[str, Any] = {f"AU{n}": 0.0 for n in au.SUPPORTED}
    for entry in action_units["aus"]:
        columns[f"AU{entry['au']}"] = max(columns[f"AU{entry['au']}"], entry["fraction"])
        if entry["side"]:
            columns[f"AU{entry['au']}_side"] = entry["side"]
    return columns


def generate_aus(rows: Sequence[AURow], out_dir: str | os.PathLike, engine: Any, options: Any = None,
                 fmt: str = "mp4", slowdown: float = 1.0, ranks: Ranks = Ranks(),
                 on_item: Callable[[dict | None], None] | None = None) -> Summary:
    """Synthesise this rank's share of AU rows into `out_dir/au/<label>/<name>.<fmt>`, one manifest line each
    (the spec, intensities, timing, apex frames, status); resumable as `generate` (same settings -> skipped)."""
    from .au import Timing
    from .synthesis import SynthesisOptions
    from .video import VideoWriter

    if fmt not in OUTPUT_FORMATS:
        raise InputError(f"output format {fmt!r} is not supported; use one of {OUTPUT_FORMATS}")
    options = options or SynthesisOptions()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / PARTIAL_DIR / f"rank-{ranks.rank:05d}"
    partial.mkdir(parents=True, exist_ok=True)
    records = read_records(out_dir)
    summary = Summary()
    context = {"rank": ranks.rank, "world": ranks.world, "host": socket.gethostname(), "device": str(engine.device)}
    with ManifestPart(out_dir, ranks.rank) as part:
        for row in ranks.shard(list(rows)):
            settings = {"options": dataclasses.asdict(options), "format": fmt, "slowdown": slowdown,
                        "timing": dataclasses.asdict(row.timing) if row.timing else None, "aus": row.aus}
            settings_id = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
            if is_done(records.get(row.key()), out_dir, settings_id, None):
                summary.skipped += 1
                if on_item:
                    on_item(None)
                continue
            record: dict[str, Any] = {"key": row.key(), "variant": "au", "label": row.label, "name": row.name,
                                      "row": row.row, "source": row.face, "aus": row.aus, "output": row.output(fmt),
                                      "settings": settings, "settings_id": settings_id, **context}
            started = time.perf_counter()
            try:
                if row.error:
                    raise InputError(row.error)
                final = out_dir / record["output"]
                final.parent.mkdir(parents=True, exist_ok=True)
                timing = row.timing or Timing()
                with VideoWriter(partial / final.name, timing.fps, slowdown) as writer:  # batch by batch
                    result = engine.synthesize(row.face, row.aus, timing, options, sink=writer.write)
                os.replace(writer.path, final)
                record.update(status="ok", error=None, frames=result.num_frames, fps=result.fps,
                              action_units=result.action_units, labels=au_label_columns(result.action_units),
                              timings=result.timings)
                summary.ok += 1
            except Exception as exc:  # noqa: BLE001 - one failing row is recorded, the run goes on
                record.update(_error_fields(exc))
                log.warning("%s: %s: %s", row.key(), record["error_type"], record["error"].splitlines()[0])
                summary.failed += 1
            record.update(seconds=time.perf_counter() - started, finished=_now())
            part.write(record)
            if on_item:
                on_item(record)
    for leftover in partial.glob("*"):
        leftover.unlink()
    partial.rmdir()
    return summary


def write_au_labels(out_dir: str | os.PathLike) -> Path:
    """DIR/labels.csv from the merged manifest's ok AU records: video, face, label, spec, fps, frames, the event's
    onset / apex / offset frames, then one intensity column per AU (fraction of the maximum, 0 = absent)."""
    from . import au

    out_dir = Path(out_dir)
    path = out_dir / AU_LABELS
    head = ["video", "face", "label", "spec", "fps", "frames", "onset_frame", "apex_first", "apex_last",
            "offset_frame"]
    au_columns = [f"AU{n}" for n in au.SUPPORTED]
    lines = []
    for record in sorted(read_records(out_dir).values(), key=lambda r: r["key"]):
        if record.get("variant") != "au" or record.get("status") != "ok":
            continue
        units = record["action_units"]
        apex = [a["apex_frames"] for a in units["aus"]]
        labels = record["labels"]
        sides = ";".join(f"{k[:-5]}:{v}" for k, v in sorted(labels.items()) if k.endswith("_side"))
        lines.append([record["output"], record["source"], record["label"], units["spec"], units["fps"],
                      units["frames"], units["event_frames"][0], min(a[0] for a in apex), max(a[1] for a in apex),
                      units["event_frames"][1], *[labels[c] for c in au_columns], sides])
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(head + au_columns + ["sides"])
        writer.writerows(lines)
    os.replace(tmp, path)
    return path


def run_aus(rows: Sequence[AURow], out_dir: str | os.PathLike, make_engine: Callable[[str], Any], options: Any = None,
            fmt: str = "mp4", slowdown: float = 1.0, device: str = "auto",
            on_item: Callable[[dict | None], None] | None = None) -> Summary:
    """`generate_aus` on this rank (torchrun or alone), then rank 0 merges the manifest and writes labels.csv."""
    ranks = Ranks.from_env()
    joined = init_distributed(ranks)
    try:
        summary = generate_aus(rows, out_dir, make_engine(ranks.device(device)), options, fmt, slowdown, ranks, on_item)
        barrier()
        if ranks.rank == 0:
            summary.manifest = merge_manifest(out_dir)
            write_au_labels(out_dir)
        barrier()
        return summary
    finally:
        if joined:
            import torch.distributed as dist

            dist.destroy_process_group()
