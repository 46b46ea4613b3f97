r"""The official PyTorch ALIT and alit-jax trained side by side on the known-answer problem.

Both sides start from the SAME weights (the reference class's own initialisation, converted into
the Flax tree by `alit_jax.convert.mapping`), see the SAME batches (each drawn once with numpy by
`known_answer.Problem.batch` and fed to both) and use the SAME optimizer settings, and the script
reports both sides' per-step losses.

Setup (the reference is exported outside the repository and imported from there, never copied):

    python3 -m venv --system-site-packages /work/scratch/torchenv   # any venv with alit-jax
    . /work/scratch/torchenv/bin/activate
    pip install -e /work/main                # only for a venv without alit-jax
    pip install torch==2.13.0 pyyaml         # the CPU wheel; no torchvision/timm/lightning needed
    git clone https://github.com/ShivamDuggal4/adaptive-length-tokenizer /work/scratch/alit_ref
    #   (or, from a bare mirror: git --git-dir=MIRROR archive HEAD | tar -x -C /work/scratch/alit_ref)

Run (one thread per side: `--threads 1`, the default, also sets XLA_FLAGS for JAX if unset):

    python experiments/reference_trajectory.py --reference-dir /work/scratch/alit_ref \
        --grid 8 --commitment 0 --steps 25 --out experiments/results/reference_trajectory_g8_c0_25.json
    python experiments/reference_trajectory.py --reference-dir /work/scratch/alit_ref \
        --grid 8 --commitment 0 --steps 1000 --log-every 100

Torch side: `AdaptiveLengthImageTokenizer` (train_stage latent_distillation_pretrain,
dynamic_halting False, every iteration in the loss) with a stub base tokenizer that serves the
synthetic features (NCHW), gt indices and 2-code codebook in place of its VQGAN; its own
`forward` computes the loss (sum_i lambda_i nll_i + code_i + quantizer_i). The optimizer is built
the way `main_pretrain.py` builds it: timm `add_weight_decay` param groups (written out here, timm
is not imported), `torch.optim.AdamW(groups, lr, betas=(0.9, 0.95))`, the reference's own
`utils.misc.NativeScalerWithGradNormCount` (on CPU its GradScaler disables itself, so it is
`backward` + `clip_grad_norm_(model.parameters(), 3.0)` + `step`) and its own
`utils.lr_sched.adjust_learning_rate` called before every step with epoch = step index (one step
per "epoch": the same per-step warm-up + half-cycle cosine). `torch.cuda.amp.autocast` of the
reference's engine is a no-op on CPU: both sides run float32. The EMA is left out on both sides'
reports (it does not feed back into training).

JAX side: `known_answer.make_train_step` (the trainer's own `steps.stage1_update`, halting off,
AdamW b1 0.9, b2 0.95, eps 1e-8, wd 0.05 with the timm mask, clip 3.0, lr 0 at step 0).

Continuous latents (`--continuous`): the reference's decoder reads `pre_quantizer_mlp`'s output
as is, as alit-jax's does. `--noise-std STD` (implies continuous) trains through alit-jax's
noisy latent channel (`ALITConfig.latent_noise_std`, set as `experiments/known_answer.py` sets
it). The reference has no such option, so `add_noise_channel` adds the same channel from outside:
a forward hook on `pre_quantizer_mlp` returns `F.normalize(out, dim=-1) + STD * randn` in
training (normalised, no noise, in eval mode). The two sides draw their noise from different
RNGs, so with STD > 0 the per-step losses differ from step 0 on and only statistics (block means
of the NLL per iteration) compare; a tiny STD (1e-6) checks the channel step by step.

    python experiments/reference_trajectory.py --reference-dir /work/scratch/alit_ref \
        --grid 4 --noise-std 0.8 --batch-size 32 --lr 2e-3 --steps 1000 --log-every 100

Quantizer indices: a forward hook on the torch quantizer, and a separate forward of the JAX model
on the same params and batch before each step; the per-step count of differing indices is logged.

Writes `--out` (a .json path, or a folder that gets reference_trajectory.json): every step's
losses, grad norms, lr and index differences on both sides, the conversion notes, and a summary
(max differences over the first `--compare-steps`, the first step over `--tol`, the first step
with differing indices, per-`--log-every` rows and block means, the final per-parameter
differences, and the same-weights check: each side's final weights run through both
implementations on `--check-batch` fresh images, so that once the trajectories have parted a
difference between the implementations can still be told from one between the trajectories).
`--resummarize JSON` recomputes that summary from a written file's rows.
Results and their reading: `experiments/results/reference_trajectory.md`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import sys
import time
import types
import warnings

import _common  # noqa: F401  (puts the repository on sys.path)
import known_answer  # the sibling script: the problem, model and optimizer flags
import numpy as np

TERMS = ("nll", "code", "quant")  # per-iteration loss terms compared


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--reference-dir", help="an export of the official repository (required)")
  p.add_argument(
    "--resummarize",
    metavar="JSON",
    help="recompute the summary of a written JSON from its rows (its own flags), no training",
  )
  known_answer.add_problem_flags(p)
  p.add_argument("--compare-steps", type=int, default=25, help="steps of the agreement check")
  p.add_argument(
    "--tol",
    type=float,
    default=1e-4,
    help="absolute tolerance on every loss term (float32 noise; see the README section)",
  )
  p.add_argument("--log-every", type=int, default=25)
  p.add_argument(
    "--check-batch",
    type=int,
    default=256,
    help="images of the end-of-run same-weights check (0: skip it)",
  )
  p.add_argument("--threads", type=int, default=1, help="torch threads (1 also sets JAX's)")
  p.add_argument("--out", default="runs/reference_trajectory")
  return p.parse_args(argv)


# ----------------------------------------------------------------------------- reference side


@contextlib.contextmanager
def _cwd(path):
  old = os.getcwd()
  os.chdir(path)
  try:
    yield
  finally:
    os.chdir(old)


def import_reference(ref: pathlib.Path) -> types.SimpleNamespace:
  """The official class and training utilities, imported from `ref` with stand-ins for the
  training-only imports (`experiments/benchmarks/torch_reference.py`'s helper)."""
  import torch

  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "benchmarks"))
  from torch_reference import stub_training_imports

  stub_training_imports()
  # Its deprecated torch.cuda.amp calls warn on every import / CPU use; they are no-ops here.
  warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp.*")
  warnings.filterwarnings("ignore", message=r".*CUDA is not available.*")
  # The reference calls `tensor.get_device()` and uses the result as a device; on CPU that is -1.
  torch.Tensor.get_device = lambda self: self.device
  sys.path[:0] = [str(ref), str(ref / "base_tokenizers")]
  with _cwd(ref):  # its package __init__ reads yaml files by relative path
    from adaptive_tokenizers.adaptive_vqgan import AdaptiveLengthImageTokenizer
    from utils import lr_sched, misc
  return types.SimpleNamespace(ALIT=AdaptiveLengthImageTokenizer, lr_sched=lr_sched, misc=misc)


def make_stub_base(codebook: np.ndarray):
  """A stand-in for `VQGANWrapper`: the attributes the tokenizer reads, serving set batches."""
  import torch
  from torch import nn

  class StubBase(nn.Module):
    def __init__(self):
      super().__init__()
      k, e = codebook.shape
      self.embed_dim = e  # patch_embed gets width - embed_dim channels
      self.codebook_size = k  # decoder output size, NLL over these
      self.codebook_emb_dim = e
      self.vqgan = nn.Module()
      self.vqgan.quantize = nn.Module()
      self.vqgan.quantize.embedding = nn.Module()
      # Frozen, as the reference's base (`is_requires_grad=False`); no RNG is drawn here.
      self.vqgan.quantize.embedding.weight = nn.Parameter(
        torch.from_numpy(codebook.copy()), requires_grad=False
      )
      self.batch = None

    def serve(self, batch):
      feats = torch.from_numpy(np.ascontiguousarray(batch["base_features"].transpose(0, 3, 1, 2)))
      self.batch = (feats, torch.from_numpy(batch["gt_indices"].astype(np.int64)))

    def get_img_tokens(self, imgs):
      feats, gt = self.batch
      assert feats.shape[0] == imgs.shape[0]
      return feats, gt

  return StubBase()


def build_torch_model(ref, cfg, codebook: np.ndarray, seed: int):
  import torch

  torch.manual_seed(seed)
  base = make_stub_base(codebook)
  model = ref.ALIT(
    base,
    cfg.encoder_width,
    cfg.encoder_layers,
    cfg.encoder_heads,
    cfg.decoder_width,
    cfg.decoder_layers,
    cfg.decoder_heads,
    quantize_latent=cfg.quantize_latent,
    factorize_latent=cfg.factorize_latent,
    vq_codebook_size=cfg.codebook_size,
    vq_token_dim=cfg.token_dim,
    vq_commitment_cost=cfg.commitment_cost,
    vq_use_l2_norm=cfg.use_l2_norm,
    num_init_latent_tokens=cfg.num_latent_tokens,
    img_size=cfg.image_size,
    patch_size=cfg.patch_size,
    max_rollout_iters=cfg.max_rollout_iters,
    dynamic_halting=False,
    train_stage="latent_distillation_pretrain",
  )
  return model, base


def add_weight_decay(model, weight_decay: float):
  """timm's `optim_factory.add_weight_decay` (as `main_pretrain.py` calls it, no skip list)."""
  decay, no_decay, decay_names = [], [], []
  for name, param in model.named_parameters():
    if not param.requires_grad:
      continue
    if len(param.shape) == 1 or name.endswith(".bias"):
      no_decay.append(param)
    else:
      decay.append(param)
      decay_names.append(name)
  groups = [
    {"params": no_decay, "weight_decay": 0.0},
    {"params": decay, "weight_decay": weight_decay},
  ]
  return groups, decay_names


def add_noise_channel(model, cfg, seed: int) -> str | None:
  """alit-jax's `latent_noise_std` channel on the reference, from outside (its code unchanged).

  In the continuous configuration the reference's decoder reads `pre_quantizer_mlp(ln_post(z))`
  (`encoder_ln_post`'s output when not factorized) directly. A forward hook on that module
  replaces its output with `F.normalize(out, dim=-1) + std * N(0, I)` in training and with
  `F.normalize(out, dim=-1)` in eval mode, as `ALIT.latent_head` does with and without a noise
  key. The module is called once per iteration, on the T(i+1) latent slots. The draws come from
  a torch Generator of their own (seeded `seed`), so they differ from JAX's.
  """
  import torch
  import torch.nn.functional as F

  std = cfg.latent_noise_std
  if std <= 0:
    return None
  name = "pre_quantizer_mlp" if cfg.factorize_latent else "encoder_ln_post"
  gen = torch.Generator().manual_seed(seed)

  def hook(mod, inp, out):
    out = F.normalize(out, dim=-1)
    if mod.training:
      out = out + std * torch.randn(out.shape, generator=gen, dtype=out.dtype)
    return out

  getattr(model, name).register_forward_hook(hook)
  return (
    f"forward hook on {name}: F.normalize(out, dim=-1) + {std:g} * randn "
    "(the noise in training only)"
  )


# ----------------------------------------------------------------------------- conversion


def convert_initial_weights(model_t, target) -> tuple[dict, dict]:
  """The torch model's initial state dict -> the alit-jax param tree (the project's converter).

  Returns (params, notes): notes say what the strict converter refused as is and what was done.
  """
  from alit_jax.convert import mapping

  sd = {k: v.detach().cpu().numpy() for k, v in model_t.state_dict().items()}
  notes = {
    "not_converted": sorted(k for k in sd if k.startswith("base_tokenizer.")),
    "not_converted_why": "the stub base's frozen codebook: the JAX side gets the same array as "
    "base_out['codebook']",
  }
  alit_sd = {k: v for k, v in sd.items() if not k.startswith("base_tokenizer.")}
  try:
    params = mapping.state_dict_to_tree(alit_sd, target, name="reference init")["params"]
    notes["strict_as_is"] = "ok"
    return params, notes
  except mapping.ConversionError as e:
    notes["strict_as_is"] = str(e)
  # The reference's Decoder always holds max_latent_tokens=256 latent positions (a Decoder
  # default the tokenizer does not expose) and slices the first T(i+1) at iteration i; the port
  # holds N*T rows. Rows past N*T are never read, so the first N*T rows are the whole function.
  key = "decoder.latent_token_positional_embedding"
  rows = target["params"]["decoder"]["latent_token_positional_embedding"].shape[0]
  notes["sliced"] = {key: f"{alit_sd[key].shape} -> first {rows} rows (rows {rows}.. unused)"}
  alit_sd[key] = alit_sd[key][:rows]
  params = mapping.state_dict_to_tree(alit_sd, target, name="reference init")["params"]
  return params, notes


def check_decay_groups(decay_names: list[str], params) -> list[str]:
  """Parameters whose weight decay differs between the torch groups and `optim.decay_mask`."""
  from alit_jax.convert import mapping
  from alit_jax.train import optim

  flat = mapping.flatten(params)
  mask = mapping.flatten(optim.decay_mask(params))
  jax_decay = {mapping.torch_key("params", p, np.ndim(flat[p])) for p, on in mask.items() if on}
  return sorted(set(decay_names) ^ jax_decay)


# ----------------------------------------------------------------------------- run


def _r(x) -> float:
  """float32 precision (9 significant digits) for the JSON."""
  return float(f"{float(x):.9g}")


def run(args) -> dict:
  import jax
  import jax.numpy as jnp
  import torch

  from alit_jax.analysis import known_answer as ka
  from alit_jax.models.alit import ALIT
  from alit_jax.train import steps

  torch.set_num_threads(args.threads)
  ref = import_reference(pathlib.Path(args.reference_dir).resolve())

  problem, cfg = known_answer.problem_and_config(args)
  n_it, t = cfg.max_rollout_iters, cfg.num_latent_tokens
  codebook = problem.codebook(args.seed)

  # Same weights.
  model_t, base_t = build_torch_model(ref, cfg, codebook, args.seed)
  model_t.train(True)
  model_j = ALIT(cfg)
  target = {"params": jax.eval_shape(lambda: steps.init_params(model_j, jax.random.key(0)))}
  params, conv_notes = convert_initial_weights(model_t, target)
  params = jax.tree.map(jnp.asarray, params)

  # Same optimizer settings.
  groups, decay_names = add_weight_decay(model_t, 0.05)
  opt_t = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
  scaler = ref.misc.NativeScalerWithGradNormCount()
  sched = types.SimpleNamespace(
    lr=args.lr, min_lr=0.0, warmup_epochs=args.warmup_steps, epochs=args.steps
  )
  decay_mismatch = check_decay_groups(decay_names, params)
  hp = dict(lr=args.lr, min_lr=0.0, warmup_steps=args.warmup_steps, total_steps=args.steps)
  step_j = ka.make_train_step(model_j, hp)
  state = steps.init_train_state(params, ka.SPEC)

  quantized = cfg.quantize_latent
  noise_note = add_noise_channel(model_t, cfg, args.seed)
  captured = []
  if quantized:
    model_t.quantize.register_forward_hook(
      lambda mod, inp, out: captured.append(out[1]["min_encoding_indices"].numpy().copy())
    )

  rollout_j = ka.make_rollout(model_j, impl=ka.SPEC.impl)

  def jax_indices(params, base_out):
    return rollout_j(params, base_out)["quant_indices"]

  print(
    f"config: grid {args.grid}, {t} tokens x {args.codes} codes, {n_it} iterations, "
    f"{'quantized' if quantized else 'continuous'}, noise std {args.noise_std:g}, "
    f"commitment {args.commitment}, "
    f"width {args.width}, {args.layers}+{args.layers} layers, B{args.batch_size}, lr {args.lr}, "
    f"warm-up {args.warmup_steps}, {args.steps} steps, seed {args.seed}",
    flush=True,
  )
  print(f"conversion: {json.dumps(conv_notes)}", flush=True)
  if noise_note:
    print(f"noise channel: {noise_note}", flush=True)
  print(f"weight-decay groups differing between the sides: {decay_mismatch or 'none'}")

  rng = np.random.default_rng(args.seed)
  imgs_t = torch.zeros(args.batch_size, 3, cfg.image_size, cfg.image_size)
  rows, secs = [], {"torch": 0.0, "jax": 0.0}
  hdr = "step    lr      | torch nll " + " ".join(f"it{i}" for i in range(n_it))
  print(hdr + " | jax nll ... | max|d| | idx diff", flush=True)
  for s in range(args.steps):
    batch = problem.batch(rng, codebook, args.batch_size)

    # Torch: the reference's engine step (lr, forward + loss, backward, clip, AdamW).
    t0 = time.perf_counter()
    lr_t = ref.lr_sched.adjust_learning_rate(opt_t, s, sched)
    base_t.serve(batch)
    captured.clear()
    loss_t, logs = model_t(imgs_t)
    gn_t = scaler(loss_t, opt_t, clip_grad=3.0, parameters=model_t.parameters())
    opt_t.zero_grad()
    side_t = {
      "nll": [logs[i][f"nll_loss_{i}"] for i in range(n_it)],
      "code": [logs[i][f"code_loss_{i}"] for i in range(n_it)],
      "quant": [logs[i].get(f"quantization_loss_{i}", 0.0) for i in range(n_it)],
      "loss": loss_t.item(),
      "grad_norm": gn_t.item(),
      "lr": lr_t,
    }
    idx_t = list(captured)
    secs["torch"] += time.perf_counter() - t0

    # JAX: indices on the pre-step params, then the trainer's step.
    t0 = time.perf_counter()
    base_out = {k: jnp.asarray(v) for k, v in batch.items()}
    q_j = np.asarray(jax_indices(state["params"], base_out)) if quantized else None
    state, m = step_j(state, base_out)
    m = jax.device_get(m)
    side_j = {
      "nll": [float(v) for v in m["nll_loss"]],
      "code": [float(v) for v in m["code_loss"]],
      "quant": [float(v) for v in m["quantization_loss"]] if quantized else [0.0] * n_it,
      "loss": float(m["loss"]),
      "grad_norm": float(m["grad_norm"]),
      "lr": float(m["lr"]),
    }
    secs["jax"] += time.perf_counter() - t0
    if s == 0:  # the first step holds JAX's compilation
      first = dict(secs)

    idx_diff = None
    if quantized:
      idx_diff = [int(np.sum(idx_t[i] != q_j[i][:, : t * (i + 1)])) for i in range(n_it)]
    diffs = [abs(a - b) for k in TERMS for a, b in zip(side_t[k], side_j[k])]
    diffs.append(abs(side_t["loss"] - side_j["loss"]))
    row = {
      "step": s,
      "torch": {k: (list(map(_r, v)) if isinstance(v, list) else _r(v)) for k, v in side_t.items()},
      "jax": {k: (list(map(_r, v)) if isinstance(v, list) else _r(v)) for k, v in side_j.items()},
      "max_abs_diff": _r(max(diffs)),
      "index_diff": idx_diff,
    }
    rows.append(row)
    if s % args.log_every == 0 or s == args.steps - 1 or s < min(args.compare_steps, 5):
      nt = " ".join(f"{v:.4f}" for v in side_t["nll"])
      nj = " ".join(f"{v:.4f}" for v in side_j["nll"])
      print(
        f"{s:5d} {lr_t:.2e} | torch {nt} | jax {nj} | {max(diffs):.1e} | {idx_diff}", flush=True
      )

  summary = summarize(rows, args, n_it)
  summary["final_param_diff"] = final_param_diff(model_t, state["params"], target)
  if args.check_batch > 0:
    summary["same_weights_check"] = same_weights_check(
      args, ref, cfg, codebook, hp, model_t, state["params"], target, problem
    )
  summary["seconds"] = {k: round(v, 1) for k, v in secs.items()}
  summary["seconds_after_step_0"] = {k: round(secs[k] - first[k], 1) for k in secs}
  print_summary(summary, n_it)
  return {
    "args": vars(args),
    "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
    "conversion": conv_notes,
    "noise_channel": noise_note,
    "weight_decay_mismatch": decay_mismatch,
    "env": {
      "torch": torch.__version__,
      "jax": jax.__version__,
      "torch_threads": torch.get_num_threads(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
    },
    "summary": summary,
    "rows": rows,
  }


def same_weights_check(args, ref, cfg, codebook, hp, model_t, params_j, target, problem) -> dict:
  """Each side's final weights run through BOTH implementations on one fresh batch.

  After the trajectories have parted, this tells a difference between the implementations (the
  loss, gradient or indices of the same weights would differ) from a difference between the
  trajectories (each side's weights give the same numbers on both sides). The torch weights are
  converted into the Flax tree as at init; the JAX weights go into a fresh reference model through
  `mapping.tree_to_state_dict` (rows past N*T of the decoder's latent position table keep the
  fresh model's values: never read). With the noisy channel both sides use STD 1e-9 here (the
  channel's normalisation, no noise worth the name), so the NLL is the noise-free one. A batch of
  `--check-batch` images drawn with seed 10000 + seed (not a training batch); loss terms, the
  gradient norm (pre-clipping, on these weights, no step taken) and quantizer indices.
  """
  import dataclasses

  import jax
  import jax.numpy as jnp
  import torch

  from alit_jax.analysis import known_answer as ka
  from alit_jax.convert import mapping
  from alit_jax.models.alit import ALIT
  from alit_jax.train import steps

  n_it, t = cfg.max_rollout_iters, cfg.num_latent_tokens
  quantized = cfg.quantize_latent
  cfg_c = cfg
  if cfg.latent_noise_std > 0:
    cfg_c = dataclasses.replace(cfg, latent_noise_std=1e-9)
  model_j = ALIT(cfg_c)
  step_j = ka.make_train_step(model_j, hp)
  batch = problem.batch(np.random.default_rng(10_000 + args.seed), codebook, args.check_batch)
  base_out = {k: jnp.asarray(v) for k, v in batch.items()}
  imgs = torch.zeros(args.check_batch, 3, cfg.image_size, cfg.image_size)

  rollout_j = ka.make_rollout(model_j, impl=ka.SPEC.impl)

  def jax_indices(params, base_out):
    return rollout_j(params, base_out)["quant_indices"]

  key = "decoder.latent_token_positional_embedding"
  sd_t = {k: v.detach().clone() for k, v in model_t.state_dict().items()}
  sd_j = mapping.tree_to_state_dict({"params": jax.device_get(params_j)})
  conv_t, _ = convert_initial_weights(model_t, target)  # torch's final weights, as at init
  weight_sets = {"torch_final": (sd_t, conv_t), "jax_final": (sd_j, jax.device_get(params_j))}

  res = {"batch": args.check_batch, "noise_std": cfg_c.latent_noise_std}
  for name, (sd, params) in weight_sets.items():
    # Torch: a fresh reference model holding these weights, the reference's forward + backward.
    model_b, base_b = build_torch_model(ref, cfg_c, codebook, args.seed)
    add_noise_channel(model_b, cfg_c, args.seed)
    own = model_b.state_dict()
    load = {}
    for k, v in sd.items():
      v = torch.as_tensor(np.asarray(v))
      if k == key and v.shape != own[k].shape:
        v = torch.cat([v, own[k][v.shape[0] :]], 0)
      load[k] = v
    missing, unexpected = model_b.load_state_dict(load, strict=False)
    assert all(k.startswith("base_tokenizer.") for k in missing) and not unexpected, (
      missing,
      unexpected,
    )
    model_b.train(True)
    captured = []
    if quantized:
      model_b.quantize.register_forward_hook(
        lambda mod, inp, out, c=captured: c.append(out[1]["min_encoding_indices"].numpy().copy())
      )
    base_b.serve(batch)
    loss_t, logs = model_b(imgs)
    loss_t.backward()
    gn_t = torch.nn.utils.clip_grad_norm_(model_b.parameters(), float("inf"))
    side_t = {
      "nll": [_r(logs[i][f"nll_loss_{i}"]) for i in range(n_it)],
      "code": [_r(logs[i][f"code_loss_{i}"]) for i in range(n_it)],
      "quant": [_r(logs[i].get(f"quantization_loss_{i}", 0.0)) for i in range(n_it)],
      "loss": _r(loss_t.item()),
      "grad_norm": _r(gn_t.item()),
    }
    # JAX: the trainer's step on these weights (its metrics are of the pre-step weights).
    p = jax.tree.map(jnp.asarray, params)
    _, m = step_j(steps.init_train_state(p, ka.SPEC), base_out)
    m = jax.device_get(m)
    side_j = {
      "nll": [_r(v) for v in m["nll_loss"]],
      "code": [_r(v) for v in m["code_loss"]],
      "quant": [_r(v) for v in m["quantization_loss"]] if quantized else [0.0] * n_it,
      "loss": _r(m["loss"]),
      "grad_norm": _r(m["grad_norm"]),
    }
    diffs = [abs(a - b) for k in TERMS for a, b in zip(side_t[k], side_j[k])]
    diffs.append(abs(side_t["loss"] - side_j["loss"]))
    entry = {
      "torch": side_t,
      "jax": side_j,
      "max_abs_diff": _r(max(diffs)),
      "grad_norm_diff": _r(abs(side_t["grad_norm"] - side_j["grad_norm"])),
    }
    if quantized:
      q_j = np.asarray(jax_indices(p, base_out))
      entry["index_diff"] = [
        int(np.sum(captured[i] != q_j[i][:, : t * (i + 1)])) for i in range(n_it)
      ]
      entry["indices"] = sum(c.size for c in captured)
    res[name] = entry
  return res


def final_param_diff(model_t, params_j, target, top: int = 6) -> dict:
  """max |torch - jax| per parameter after training (torch converted as at init), largest first.

  `encoder_mask_token` is read only by halting: torch leaves it untouched (no gradient, so AdamW
  skips it), while optax still applies its weight decay, so it drifts by design.
  """
  import jax

  from alit_jax.convert import mapping

  conv, _ = convert_initial_weights(model_t, target)
  ft, fj = mapping.flatten(conv), mapping.flatten(jax.device_get(params_j))
  diffs = {"/".join(k): float(np.max(np.abs(ft[k] - np.asarray(fj[k])))) for k in ft}
  order = sorted(diffs, key=diffs.get, reverse=True)
  return {k: _r(diffs[k]) for k in order[:top]} | {
    "encoder_mask_token": _r(diffs["encoder_mask_token"])
  }


def summarize(rows: list[dict], args, n_it: int) -> dict:
  k = min(args.compare_steps, len(rows))

  def maxdiff(rs, key, i=None):
    if i is None:
      return max((abs(r["torch"][key] - r["jax"][key]) for r in rs), default=0.0)
    return max((abs(r["torch"][key][i] - r["jax"][key][i]) for r in rs), default=0.0)

  first = rows[:k]
  per_term = {f"{key}_it{i}": _r(maxdiff(first, key, i)) for key in TERMS for i in range(n_it)}
  per_term["loss"] = _r(maxdiff(first, "loss"))
  per_term["grad_norm"] = _r(maxdiff(first, "grad_norm"))
  per_term["lr"] = _r(maxdiff(first, "lr"))
  over = next((r["step"] for r in rows if r["max_abs_diff"] > args.tol), None)
  idx = next((r["step"] for r in rows if r["index_diff"] and any(r["index_diff"])), None)
  table = [
    {
      "step": r["step"],
      "torch_nll": r["torch"]["nll"],
      "jax_nll": r["jax"]["nll"],
      "torch_gap": _r(r["torch"]["nll"][0] - r["torch"]["nll"][-1]),
      "jax_gap": _r(r["jax"]["nll"][0] - r["jax"]["nll"][-1]),
    }
    for r in rows
    if r["step"] % args.log_every == 0 or r["step"] == len(rows) - 1
  ]
  # Block means over `log_every` steps: single B-image steps are noisy (std ~0.01 nats).
  L = max(1, args.log_every)
  windows = []
  for a in range(0, len(rows), L):
    block = rows[a : a + L]
    w = {"steps": f"{block[0]['step']}-{block[-1]['step']}"}
    for side in ("torch", "jax"):
      nll = np.mean([r[side]["nll"] for r in block], axis=0)
      w[f"{side}_nll_mean"] = [_r(v) for v in nll]
      w[f"{side}_gap"] = _r(nll[0] - nll[-1])
    windows.append(w)
  # Mean over the last 10% of steps (at least 1): the end-of-run NLL per iteration, each side.
  tail = rows[-max(1, len(rows) // 10) :]
  end = {
    side: [_r(np.mean([r[side]["nll"][i] for r in tail])) for i in range(n_it)]
    for side in ("torch", "jax")
  }
  return {
    "compare_steps": k,
    "tol": args.tol,
    "max_abs_diff_first_steps": per_term,
    "max_abs_diff_first_steps_all_terms": _r(max(r["max_abs_diff"] for r in first)),
    "agree_first_steps": all(r["max_abs_diff"] <= args.tol for r in first),
    "first_step_over_tol": over,
    "first_step_index_diff": idx,
    "end_nll_mean_last_10pct": end,
    "table": table,
    "windows": windows,
  }


def print_summary(s: dict, n_it: int) -> None:
  k = s["compare_steps"]
  print(f"\nmax |torch - jax| over the first {k} steps (tolerance {s['tol']:g}):")
  print("  " + "  ".join(f"{key} {v:.2e}" for key, v in s["max_abs_diff_first_steps"].items()))
  print(
    f"  agree within tolerance: {s['agree_first_steps']}; first step over tolerance: "
    f"{s['first_step_over_tol']}; first step with differing quantizer indices: "
    f"{s['first_step_index_diff']}"
  )
  print(f"  NLL per iteration, mean over blocks of steps (gap = it0 - it{n_it - 1}):")
  for w in s["windows"]:
    print(
      f"    {w['steps']:>9}  torch "
      + " ".join(f"{v:.4f}" for v in w["torch_nll_mean"])
      + f" ({w['torch_gap']:+.4f})  jax "
      + " ".join(f"{v:.4f}" for v in w["jax_nll_mean"])
      + f" ({w['jax_gap']:+.4f})"
    )
  e = s["end_nll_mean_last_10pct"]
  for side in ("torch", "jax"):
    gap = e[side][0] - e[side][-1]
    print(
      f"  {side}: NLL (mean of the last 10% of steps) "
      + " ".join(f"it{i} {v:.4f}" for i, v in enumerate(e[side]))
      + f"; gap it0 - it{n_it - 1} {gap:+.4f}"
    )
  print(f"  max |torch - jax| per parameter at the end: {s['final_param_diff']}")
  c = s.get("same_weights_check")
  if c:
    print(
      f"  same-weights check ({c['batch']} fresh images, noise std {c['noise_std']:g}): each "
      "side's final weights through both implementations"
    )
    for name in ("torch_final", "jax_final"):
      e = c[name]
      print(
        f"    {name:11s} NLL torch "
        + " ".join(f"{v:.5f}" for v in e["torch"]["nll"])
        + " jax "
        + " ".join(f"{v:.5f}" for v in e["jax"]["nll"])
        + f" | max|d| loss terms {e['max_abs_diff']:.1e}, grad norm {e['grad_norm_diff']:.1e}"
        + (f" | indices differing {e['index_diff']} of {e['indices']}" if "index_diff" in e else "")
      )
  print(f"  seconds: {s['seconds']} (after step 0: {s['seconds_after_step_0']})")


def write_rows_json(path: pathlib.Path, res: dict) -> None:
  """JSON with one line per step row (small diffs, readable), everything else indented."""
  head = {k: v for k, v in res.items() if k != "rows"}
  text = json.dumps(head, indent=2, allow_nan=False)
  rows = ",\n".join("    " + json.dumps(r, allow_nan=False) for r in res["rows"])
  path.write_text(text[:-2] + ',\n  "rows": [\n' + rows + "\n  ]\n}\n")


def resummarize(path: pathlib.Path) -> None:
  res = json.loads(path.read_text())
  args = argparse.Namespace(**res["args"])
  old = res["summary"]
  n_it = len(res["rows"][0]["torch"]["nll"])
  s = summarize(res["rows"], args, n_it)
  keep = ("seconds", "seconds_after_step_0", "final_param_diff", "same_weights_check")
  s.update({k: old[k] for k in keep if k in old})
  res["summary"] = s
  print_summary(s, n_it)
  write_rows_json(path, res)
  print(f"rewrote {path}")


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.resummarize:
    return resummarize(pathlib.Path(args.resummarize))
  if not args.reference_dir:
    raise SystemExit("--reference-dir is required")
  if args.locality:
    raise SystemExit("--locality is alit-jax's option only: the reference has no such bias")
  if args.threads == 1 and "XLA_FLAGS" not in os.environ:  # before JAX starts its backend
    os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
  out = pathlib.Path(args.out)
  path = out if out.suffix == ".json" else out / "reference_trajectory.json"
  path = path.resolve()
  res = run(args)
  path.parent.mkdir(parents=True, exist_ok=True)
  write_rows_json(path, res)
  json.loads(path.read_text())  # the hand-joined file parses
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
