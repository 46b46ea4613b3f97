"""Per-image adaptive token counts of a dataset."""

from __future__ import annotations

from typing import Any

import numpy as np

from alit_jax import criteria as criteria_lib
from alit_jax import evaluate as evaluate_lib
from alit_jax.analysis import complexity


def collect_token_counts(
  tokenizer,
  data: Any,
  *,
  criteria: Any = ("l1",),
  thresholds: Any = (0.07,),
  max_images: int | None = None,
  batch_size: int = 16,
  split: str = "validation",
  data_dir: str | None = None,
  resize: bool | None = None,
  measures: bool = False,
  num_devices: int | None = None,
  progress: bool = True,
) -> dict[str, Any]:
  """Runs the rollout over a dataset and selects, per image, the token count of each selection.

  Args:
    tokenizer: a `Tokenizer`.
    data: anything `alit_jax.evaluate.resolve_source` accepts.
    criteria, thresholds: the selections (see `alit_jax.evaluate.make_selections`).
    max_images, batch_size, split, data_dir, resize: as for `alit_jax.evaluate.evaluate`.
    measures: also compute the complexity measures of every (cropped) input image.
    num_devices: use the first N local devices (default all).
    progress: progress bar.

  Returns:
    dict with `data` (description), `token_counts` [32, ...], `index`, `label` (M,),
    `label_names`, `tokens` {selection key: (M,) token counts}, `scores` {criterion: (M, N)},
    `l1` (M, N) (unclipped reconstruction vs input, as the l1 criterion), and with `measures`
    `measures` {name: (M,)}.
  """
  source, description, default_resize = evaluate_lib.resolve_source(
    data, split=split, data_dir=data_dir
  )
  if max_images is not None:
    from alit_jax.data.image_folder import PrefixSource

    source = PrefixSource(source, max_images)
  selections = evaluate_lib.make_selections(criteria, thresholds)
  crits = [s.criterion for s in selections]
  if not any(c.name == "l1" for c in crits):
    crits.append(criteria_lib.get("l1"))
  want_latents = any("latents" in c.requires for c in crits)
  keep: dict[str, list] = {}
  for out in evaluate_lib.iterate_rollouts(
    tokenizer,
    source,
    batch_size=batch_size,
    resize=default_resize if resize is None else resize,
    want_latents=want_latents,
    num_devices=num_devices,
    progress=progress,
    desc=f"tokens {description}",
  ):
    m = np.asarray(out["mask"], bool)
    scores = evaluate_lib.criterion_scores(
      crits,
      out["x"],
      out["reconstructions"],
      labels=out["label"],
      latent_tokens=out.get("latent_tokens"),
      tokens_per_iteration=tokenizer.tokens_per_iteration,
    )
    for name, s in scores.items():
      keep.setdefault(f"score:{name}", []).append(s[:, m].T)
    keep.setdefault("index", []).append(np.asarray(out["index"])[m])
    keep.setdefault("label", []).append(np.asarray(out["label"])[m])
    if measures:
      for img in np.asarray(out["images"])[m]:
        for k, v in complexity.measures(img).items():
          keep.setdefault(f"measure:{k}", []).append(np.asarray([v]))
  if "index" not in keep:
    raise ValueError(f"{description}: no images could be read")
  cat = {k: np.concatenate(v) for k, v in keep.items()}
  counts = np.asarray(tokenizer.token_counts)
  scores = {k.partition(":")[2]: v for k, v in cat.items() if k.startswith("score:")}
  tokens = {}
  for sel in selections:
    it = criteria_lib.select_iterations(
      scores[sel.criterion.name].T, sel.threshold, sel.criterion.higher_is_better
    )
    tokens[sel.key] = counts[it]
  out = {
    "data": description,
    "token_counts": [int(c) for c in counts],
    "index": cat["index"],
    "label": cat["label"],
    "label_names": list(getattr(source, "label_names", ()) or ()),
    "tokens": tokens,
    "scores": scores,
    "l1": scores["l1"],
  }
  if measures:
    out["measures"] = {k.partition(":")[2]: v for k, v in cat.items() if k.startswith("measure:")}
  return out
