r"""Builds an array_record TFDS dataset from a folder of images (no TensorFlow needed).

  python -m alit_jax.data.build_folder SRC --out DIR [--name NAME] [--val-fraction F] [--seed S]

Layout of SRC (searched recursively below the class level):
  * SRC/<class>/**/<image>  -> one class per first-level subfolder (sorted names -> labels 0..C-1,
    like torchvision's ImageFolder);
  * SRC/**/<image> with no subfolders -> a single class named after SRC;
  * SRC/{train,val|validation,test}/<class>/** -> those splits as given (ImageNet layout; the
    class list is the sorted union over splits, so labels agree across splits).
Without split folders everything goes to `train`, and `--val-fraction F` moves a seeded,
per-class fraction to `validation`.

Features: `image` (the file's encoded bytes as stored for RGB JPEG/PNG; other formats and
non-RGB modes are converted to RGB (16-bit scaled to 8 bits, alpha dropped) and re-encoded as
PNG), `label` (ClassLabel with the class names), `file_name` (path relative to SRC, or to the
split folder). Every image is fully decoded once; unreadable/corrupt files are skipped, and
they, non-image files and files outside class folders are listed with the reason in
`build_report.json` in the dataset folder (DIR/NAME/1.0.0/). Read it back with
`tfds.data_source(NAME, data_dir=DIR, split=...)` or
`alit_jax.data.sources.get_source("folder:DIR/NAME", split)`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import os
import pathlib
import re
import shutil
import sys

import numpy as np
from PIL import Image

from alit_jax.data.files import subdirs, walk_files
from alit_jax.images import to_rgb

DATASET_VERSION = "1.0.0"
REPORT_NAME = "build_report.json"
IMAGE_EXTENSIONS = frozenset(
  {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
_SPLIT_DIRS = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}


@dataclasses.dataclass(frozen=True)
class _Item:
  path: pathlib.Path  # absolute
  rel: str  # relative to the split root, '/'-separated
  class_name: str


@dataclasses.dataclass(frozen=True)
class _Check:
  ok: bool
  reencode: bool = False
  reason: str = ""


def _scan_split(root: pathlib.Path, single_class_name: str):
  """Returns (items, skipped, class_names) for one split folder."""
  items, skipped = [], []
  classes = subdirs(root)
  if classes:
    for f in sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")):
      skipped.append(
        {"file": f.name, "kind": "outside_class_folder", "reason": "not in a class folder"}
      )
    groups = [(c.name, c) for c in classes]
  else:
    groups = [(single_class_name, root)]
  for class_name, folder in groups:
    for f in walk_files(folder):
      rel = f.relative_to(root).as_posix()
      if f.suffix.lower() not in IMAGE_EXTENSIONS:
        skipped.append(
          {"file": rel, "kind": "not_an_image", "reason": f"extension {f.suffix or '(none)'!r}"}
        )
        continue
      items.append(_Item(f, rel, class_name))
  return items, skipped, [name for name, _ in groups]


def _check_image(path: pathlib.Path) -> _Check:
  """Fully decodes the file: `verify()` alone misses truncated JPEGs."""
  try:
    with Image.open(path) as im:
      fmt, mode = im.format, im.mode
      im.load()
      if im.width < 1 or im.height < 1:
        return _Check(False, reason="empty image")
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files.
    return _Check(False, reason=f"{type(e).__name__}: {e}")
  return _Check(True, reencode=not (fmt in ("JPEG", "PNG") and mode == "RGB"))


def _image_bytes(item: _Item, reencode: bool) -> bytes:
  if not reencode:
    return item.path.read_bytes()
  with Image.open(item.path) as im:
    rgb = to_rgb(im)
  buf = io.BytesIO()
  rgb.save(buf, format="PNG")
  return buf.getvalue()


def sanitize_name(name: str) -> str:
  """A TFDS-compatible dataset name (lower snake case, starts with a letter)."""
  name = re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_").lower()
  if not name or not name[0].isalpha():
    name = "folder_" + name
  return name


def _make_builder_cls(name: str, description: str, class_names, split_items):
  import tensorflow_datasets as tfds

  class _FolderImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "Built by alit_jax.data.build_folder."}
    # No code folder with checksums/metadata: TFDS would otherwise resolve it through
    # `importlib_resources`, which is not installed alongside tfds here.
    code_path = None

    def _info(self):
      # A plain DatasetInfo: `dataset_info_from_configs` looks for metadata next to the module.
      return tfds.core.DatasetInfo(
        builder=self,
        description=description,
        features=tfds.features.FeaturesDict(
          {
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format=None),
            "label": tfds.features.ClassLabel(names=list(class_names)),
            "file_name": tfds.features.Text(),
          }
        ),
        supervised_keys=("image", "label"),
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(items) for split, items in split_items.items()}

    def _generate_examples(self, items):
      for item, reencode in items:
        yield (
          item.rel,
          {
            "image": _image_bytes(item, reencode),
            "label": item.class_name,
            "file_name": item.rel,
          },
        )

  _FolderImages.name = name
  return _FolderImages


def build_folder_dataset(
  src: str | os.PathLike,
  out: str | os.PathLike,
  *,
  name: str | None = None,
  val_fraction: float = 0.0,
  seed: int = 0,
  num_threads: int | None = None,
  overwrite: bool = False,
  progress: bool = True,
) -> dict:
  """Builds DIR/NAME/1.0.0 (array_record TFDS dataset) from an image folder.

  Args:
    src: image folder (layouts in the module docstring).
    out: TFDS data_dir to write into.
    name: dataset name; default: the sanitized folder name of `src`.
    val_fraction: in [0, 1): per-class fraction of `train` moved to `validation` (seeded).
      Not allowed when `src` already has a validation folder.
    seed: seed of the train/validation assignment.
    num_threads: threads for decoding checks (default: min(32, cpu count + 4)).
    overwrite: replace an existing dataset of the same name and version.
    progress: show progress bars.

  Returns:
    The report (also written to DIR/NAME/1.0.0/build_report.json): dataset_dir, name,
    class_names, per-split counts, counts of skipped files by kind, and `skipped`: a list of
    {"file", "kind", "reason"} for corrupt images, non-image files and stray files.

  Raises:
    FileNotFoundError: `src` is not a folder.
    FileExistsError: the dataset exists and `overwrite` is False.
    ValueError: bad arguments, or no readable image at all.
  """
  import tensorflow_datasets as tfds
  from tqdm.auto import tqdm

  src = pathlib.Path(src).expanduser().resolve()
  out = pathlib.Path(out).expanduser().resolve()
  if not src.is_dir():
    raise FileNotFoundError(f"image folder {src} does not exist or is not a directory")
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
  name = sanitize_name(name or src.name)
  dataset_dir = out / name / DATASET_VERSION
  if dataset_dir.exists():
    if not overwrite:
      raise FileExistsError(f"{dataset_dir} already exists (pass overwrite=True / --overwrite)")
    shutil.rmtree(dataset_dir)

  # Split folders (ImageNet layout) or a single train split.
  top = subdirs(src)
  split_roots = {}
  if top and all(d.name.lower() in _SPLIT_DIRS for d in top):
    for d in top:
      split = _SPLIT_DIRS[d.name.lower()]
      if split in split_roots:
        raise ValueError(f"{src}: both {split_roots[split].name}/ and {d.name}/ map to '{split}'")
      split_roots[split] = d
    if val_fraction > 0 and "validation" in split_roots:
      raise ValueError(f"{src} has a validation folder; val_fraction must be 0")
  else:
    split_roots["train"] = src

  scanned, skipped, class_names = {}, [], set()
  for split, root in split_roots.items():
    items, sk, classes = _scan_split(root, single_class_name=src.name)
    prefix = "" if root == src else root.name + "/"
    skipped.extend({**s, "file": prefix + s["file"]} for s in sk)
    scanned[split] = (items, prefix)
    class_names.update(classes)
  class_names = sorted(class_names)

  # Decode every candidate once (threads: PIL releases the GIL while decoding).
  all_items = [(it, prefix) for items, prefix in scanned.values() for it in items]
  workers = num_threads or min(32, (os.cpu_count() or 1) + 4)
  checks = []
  bar = tqdm(total=len(all_items), desc=f"checking {src.name}", unit="img", disable=not progress)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    # Chunks bound the number of pending futures for million-image folders.
    for start in range(0, len(all_items), 4096):
      chunk = [it.path for it, _ in all_items[start : start + 4096]]
      checks.extend(pool.map(_check_image, chunk))
      bar.update(len(chunk))
  bar.close()
  good = {split: [] for split in scanned}
  reencoded = []
  i = 0
  for split, (items, prefix) in scanned.items():
    for it in items:
      chk = checks[i]
      i += 1
      if chk.ok:
        good[split].append((it, chk.reencode))
        if chk.reencode:
          reencoded.append(prefix + it.rel)
      else:
        skipped.append({"file": prefix + it.rel, "kind": "corrupt", "reason": chk.reason})

  if val_fraction > 0:
    rng = np.random.default_rng(seed)
    train, val = [], []
    by_class = {c: [] for c in class_names}
    for g in good["train"]:
      by_class[g[0].class_name].append(g)
    for c in class_names:
      members = by_class[c]
      n_val = int(round(val_fraction * len(members)))
      order = rng.permutation(len(members))
      val.extend(members[j] for j in sorted(order[:n_val]))
      train.extend(members[j] for j in sorted(order[n_val:]))
    good = {"train": train, "validation": val}

  good = {split: items for split, items in good.items() if items}
  if not good:
    raise ValueError(f"no readable images found in {src} ({len(skipped)} files skipped)")

  if not progress:
    tfds.disable_progress_bar()
  description = f"Images from {src} (alit_jax.data.build_folder)."
  builder_cls = _make_builder_cls(name, description, class_names, good)
  builder = builder_cls(data_dir=str(out), file_format="array_record")
  builder.download_and_prepare()

  kinds = ("corrupt", "not_an_image", "outside_class_folder")
  report = {
    "name": name,
    "dataset_dir": str(dataset_dir),
    "source": str(src),
    "class_names": class_names,
    "num_classes": len(class_names),
    "splits": {split: len(items) for split, items in good.items()},
    "num_images": sum(len(items) for items in good.values()),
    "num_skipped": {k: sum(s["kind"] == k for s in skipped) for k in kinds},
    "num_reencoded": len(reencoded),
    "val_fraction": val_fraction,
    "seed": seed,
    "skipped": skipped,
    "reencoded": reencoded,
  }
  (dataset_dir / REPORT_NAME).write_text(json.dumps(report, indent=2))
  return report


def main(argv=None) -> int:
  import argparse

  p = argparse.ArgumentParser(
    prog="python -m alit_jax.data.build_folder",
    description="Build an array_record TFDS dataset from a folder of images.",
  )
  p.add_argument("src", help="image folder (class subfolders, or train/val split folders)")
  p.add_argument("--out", required=True, help="TFDS data_dir to write DIR/NAME/1.0.0 into")
  p.add_argument("--name", default=None, help="dataset name (default: folder name)")
  p.add_argument("--val-fraction", type=float, default=0.0, help="per-class validation fraction")
  p.add_argument("--seed", type=int, default=0, help="seed of the validation assignment")
  p.add_argument("--num-threads", type=int, default=None, help="decoding threads")
  p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  args = p.parse_args(argv)
  try:
    report = build_folder_dataset(
      args.src,
      args.out,
      name=args.name,
      val_fraction=args.val_fraction,
      seed=args.seed,
      num_threads=args.num_threads,
      overwrite=args.overwrite,
      progress=not args.no_progress,
    )
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  sk = report["num_skipped"]
  splits = ", ".join(f"{k}={v}" for k, v in report["splits"].items())
  print(f"dataset {report['name']} -> {report['dataset_dir']}")
  print(f"  classes: {report['num_classes']}, images: {report['num_images']} ({splits})")
  print(
    f"  skipped: {sk['corrupt']} corrupt, {sk['not_an_image']} non-image, "
    f"{sk['outside_class_folder']} outside class folders; re-encoded: {report['num_reencoded']}"
  )
  for s in report["skipped"][:20]:
    print(f"    {s['kind']}: {s['file']} ({s['reason']})")
  if len(report["skipped"]) > 20:
    print(f"    ... {len(report['skipped']) - 20} more in {REPORT_NAME}")
  print(f"  report: {pathlib.Path(report['dataset_dir']) / REPORT_NAME}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
