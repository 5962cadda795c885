"""Image strips of the action-unit library for the README: every single AU at its apex, and the presets.

    python scripts/au_strips.py [FACE ...] --out docs/au       # default faces: examples/astronaut.png

One tile per AU (intensity E, the apex frame of a 30 ms onset at 100 fps; magnify 1 unless --magnify), the
neutral face first, labelled; then the emotion presets of `mefacial.au.PRESETS`. Written as JPEG (small).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mefacial import Engine, au  # noqa: E402

TILE = 160


def tile(frame: np.ndarray, label: str) -> np.ndarray:
    image = Image.fromarray(frame).resize((TILE, TILE), Image.LANCZOS)
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, TILE - 14, TILE, TILE], fill=(0, 0, 0))
    draw.text((3, TILE - 13), label, fill=(255, 255, 255))
    return np.asarray(image)


def grid(tiles: list[np.ndarray], columns: int) -> np.ndarray:
    blank = np.full_like(tiles[0], 255)
    tiles = tiles + [blank] * (-len(tiles) % columns)
    return np.concatenate([np.concatenate(tiles[i:i + columns], 1) for i in range(0, len(tiles), columns)], 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("faces", nargs="*", default=["examples/astronaut.png"])
    parser.add_argument("--out", default="docs/au")
    parser.add_argument("--magnify", type=float, default=1.0)
    args = parser.parse_args()
    engine = Engine(device="cpu", landmarks="dlib")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timing = au.Timing(onset_ms=30, apex_ms=10, offset_ms=30, fps=100)
    for face in args.faces:
        name = Path(face).stem
        tiles, presets = [], []
        for number in au.SUPPORTED:
            result = engine.synthesize(face, f"{number}:E", timing, magnify=args.magnify)
            if not tiles:
                tiles.append(tile(result.frames[0], "neutral"))
            tiles.append(tile(result.frames[result.action_units["aus"][0]["apex_frames"][0]],
                              f"AU{number} {au.AUS[number].name}"))
        for preset, (spec, _) in au.PRESETS.items():
            result = engine.synthesize(face, spec, timing, magnify=args.magnify)
            apex = max(a["apex_frames"][0] for a in result.action_units["aus"])
            presets.append(tile(result.frames[apex], f"{preset} {spec.replace(',', '+')}"[:26]))
        Image.fromarray(grid(tiles, 10)).save(out / f"aus-{name}.jpg", quality=88)
        Image.fromarray(grid([tiles[0], *presets], 10)).save(out / f"presets-{name}.jpg", quality=88)
        print(f"{out}/aus-{name}.jpg, {out}/presets-{name}.jpg")


if __name__ == "__main__":
    main()
