"""The GPU check's pieces on the CPU: the bench without a landmark detector (synthetic landmarks, labelled),
and the merged report and its summary. The GPU run itself: scripts/gpu_check.sh (README, Performance)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from mefacial import bench, landmarks

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402


def test_synthetic_landmarks_are_a_face_layout_moved_with_the_sway():
    points = bench.synthetic_landmarks(256)[0]  # 68 x 2
    assert points.shape == (68, 2) and (points > 0).all() and (points < 256).all()
    eyes, mouth, jaw = points[36:48], points[48:68], points[0:17]
    assert eyes[:, 1].mean() < points[30, 1] < mouth[:, 1].mean() < jaw[8, 1]  # eyes above nose tip above mouth above chin
    assert points[36, 0] < points[39, 0] < points[42, 0] < points[45, 0]  # left eye, then right eye
    inputs = bench.bench_inputs(256, 6, None, bench.SYNTHETIC)
    assert inputs.driving.shape == (6, 256, 256, 3) and inputs.driving_points.shape == (6, 68, 2)
    moved = np.abs(inputs.driving_points - inputs.source_points).max()
    assert 0 < moved < 2 * bench.SWAY_PX + 1  # the sway's size
    assert "synthetic landmarks" in inputs.origin


def test_bench_with_synthetic_landmarks_needs_no_detector(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a landmark detector was asked for")

    monkeypatch.setattr(bench, "get_detector", refuse)
    monkeypatch.setattr(landmarks, "get_detector", refuse)
    report = bench.run(["warp"], frames=2, batch_size=2, precisions=["fp32"], device="cpu", repeats=1,
                       landmarks=bench.SYNTHETIC)
    assert report["settings"]["landmarks"] == "synthetic (not timed)"
    assert "synthetic landmarks" in report["settings"]["inputs"]
    assert all(row["ms_per_frame"]["landmarks"] == 0 for row in report["rows"])
    assert "landmarks synthetic (not timed)" in bench.format_table(report)


def test_merge_and_summary(tmp_path):
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "env.json").write_text(json.dumps({"gpu": "NVIDIA H200", "gpu_count": 1, "torch": "2.11"}))
    report = bench.run(["warp"], frames=2, batch_size=1, precisions=["fp32"], device="cpu", repeats=1,
                       landmarks=bench.SYNTHETIC)
    (parts / "bench-bs1.json").write_text(json.dumps(report))
    (parts / "broken.json").write_text("{")
    merged = gpu_check.merge(parts)
    assert set(merged) == {"env", "bench-bs1", "broken"} and "error" in merged["broken"]
    summary = gpu_check.summary_markdown(merged)
    assert "NVIDIA H200" in summary and "| warp | 1 | fp32 | fast |" in summary


@pytest.mark.slow
def test_fusion_and_compile_parts_run_on_the_cpu(tmp_path):
    out = tmp_path / "fusion.json"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "fusion", "--device", "cpu",
                          "--variants", "warp", "--frames", "2", "--batch-size", "2", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    cases = json.loads(out.read_text())["cases"]
    assert [c["precision"] for c in cases] == ["fp32", "bf16"]  # fp16: not on a CPU
    assert cases[0]["fused_vs_unfused_same_precision"]["max_abs_diff"] == 0 and all(c["finite"] for c in cases)


ABSENT_ON_GPU_BOX = ("cv2", "dlib", "face_alignment", "gradio", "imageio_ffmpeg", "face_recognition_models",
                     "ai_edge_litert", "mediapipe", "spaces", "psutil")


def test_engine_bench_and_reference_tests_import_without_the_packages_the_gpu_box_lacks():
    """scripts/gpu_check.sh runs where none of these is installed: `import mefacial`, the bench and the
    reference tests' modules must not need them at import."""
    code = ("import importlib.abc, sys\n"
            f"ABSENT = {ABSENT_ON_GPU_BOX!r}\n"
            "class Absent(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ABSENT:\n"
            "            raise ModuleNotFoundError(name, name=name)\n"
            "sys.meta_path.insert(0, Absent())\n"
            "sys.path[:0] = ['tests', 'benchmarks']\n"
            "import mefacial, mefacial.bench, mefacial.checkpoints, gpu_check, test_fomm_reference, test_mraa_reference\n"
            "print('ok')")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
