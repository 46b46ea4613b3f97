r"""Writes small image folders for the experiment commands in README.md (no download).

  python experiments/make_sample_data.py --out data/ [--size 256] [--per-kind 8]

* OUT/synthetic/<kind>/*.png: procedural images of graded complexity (alit_jax.data.synthetic;
  kinds flat < gradient < few_shapes < many_shapes < texture < noise), --per-kind each.
* OUT/photos/*.png: the natural RGB photographs bundled with scikit-image (astronaut, chelsea,
  coffee, hubble_deep_field, immunohistochemistry, retina, rocket, stereo_motorcycle), resized
  (shorter side) and center cropped to --size: a small "natural images" set, out of the
  distribution of the synthetic one.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import _common  # noqa: F401
import numpy as np
from PIL import Image

from alit_jax.data import synthetic, transforms

PHOTOS = (
  "astronaut",
  "chelsea",
  "coffee",
  "hubble_deep_field",
  "immunohistochemistry",
  "retina",
  "rocket",
  "stereo_motorcycle",
)


def write_photos(out: pathlib.Path, size: int) -> list[str]:
  """Writes the scikit-image photos that load offline; returns their names."""
  from skimage import data

  out.mkdir(parents=True, exist_ok=True)
  written = []
  for name in PHOTOS:
    try:
      img = getattr(data, name)()
    except Exception as e:  # a loader that would need the network
      print(f"skipping skimage.data.{name}: {type(e).__name__}: {e}", file=sys.stderr)
      continue
    if isinstance(img, tuple):  # stereo_motorcycle returns (left, right, disparity)
      img = img[0]
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[-1] != 3:
      continue
    pil = transforms.center_crop(transforms.resize_shorter_side(Image.fromarray(img), size), size)
    pil.save(out / f"{name}.png")
    written.append(name)
  return written


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--out", required=True)
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--per-kind", type=int, default=8)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  out = pathlib.Path(args.out)
  files = synthetic.write_image_folder(out / "synthetic", args.per_kind, args.size, seed=args.seed)
  photos = write_photos(out / "photos", args.size)
  print(
    f"wrote {len(files)} synthetic images to {out / 'synthetic'} and {len(photos)} photos "
    f"to {out / 'photos'}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
