"""Print the position-derived vertex sets of `mefacial.mesh` (FOREHEAD, CHEEKS, JAW) from a frontal face.

    python scripts/mesh_regions.py [face.png]

The face mesh's topology is fixed, so these index sets are constants; this script shows how they were chosen
(default face: scikit-image's astronaut portrait, frontal): in units of the inter-ocular distance, with the
origin between the eyes, the forehead lies above the brows' mean height, the cheeks between the lower lids and the mouth
corners outside the nose, the jaw below the mouth corners.
"""

from __future__ import annotations

import sys

import numpy as np


def regions(points: np.ndarray) -> dict[str, list[int]]:
    from mefacial import mesh

    p = points[:mesh.NUM_MESH].astype(np.float64)
    centre = (p[33] + p[263]) / 2
    axis = p[263] - p[33]
    iod = np.linalg.norm(axis)
    c, s = axis / iod
    local = (p - centre) @ np.array([[c, -s], [s, c]]) / iod  # x to the image's right, y down, eye line level
    x, y = local[:, 0], local[:, 1]
    taken = set(mesh.LIPS) | set(mesh.NOSE) | set(mesh.REGIONS["eyes"]) | set(mesh.REGIONS["lids"]) | \
        set(mesh.REGIONS["brows"])
    brows = y[list(mesh.REGIONS["brows"])].mean()
    lower_lid = y[list(mesh.REGIONS["lower_lids"])].max()
    mouth = y[[61, 291]].mean()
    nose_half = np.abs(x[[64, 294]]).max()
    free = np.array([i not in taken for i in range(len(p))])
    return {
        "FOREHEAD": np.flatnonzero(free & (y < brows)).tolist(),
        "CHEEKS": np.flatnonzero(free & (y > lower_lid) & (y < mouth) & (np.abs(x) > nose_half)).tolist(),
        "JAW": np.flatnonzero(free & (y > mouth + 0.05)).tolist(),
    }


def main() -> None:
    from mefacial.mesh import detect_mesh

    if len(sys.argv) > 1:
        from mefacial.video import read_image

        image = read_image(sys.argv[1])
    else:
        from skimage.data import astronaut

        image = astronaut()
    for name, indices in regions(detect_mesh(image, role="source")[0]).items():
        print(f"{name} = {tuple(indices)}  # {len(indices)}")


if __name__ == "__main__":
    main()
