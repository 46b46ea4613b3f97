"""Random-access image sources for the grain pipeline (TFDS array_record, no TensorFlow).

`get_source(spec, split, data_dir)` returns a picklable sequence (`len`, `[i]`) whose records are
dicts {"image": encoded bytes or (H, W, 3) uint8, "label": int, "file_name": str, ...}, plus the
attributes `label_names` and `num_classes`. Images stay encoded until a grain worker decodes them
(`transforms.DecodeImage`), so a corrupt record costs one skipped example, not a crash.

Specs:
  imagenet2012            TFDS `imagenet2012` prepared in array_record format under data_dir.
  imagenet100             imagenet2012 restricted to the 100 classes of the reference's
                          run_scripts/create_imagenet100.py, labels 0..99 in sorted-wnid order
                          (ImageFolder order over the symlinked folders). Option `base=SPEC` reads
                          another source with wnid class names, e.g. `base="folder:DIR/imagenet"`.
  folder:PATH             a dataset built by `python -m alit_jax.data.build_folder` (PATH = its
                          data_dir, its NAME folder or its version folder); `folder` alone uses
                          data_dir as PATH.
  demo[:k=v,...]          offline demo-model data: photo crops + procedural images (`demo_data.py`)
  synthetic[:k=v,...]     procedural images (`synthetic.py`); options num_examples, image_size,
                          seed. The validation/test splits use different seeds than train.
  NAME                    any other TFDS dataset prepared as array_record in data_dir (with an
                          `image` feature and optionally a `label` ClassLabel).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile

import numpy as np
from absl import logging

from alit_jax.data import synthetic as synthetic_lib

# The ImageNet-100 class list (100 wnids) of the reference's run_scripts/create_imagenet100.py.
IMAGENET100_WNIDS = (
  "n01558993 n02085620 n02106550 n02259212 n03032252 n03764736 n04099969 n04589890 "
  "n01692333 n02086240 n02107142 n02326432 n03062245 n03775546 n04111531 n04592741 "
  "n01729322 n02086910 n02108089 n02396427 n03085013 n03777754 n04127249 n07714571 "
  "n01735189 n02087046 n02109047 n02483362 n03259280 n03785016 n04136333 n07715103 "
  "n01749939 n02089867 n02113799 n02488291 n03379051 n03787032 n04229816 n07753275 "
  "n01773797 n02089973 n02113978 n02701002 n03424325 n03794056 n04238763 n07831146 "
  "n01820546 n02090622 n02114855 n02788148 n03492542 n03837869 n04336792 n07836838 "
  "n01855672 n02091831 n02116738 n02804414 n03494278 n03891251 n04418357 n13037406 "
  "n01978455 n02093428 n02119022 n02859443 n03530642 n03903868 n04429376 n13040303 "
  "n01980166 n02099849 n02123045 n02869837 n03584829 n03930630 n04435653 "
  "n01983481 n02100583 n02138441 n02877765 n03594734 n03947888 n04485082 "
  "n02009229 n02104029 n02172182 n02974003 n03637318 n04026417 n04493381 "
  "n02018207 n02105505 n02231487 n03017168 n03642806 n04067472 n04517823"
).split()
assert len(IMAGENET100_WNIDS) == len(set(IMAGENET100_WNIDS)) == 100

_SPLIT_ALIASES = {"val": "validation", "eval": "validation"}

_IMAGENET_HELP = """\
To prepare ImageNet-2012 (once):
  * with TensorFlow installed (TFDS's imagenet2012 builder needs it to fix a few JPEGs):
      pip install tensorflow-cpu
      tfds build imagenet2012 --data_dir={data_dir} --manual_dir=/path/with/tars \\
        --file_format=array_record
    (manual_dir holds ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar);
  * or without TensorFlow, from extracted train/<wnid>/*.JPEG and val/<wnid>/*.JPEG folders:
      python -m alit_jax.data.build_folder /path/to/imagenet --out {data_dir} --name imagenet_folder
    and use the spec 'folder:{data_dir}/imagenet_folder' (for ImageNet-100:
    get_source('imagenet100', ..., base='folder:{data_dir}/imagenet_folder'))."""


def default_data_dir() -> str:
  """TFDS's default data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)."""
  return os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def canonical_split(split: str) -> str:
  """'val'/'eval' -> 'validation' (TFDS naming); other names (and slices) unchanged."""
  base, sep, rest = split.partition("[")
  return _SPLIT_ALIASES.get(base, base) + sep + rest


# ------------------------------------------------------------------------------------------------
# TFDS-backed sources


def _version_key(p: pathlib.Path):
  try:
    return tuple(int(x) for x in p.name.split("."))
  except ValueError:
    return (-1,)


def find_dataset_dir(path: str | os.PathLike, name: str | None = None) -> pathlib.Path | None:
  """Locates a prepared TFDS dataset folder (the one with dataset_info.json).

  Accepts the version folder itself, a NAME folder holding versions (highest wins), or a
  data_dir holding NAME/ (`name` given) or exactly one dataset. Returns None if not found.
  """
  path = pathlib.Path(path).expanduser()
  if name is not None:
    path = path / name
  if (path / "dataset_info.json").is_file():
    return path
  if not path.is_dir():
    return None
  versions = sorted(
    (p for p in path.iterdir() if (p / "dataset_info.json").is_file()), key=_version_key
  )
  if versions:
    return versions[-1]
  if name is None:
    found = [d for d in (find_dataset_dir(p) for p in path.iterdir() if p.is_dir()) if d]
    if len(found) == 1:
      return found[0]
  return None


class TfdsImageSource:
  """A split of a prepared TFDS image dataset, images left encoded.

  Attributes:
    dataset_dir: the dataset's version folder.
    split: the TFDS split string.
    label_names: class names (empty if the dataset has no `label` ClassLabel).
  """

  def __init__(self, dataset_dir: str | os.PathLike, split: str = "train"):
    import tensorflow_datasets as tfds

    self.dataset_dir = pathlib.Path(dataset_dir)
    self.split = canonical_split(split)
    builder = tfds.builder_from_directory(str(self.dataset_dir))
    info = builder.info
    self.name = builder.name
    fmt = getattr(info, "file_format", None)
    fmt = str(getattr(fmt, "value", fmt) or "")
    if fmt != "array_record":
      raise ValueError(
        f"{self.dataset_dir}: dataset is stored as {fmt or 'an unknown format'}; random access "
        "needs array_record. Re-prepare it with `--file_format=array_record` or convert it "
        "with `tfds convert_format` (needs TensorFlow)."
      )
    features = info.features
    if "image" not in features:
      raise ValueError(f"{self.dataset_dir}: dataset has no 'image' feature ({list(features)})")
    available = list(info.splits.keys())
    base_split = self.split.partition("[")[0]
    if base_split not in available:
      raise ValueError(
        f"{self.dataset_dir}: no split {base_split!r}; available splits: {available}"
      )
    label = features["label"] if "label" in features else None
    self.label_names = tuple(label.names) if label is not None else ()
    self._has_file_name = "file_name" in features
    self._source = builder.as_data_source(
      self.split, decoders={"image": tfds.decode.SkipDecoding()}
    )

  @property
  def num_classes(self) -> int:
    return len(self.label_names)

  def __len__(self) -> int:
    return len(self._source)

  def _convert(self, r: dict) -> dict:
    rec = {"image": r["image"], "label": int(r["label"]) if "label" in r else -1}
    if self._has_file_name:
      fn = r["file_name"]
      rec["file_name"] = fn.decode("utf-8", "replace") if isinstance(fn, bytes) else str(fn)
    else:
      rec["file_name"] = ""
    return rec

  def __getitem__(self, index: int) -> dict:
    return self._convert(self._source[int(index)])

  def labels(self, chunk: int = 1024, progress: bool = False) -> np.ndarray:
    """All labels, (N,) int64, read in chunks (parses every record once)."""
    from tqdm.auto import tqdm

    n = len(self)
    out = np.empty((n,), np.int64)
    for start in tqdm(
      range(0, n, chunk), desc=f"reading labels of {self.name}/{self.split}", disable=not progress
    ):
      keys = list(range(start, min(n, start + chunk)))
      for k, r in zip(keys, self._source.__getitems__(keys)):
        out[k] = int(r["label"])
    return out

  def cache_key(self) -> str:
    # dataset_info.json is rewritten by every (re)build, so its mtime invalidates stale caches.
    stamp = (self.dataset_dir / "dataset_info.json").stat().st_mtime_ns
    return f"{self.dataset_dir.resolve()}|{stamp}|{self.split}|{len(self)}"

  def __repr__(self) -> str:
    return f"TfdsImageSource({str(self.dataset_dir)!r}, split={self.split!r}, n={len(self)})"


class SubsetSource:
  """`base` restricted to `indices`, labels remapped through `label_map` (old -> new)."""

  def __init__(self, base, indices: np.ndarray, label_map: dict[int, int], label_names):
    self.base = base
    self.indices = np.asarray(indices, np.int64)
    self.label_map = dict(label_map)
    self.label_names = tuple(label_names)

  @property
  def num_classes(self) -> int:
    return len(self.label_names)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> dict:
    rec = dict(self.base[int(self.indices[int(index)])])
    rec["label"] = self.label_map[int(rec["label"])]
    return rec

  def __repr__(self) -> str:
    return f"SubsetSource({self.base!r}, n={len(self)}, classes={self.num_classes})"


def _cache_file(base, names) -> pathlib.Path | None:
  key_fn = getattr(base, "cache_key", None)
  if key_fn is None:
    return None
  h = hashlib.sha1(json.dumps([key_fn(), list(names)]).encode()).hexdigest()[:16]
  split = getattr(base, "split", "split").replace("[", "_").replace("]", "").replace(":", "-")
  fname = f"alit_subset_{split}_{h}.npy"
  dirs = []
  if getattr(base, "dataset_dir", None) is not None:
    dirs.append(pathlib.Path(base.dataset_dir))
  dirs.append(pathlib.Path(os.path.expanduser("~/.cache/alit_jax/subsets")))
  for d in dirs:
    if (d / fname).is_file():
      return d / fname
  for d in dirs:
    try:
      d.mkdir(parents=True, exist_ok=True)
      if os.access(d, os.W_OK):
        return d / fname
    except OSError:
      continue
  return None


def filter_by_class_names(base, class_names, *, use_cache: bool = True) -> SubsetSource:
  """Restricts a labelled source to `class_names`, relabelled 0..len-1 in sorted name order.

  The index list needs one pass over the labels of `base`; it is cached as a .npy file in the
  dataset folder (or ~/.cache/alit_jax/subsets when that is read-only), keyed by dataset path,
  split, size and class list, so later runs start instantly.

  Args:
    base: a source with `label_names` (e.g. `TfdsImageSource`).
    class_names: the classes to keep (e.g. `IMAGENET100_WNIDS`).
    use_cache: read/write the index cache.

  Raises:
    ValueError: `base` has no label names, or none of `class_names` is among them.
  """
  names = sorted(class_names)
  base_names = list(getattr(base, "label_names", ()))
  if not base_names:
    raise ValueError(f"{base!r} has no class names; cannot filter by class")
  present = [n for n in names if n in base_names]
  if not present:
    raise ValueError(
      f"none of the {len(names)} requested classes is in {base!r} (its classes start with "
      f"{base_names[:5]})"
    )
  missing = [n for n in names if n not in base_names]
  if missing:
    logging.warning("%d of %d classes missing from %r: %s", len(missing), len(names), base, missing)
  label_map = {base_names.index(n): names.index(n) for n in present}

  cache = _cache_file(base, names) if use_cache else None
  indices = None
  if cache is not None and cache.is_file():
    indices = np.load(cache)
  if indices is None:
    if hasattr(base, "labels"):
      labels = base.labels(progress=len(base) > 100_000)
    else:
      labels = np.array([int(base[i]["label"]) for i in range(len(base))], np.int64)
    indices = np.flatnonzero(np.isin(labels, list(label_map))).astype(np.int64)
    if cache is not None:
      # Atomic write: concurrent processes may compute the same list.
      with tempfile.NamedTemporaryFile(dir=cache.parent, suffix=".npy", delete=False) as f:
        np.save(f, indices)
      os.replace(f.name, cache)
  return SubsetSource(base, indices, label_map, names)


# ------------------------------------------------------------------------------------------------
# Spec parsing


def _parse_options(text: str) -> dict:
  opts = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    key, eq, value = part.partition("=")
    if not eq:
      raise ValueError(f"bad source option {part!r}; expected key=value")
    try:
      opts[key.strip()] = json.loads(value)
    except json.JSONDecodeError:
      opts[key.strip()] = value.strip()
  return opts


def _split_seed(seed: int, split: str) -> int:
  base = split.partition("[")[0]
  return int(seed) + {"train": 0, "validation": 1_000_003, "test": 2_000_006}.get(base, 3_000_009)


def _tfds_source(name: str, split: str, data_dir: str, help_text: str = "") -> TfdsImageSource:
  found = find_dataset_dir(data_dir, name)
  if found is None:
    msg = f"TFDS dataset {name!r} not found under {data_dir} (looked for {name}/<version>/)."
    raise FileNotFoundError(msg + ("\n" + help_text if help_text else ""))
  return TfdsImageSource(found, split)


def get_source(spec: str, split: str = "train", data_dir: str | None = None, **options):
  """A random-access image source (see the module docstring for `spec`).

  Args:
    spec: source spec, e.g. "imagenet2012", "imagenet100", "folder:/data/coco_val",
      "synthetic:num_examples=512,image_size=32".
    split: "train", "validation" ("val" accepted), "test", or a TFDS slice ("train[:1000]").
    data_dir: TFDS data_dir (default `default_data_dir()`).
    **options: overrides of spec options (synthetic: num_examples, image_size, seed;
      imagenet100: base).

  Returns:
    A picklable source with `__len__`, `__getitem__`, `label_names`, `num_classes`.

  Raises:
    FileNotFoundError: the dataset is not prepared (the message says how to prepare it).
    ValueError: unknown spec/options, missing split, wrong file format.
  """
  name, _, arg = spec.partition(":")
  name = name.strip().lower()
  split = canonical_split(split)
  data_dir = os.path.expanduser(str(data_dir)) if data_dir else default_data_dir()

  if name == "synthetic":
    opts = {"num_examples": 1024 if split.startswith("train") else 256, "image_size": 64, "seed": 0}
    opts.update(_parse_options(arg))
    opts.update(options)
    unknown = set(opts) - {"num_examples", "image_size", "seed"}
    if unknown:
      raise ValueError(f"unknown synthetic options {sorted(unknown)}")
    size = opts["image_size"]
    size = tuple(size) if isinstance(size, list | tuple) else int(size)
    return synthetic_lib.SyntheticSource(
      int(opts["num_examples"]), size, _split_seed(int(opts["seed"]), split)
    )

  if name == "demo":
    from alit_jax.data import demo_data

    opts = {
      "num_examples": 100_000 if split.startswith("train") else 512,
      "image_size": 64,
      "seed": 0,
    }
    opts.update(_parse_options(arg))
    opts.update(options)
    unknown = set(opts) - {"num_examples", "image_size", "seed", "photo_fraction", "all_photos"}
    if unknown:
      raise ValueError(f"unknown demo options {sorted(unknown)}")
    return demo_data.DemoSource(
      int(opts["num_examples"]),
      int(opts["image_size"]),
      int(opts["seed"]),
      "train" if split.startswith("train") else "validation",
      float(opts.get("photo_fraction", 0.5)),
      all_photos=str(opts.get("all_photos", "0")).lower() in ("1", "true", "yes"),
    )

  if name == "folder":
    path = os.path.expanduser(arg) if arg else data_dir
    found = find_dataset_dir(path)
    if found is None:
      raise FileNotFoundError(
        f"no dataset built by build_folder found at {path} (expected dataset_info.json in it, "
        "in a version subfolder, or in a single NAME/VERSION/ below it). Build one with:\n"
        f"  python -m alit_jax.data.build_folder /path/to/images --out {path}"
      )
    return TfdsImageSource(found, split)

  if name in ("imagenet2012", "imagenet", "imagenet1k"):
    return _tfds_source("imagenet2012", split, data_dir, _IMAGENET_HELP.format(data_dir=data_dir))

  if name in ("imagenet100", "in100"):
    opts = _parse_options(arg)
    opts.update(options)
    base_spec = opts.pop("base", "imagenet2012")
    if opts:
      raise ValueError(f"unknown imagenet100 options {sorted(opts)}")
    base = get_source(base_spec, split, data_dir)
    return filter_by_class_names(base, IMAGENET100_WNIDS)

  if options or arg:
    raise ValueError(f"source {spec!r} takes no options")
  return _tfds_source(
    name,
    split,
    data_dir,
    "Prepare it as array_record (e.g. `tfds build NAME --file_format=array_record`) or build it "
    "from an image folder with `python -m alit_jax.data.build_folder`.",
  )
