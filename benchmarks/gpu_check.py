"""Parts of the one-shot GPU check (`scripts/gpu_check.sh`) that are not a test or a `python -m mefacial` command.

    python benchmarks/gpu_check.py env      --out parts/env.json           # versions, GPU, cuDNN, bf16
    python benchmarks/gpu_check.py fusion   --out parts/fusion.json        # fused vs unfused, fp32/bf16/fp16
    python benchmarks/gpu_check.py compile  --out parts/compile.json       # torch.compile, fomm-awp bf16 batch 64
    python benchmarks/gpu_check.py variants                                # ids of the training-free generators
    python benchmarks/gpu_check.py merge parts/ --out gpu_check.json --md summary.md

Every measuring part uses the published full-size configs with seeded random weights (`bench.random_model`)
and the bench's synthetic clip and landmarks (no detector, no downloads). Each part writes its JSON even when
one of its cases fails (the error is recorded in the case), so the merged report says what ran.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mefacial import bench  # noqa: E402
from mefacial.engine import Engine, check_precision  # noqa: E402
from mefacial.errors import InputError  # noqa: E402
from mefacial.variants import get_variant, list_variants  # noqa: E402

PRECISIONS = ("fp32", "bf16", "fp16")


def device_of(name: str) -> torch.device:
    device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)
    if device.type == "cuda":  # float32 is float32 here: the comparisons are against unfused fp32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return device


def error_of(exc: BaseException) -> dict[str, str]:
    return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
            "traceback": traceback.format_exc(limit=6)[-2000:]}


def write(out: Path | None, data: Any) -> None:
    text = json.dumps(data, indent=2, default=str)
    if out is None:
        print(text)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")


# ---- env --------------------------------------------------------------------------------------------

def env_report() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "torch": torch.__version__, "cuda_build": torch.version.cuda,
                            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                            "cuda_available": torch.cuda.is_available()}
    for module in ("torchvision", "numpy", "scipy", "skimage", "imageio", "safetensors", "huggingface_hub", "yaml"):
        try:
            info[module] = __import__(module).__version__
        except Exception as exc:  # noqa: BLE001 - report, do not stop
            info[module] = f"not importable ({type(exc).__name__})"
    for optional in ("dlib", "face_alignment", "gradio", "imageio_ffmpeg", "spaces"):
        try:
            __import__(optional)
            info[f"has_{optional}"] = True
        except Exception:  # noqa: BLE001
            info[f"has_{optional}"] = False
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(), capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count,
                    bf16=torch.cuda.is_bf16_supported())
    return info


# ---- fused vs unfused -----------------------------------------------------------------------------------

def compare(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    return {"max_abs_diff": float((a.float() - b.float()).abs().max()), "psnr_db": bench.psnr(a, b)}


def fusion_report(device: torch.device, variants: list[str], frames: int, batch_size: int,
                  save: Callable[[dict], None] = lambda report: None) -> dict[str, Any]:
    """For each variant and precision: the fused and the unfused networks through the engine's batched path,
    against each other and against unfused fp32 (the layers as trained, in full precision)."""
    precisions = [p for p in PRECISIONS if _supported(p, device)]
    size = get_variant(variants[0]).config.image_size
    inputs = bench.bench_inputs(size, frames, None, bench.SYNTHETIC)
    report: dict[str, Any] = {"device": str(device), "frames": frames, "batch_size": batch_size,
                              "inputs": inputs.origin, "precisions": precisions, "cases": []}
    for variant in variants:
        spec = get_variant(variant)
        try:
            base = bench.random_model(spec.config, seed=0)
            outputs: dict[tuple[bool, str], torch.Tensor] = {}
            for fused in (False, True):
                for precision in precisions:
                    engine = Engine(device=device, precision=precision, batch_size=batch_size, fuse=fused)
                    model = engine.use_model(spec.id, _copy(base))
                    outputs[(fused, precision)], _ = bench.fast_path(engine, spec, model, inputs, batch_size,
                                                                     spec.adapt_scale_default)
            reference = outputs[(False, "fp32")]
            for precision in precisions:
                report["cases"].append({
                    "variant": variant, "precision": precision,
                    "fused_vs_unfused_same_precision": compare(outputs[(True, precision)], outputs[(False, precision)]),
                    "fused_vs_unfused_fp32": compare(outputs[(True, precision)], reference),
                    "unfused_vs_unfused_fp32": compare(outputs[(False, precision)], reference),
                    "finite": bool(torch.isfinite(outputs[(True, precision)]).all()),
                })
        except Exception as exc:  # noqa: BLE001 - one variant's failure is recorded, the others still run
            report["cases"].append({"variant": variant, **error_of(exc)})
        print(json.dumps([c for c in report["cases"] if c["variant"] == variant], default=str), flush=True)
        save(report)  # what is done so far survives a timeout
    return report


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)


def _supported(precision: str, device: torch.device) -> bool:
    try:
        check_precision(precision, device)
        return True
    except InputError:
        return False


# ---- torch.compile --------------------------------------------------------------------------------------

def compile_report(device: torch.device, variant: str, precision: str, batch_size: int, frames: int,
                   repeats: int, save: Callable[[dict], None] = lambda report: None) -> dict[str, Any]:
    """Eager against `torch.compile` (the engine's `compile=True`) on the batched path: the first call's
    seconds (compilation), then the median frames per second of `repeats` runs, and the output difference."""
    spec = get_variant(variant)
    inputs = bench.bench_inputs(spec.config.image_size, frames, None, bench.SYNTHETIC)
    base = bench.random_model(spec.config, seed=0)
    report: dict[str, Any] = {"device": str(device), "variant": variant, "precision": precision,
                              "batch_size": batch_size, "frames": frames, "runs": {}}
    outputs = {}
    for mode in ("eager", "compiled"):
        try:
            engine = Engine(device=device, precision=precision, batch_size=batch_size, compile=mode == "compiled")
            model = engine.use_model(spec.id, _copy(base))
            run = lambda: bench.fast_path(engine, spec, model, inputs, batch_size,  # noqa: E731
                                          spec.adapt_scale_default)
            started = time.perf_counter()
            run()
            first = time.perf_counter() - started
            times = []
            for _ in range(repeats):
                outputs[mode], seconds = run()
                times.append(seconds["networks"])
            median = sorted(times)[len(times) // 2]
            report["runs"][mode] = {"first_call_s": first, "networks_s": times, "fps": frames / median}
        except Exception as exc:  # noqa: BLE001
            report["runs"][mode] = error_of(exc)
        print(json.dumps({mode: report["runs"][mode]}, default=str), flush=True)
        save(report)
    if len(outputs) == 2:
        report["compiled_vs_eager"] = compare(outputs["compiled"], outputs["eager"])
        report["speedup"] = report["runs"]["compiled"]["fps"] / report["runs"]["eager"]["fps"]
    return report


# ---- merge ----------------------------------------------------------------------------------------------

def merge(parts: Path) -> dict[str, Any]:
    """Every part's JSON under `parts` (bench reports included), keyed by file stem."""
    merged: dict[str, Any] = {}
    for path in sorted(parts.glob("*.json")):
        try:
            merged[path.stem] = json.loads(path.read_text())
        except ValueError as exc:
            merged[path.stem] = {"error": f"unreadable JSON: {exc}"}
    return merged


def summary_markdown(merged: dict[str, Any]) -> str:
    """The figures the README wants: bench fps and memory per batch size, fused vs unfused, compile."""
    lines = []
    env = merged.get("env", {})
    lines.append(f"GPU: {env.get('gpu', '?')} (x{env.get('gpu_count', '?')}), torch {env.get('torch')}, "
                 f"CUDA {env.get('cuda_build')}, cuDNN {env.get('cudnn')}")
    status = merged.get("status", {})
    if status:  # exit status of each part: 0 ok, 124 timed out, 127 not available
        words = {0: "ok", 124: "TIMED OUT", 127: "not run"}
        lines.append("Parts: " + ", ".join(f"{name} {words.get(rc, f'FAILED ({rc})')}" for name, rc in status.items()))
    bench_parts = {k: v for k, v in merged.items() if k.startswith("bench-") and "rows" in v}
    if bench_parts:
        lines += ["", "| variant | batch | precision | path | networks fps | end-to-end fps | peak MiB | max abs diff vs loop "
                  "| PSNR vs fp32 dB |", "|---|--:|---|---|--:|--:|--:|--:|--:|"]
        for name, report in sorted(bench_parts.items(), key=lambda kv: int(kv[0].split("bs")[-1] or 0)):
            batch = report["settings"]["batch_size"]
            for row in report["rows"]:
                diff = row.get("max_abs_diff_vs_loop")
                psnr = row.get("psnr_vs_fp32_db")
                lines.append(f"| {row['variant']} | {batch} | {row['precision']} | {row['path']} | "
                             f"{row['networks_fps']:.1f} | {row['fps']:.1f} | {row['peak_memory_mib']:.0f} | "
                             f"{'-' if diff is None else f'{diff:.1e}'} | "
                             f"{'-' if psnr is None or math.isinf(psnr) else f'{psnr:.1f}'} |")
    fusion = merged.get("fusion", {})
    if fusion.get("cases"):
        lines += ["", "| variant | precision | fused vs unfused (same precision) | fused vs unfused fp32 | PSNR dB |",
                  "|---|---|--:|--:|--:|"]
        for case in fusion["cases"]:
            if "error" in case:
                lines.append(f"| {case['variant']} | - | {case['error']} | | |")
                continue
            same, ref = case["fused_vs_unfused_same_precision"], case["fused_vs_unfused_fp32"]
            lines.append(f"| {case['variant']} | {case['precision']} | {same['max_abs_diff']:.1e} | "
                         f"{ref['max_abs_diff']:.1e} | {ref['psnr_db']:.1f} |")
    compiled = merged.get("compile", {})
    if compiled.get("runs"):
        lines += ["", f"torch.compile {compiled['variant']} {compiled['precision']} batch {compiled['batch_size']}: "
                  + ", ".join(f"{mode}: " + (f"{r['fps']:.1f} fps (first call {r['first_call_s']:.1f} s)" if "fps" in r
                                             else r.get("error", "?")) for mode, r in compiled["runs"].items())
                  + (f"; speed-up {compiled['speedup']:.2f}x, max abs diff {compiled['compiled_vs_eager']['max_abs_diff']:.1e}"
                     if "speedup" in compiled else "")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("env", "fusion", "compile"):
        p = sub.add_parser(name)
        p.add_argument("--out", type=Path)
        p.add_argument("--device", default="auto")
    sub.choices["fusion"].add_argument("--variants", nargs="+", default=["fomm-none", "fomm-awp", "mraa-none", "mraa-awp"])
    sub.choices["fusion"].add_argument("--frames", type=int, default=16)
    sub.choices["fusion"].add_argument("--batch-size", type=int, default=8)
    sub.choices["compile"].add_argument("--variant", default="fomm-awp")
    sub.choices["compile"].add_argument("--precision", default="bf16")
    sub.choices["compile"].add_argument("--batch-size", type=int, default=64)
    sub.choices["compile"].add_argument("--frames", type=int, default=128)
    sub.choices["compile"].add_argument("--repeats", type=int, default=3)
    sub.add_parser("variants", help="print the ids of the training-free generators")
    mg = sub.add_parser("merge")
    mg.add_argument("parts", type=Path)
    mg.add_argument("--out", type=Path, required=True)
    mg.add_argument("--md", type=Path)
    args = parser.parse_args(argv)

    if args.command == "variants":  # those the bench can feed synthetic 68-point landmarks (no detector, no OpenCV)
        free = [get_variant(v["id"]) for v in list_variants() if not v["needs_weights"]]
        left_out = [v.id for v in free if v.spec.points != "landmarks"]
        if left_out:
            print(f"left out of the GPU bench: {', '.join(left_out)} (they consume a face mesh from MediaPipe + "
                  "OpenCV on the CPU, not synthetic landmarks)", file=sys.stderr)
        print(" ".join(v.id for v in free if v.spec.points == "landmarks"))
        return 0
    if args.command == "merge":
        merged = merge(args.parts)
        write(args.out, merged)
        if args.md is not None:
            args.md.write_text(summary_markdown(merged))
            print(args.md.read_text())
        return 0
    device = device_of(args.device)
    if args.command == "env":
        write(args.out, env_report())
    elif args.command == "fusion":
        write(args.out, fusion_report(device, args.variants, args.frames, args.batch_size,
                                      save=lambda report: write(args.out, report)))
    elif args.command == "compile":
        precision = args.precision if _supported(args.precision, device) else "fp32"
        write(args.out, compile_report(device, args.variant, precision, args.batch_size, args.frames, args.repeats,
                                       save=lambda report: write(args.out, report)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
