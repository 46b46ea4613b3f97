r"""Times the official PyTorch ALIT forward, for `rollout.py --compare`.

    pip install torch==2.13.0 pyyaml        # the CPU wheel; torchvision is not needed
    git clone https://github.com/ShivamDuggal4/adaptive-length-tokenizer /tmp/alit_ref
    python experiments/benchmarks/torch_reference.py --reference-dir /tmp/alit_ref \
        [--configs tiny,medium,alit_small] [--batches 1,8] [--repeats 3] [--threads 2] \
        [--out experiments/benchmarks/results/rollout_torch_cpu.json]

The same work as `rollout.py`'s `rollout_*` cases: `model(imgs, reconstruction_iters="all")` of
`AdaptiveLengthImageTokenizer` (VQGAN base, 8 iterations, every iteration decoded to pixels
through the base decoder), random weights, float32, `torch.inference_mode`, after one warm-up
call. The configs are `rollout.py`'s. The reference code is imported from `--reference-dir`, never
copied; its training-only imports (pytorch_lightning, torchvision datasets, omegaconf, download
helpers) are replaced by empty stand-ins, since the forward does not use them.

The reference decodes pixels with `decoded_code` only in its `full_finetuning` stage (quirk 13);
the stage is switched for the decode so both sides do the same work.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time
import types

CONFIGS = {  # name -> (ALIT width, layers, heads, latent codebook, tiny VQGAN)
  "tiny": (64, 2, 4, 128, True),
  "medium": (512, 4, 8, 4096, False),
  "alit_small": (1024, 8, 8, 4096, False),
}


_TINY_VQGAN = [False]  # read when the reference loads its VQGAN yaml (one process, many configs)


def stub_training_imports():
  """Empty stand-ins for modules the reference imports but its forward never calls."""
  import torch.nn as nn
  import yaml

  pl = types.ModuleType("pytorch_lightning")
  pl.LightningModule = nn.Module
  tv = types.ModuleType("torchvision")
  tv.datasets = types.ModuleType("torchvision.datasets")
  tv.datasets.ImageFolder = object
  tv.models = types.ModuleType("torchvision.models")
  sys.modules.update(
    {
      "pytorch_lightning": pl,
      "torchvision": tv,
      "torchvision.datasets": tv.datasets,
      "torchvision.models": tv.models,
      "requests": types.ModuleType("requests"),
      "gdown": types.ModuleType("gdown"),
    }
  )

  class _Attr(dict):
    def __getattr__(self, k):
      v = self[k]
      return _Attr(v) if isinstance(v, dict) else v

  class OmegaConf:
    @staticmethod
    def load(path):
      d = yaml.safe_load(open(path))
      if _TINY_VQGAN[0] and "model" in d:  # rollout.py's tiny VQGAN (ch 32, 64 codes of dim 32)
        p = d["model"]["params"]
        p["embed_dim"], p["n_embed"] = 32, 64
        p["ddconfig"].update(z_channels=32, ch=32, ch_mult=[1, 1, 1, 1, 2])
      return _Attr(d)

  oc = types.ModuleType("omegaconf")
  oc.OmegaConf = OmegaConf
  sys.modules["omegaconf"] = oc


def build(name: str):
  width, layers, heads, codebook, tiny = CONFIGS[name]
  _TINY_VQGAN[0] = tiny
  import torch

  # The reference calls `tensor.get_device()` and uses the result as a device; on CPU that is -1.
  torch.Tensor.get_device = lambda self: self.device
  from adaptive_tokenizers.adaptive_vqgan import AdaptiveLengthImageTokenizer
  from modules.base_tokenizers import VQGANWrapper

  base = VQGANWrapper(embed_dim=32 if tiny else 256, pretrained_ckpt_path=None)
  model = AdaptiveLengthImageTokenizer(
    base,
    width,
    layers,
    heads,
    width,
    layers,
    heads,
    vq_codebook_size=codebook,
    vq_token_dim=12,
    dynamic_halting=False,
    train_stage="latent_distillation_pretrain",
  )
  decode = model.reconstruct_images

  def reconstruct(logits, code):  # quirk 13: decode `decoded_code` as full_finetuning does
    model.train_stage = "full_finetuning"
    try:
      return decode(logits, code)
    finally:
      model.train_stage = "latent_distillation_pretrain"

  model.reconstruct_images = reconstruct
  return model.eval()


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--reference-dir", required=True, help="a checkout of the official repository")
  p.add_argument("--configs", default="tiny,medium,alit_small")
  p.add_argument("--batches", default="1,8")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p.add_argument("--out", default="experiments/benchmarks/results/rollout_torch_cpu.json")
  a = p.parse_args(argv)
  ref = pathlib.Path(a.reference_dir).resolve()
  if not (ref / "adaptive_tokenizers" / "adaptive_vqgan.py").is_file():
    p.error(f"--reference-dir {ref}: no adaptive_tokenizers/adaptive_vqgan.py there")
  out = pathlib.Path(a.out).resolve()
  import torch

  torch.set_num_threads(a.threads)
  stub_training_imports()
  sys.path[:0] = [str(ref), str(ref / "base_tokenizers")]
  os.chdir(ref)  # the reference reads its VQGAN yaml by relative path
  rows = []
  for name in a.configs.split(","):
    for batch in [int(b) for b in a.batches.split(",")]:
      torch.manual_seed(0)
      model = build(name)
      x = torch.rand(batch, 3, 256, 256)
      with torch.inference_mode():
        t0 = time.perf_counter()
        model(x, reconstruction_iters="all")
        first = time.perf_counter() - t0
        runs = []
        for _ in range(a.repeats):
          t0 = time.perf_counter()
          model(x, reconstruction_iters="all")
          runs.append(time.perf_counter() - t0)
      med = statistics.median(runs)
      row = {
        "config": name,
        "batch": batch,
        "case": "torch_reference",
        "first_call_s": round(first, 3),
        "median_s": round(med, 4),
        "images_per_s": round(batch / med, 3),
      }
      rows.append(row)
      print(json.dumps(row), flush=True)
  env = {
    "torch": torch.__version__,
    "threads": torch.get_num_threads(),
    "cpu_count": os.cpu_count(),
  }
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"env": env, "rows": rows}, indent=2))
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
