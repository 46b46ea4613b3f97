r"""Known-answer probe of the recurrence: does iteration 1 carry what iteration 0 cannot?

  python experiments/known_answer.py                         # 16 bits, 8 tokens x 2 codes, 2 its
  python experiments/known_answer.py --commitment 0          # quantizer commitment weight 0
  python experiments/known_answer.py --continuous            # unquantized latents (no bound)
  python experiments/known_answer.py --iters 1 --tokens 16   # single-pass control, twice the tokens

A synthetic base (`alit_jax/analysis/known_answer.py`): every image carries `--bits` i.i.d. bits,
one per block of the 16x16 code map. With `--tokens` latent tokens of a `--codes`-code latent
per iteration, iteration i can carry T(i+1) log2 K bits; the script prints that information
bound beside the measured train NLL of every iteration, and the latent code usage (distinct codes
per slot across the batch, and the spread of the unit pre-quantizer vectors across images).
Project objective and optimizer (`stage1_loss`, `make_optimizer`), halting off. Writes
OUT/known_answer.json with every logged row.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import time

import _common  # noqa: F401  (puts the repository on sys.path)
import jax
import numpy as np
from _common import write_json

from alit_jax.analysis import known_answer as ka
from alit_jax.models.alit import ALIT
from alit_jax.models.configs import ALITConfig
from alit_jax.train import steps


def add_problem_flags(p: argparse.ArgumentParser) -> None:
  """The flags of the problem, the model and the optimizer (shared with reference_trajectory.py;
  `problem_and_config` reads them)."""
  p.add_argument("--bits", type=int, default=16)
  p.add_argument("--grid", type=int, default=16, help="side of the base code map")
  p.add_argument("--tokens", type=int, default=8, help="latent tokens per iteration")
  p.add_argument("--codes", type=int, default=2, help="latent codebook size")
  p.add_argument("--iters", type=int, default=2, help="rollout iterations")
  p.add_argument("--continuous", action="store_true", help="unquantized latents")
  p.add_argument(
    "--noise-std",
    type=float,
    default=0.0,
    help="continuous latents through a noisy channel (ALITConfig.latent_noise_std; implies "
    "--continuous): a capacity bound of latent_capacity_bits per token",
  )
  p.add_argument("--commitment", type=float, default=0.25, help="quantizer commitment weight")
  p.add_argument(
    "--locality",
    type=float,
    default=0.0,
    help="ALITConfig.latent_locality (not the reference's; 0 = off): slot <-> grid attention "
    "bias -d^2/(2 sigma^2), sigma in grid cells",
  )
  p.add_argument("--width", type=int, default=64)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--warmup-steps", type=int, default=50)
  p.add_argument("--steps", type=int, default=300, help="optimizer steps (also the cosine length)")
  p.add_argument("--seed", type=int, default=0)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  add_problem_flags(p)
  p.add_argument(
    "--commitment-switch",
    default="",
    metavar="STEP:VALUE",
    help="from STEP on, train with commitment weight VALUE (a two-phase schedule)",
  )
  p.add_argument(
    "--noise-switch",
    default="",
    metavar="STEP:STD",
    help="from STEP on, train with channel noise STD (e.g. --noise-std 0.001 --noise-switch "
    "1250:0.8: l2-normalised, nearly noiseless latents first, then the bottleneck)",
  )
  p.add_argument(
    "--decoder-embed-scale",
    type=float,
    default=1.0,
    help="probe: multiply decoder_embed's kernel at init (its output is ~0.02 sqrt(width))",
  )
  p.add_argument("--log-every", type=int, default=25)
  p.add_argument(
    "--probe-patterns", type=int, default=512, help="held-out bit patterns (x4 noise draws each)"
  )
  p.add_argument("--out", default="runs/known_answer")
  return p.parse_args(argv)


REDRAWS = 4  # held-out images per bit pattern (to tell bits from noise in the codes)


def _format(row: dict) -> str:
  txt = f"step {row['step']:5d}  train nll " + " ".join(f"{v:.4f}" for v in row["nll"])
  txt += "  held-out " + " ".join(f"{v:.4f}" for v in row["heldout_nll"])
  if "codes" in row:
    txt += "  code bits " + " ".join(f"{c['entropy']:.2f}" for c in row["codes"])
    txt += "  slot MI " + " ".join(f"{np.mean(c['slot_mi']):.2f}" for c in row["codes"])
  if "distinct_per_slot" in row:
    txt += f"  distinct {row['distinct_per_slot']:.2f}"
  return txt + f"  spread {row['spread']:.3f}"


def problem_and_config(args) -> tuple[ka.Problem, ALITConfig]:
  """The problem and the model that this script's flags describe (shared with
  `reference_trajectory.py`)."""
  problem = ka.Problem(bits=args.bits, grid=args.grid)
  cfg = ka.model_config(
    problem,
    encoder_width=args.width,
    decoder_width=args.width,
    encoder_layers=args.layers,
    decoder_layers=args.layers,
    codebook_size=args.codes,
    num_latent_tokens=args.tokens,
    max_rollout_iters=args.iters,
    quantize_latent=not (args.continuous or args.noise_std > 0),
    latent_noise_std=args.noise_std,
    commitment_cost=args.commitment,
    latent_locality=args.locality,
  )
  return problem, cfg


def run(args) -> dict:
  problem, cfg = problem_and_config(args)
  model = ALIT(cfg)
  params = steps.init_params(model, jax.random.key(args.seed))
  if args.decoder_embed_scale != 1.0:
    dec = dict(params["decoder"])
    emb = dict(dec["decoder_embed"])
    emb["kernel"] = emb["kernel"] * args.decoder_embed_scale
    dec["decoder_embed"] = emb
    params = dict(params, decoder=dec)
  hp = dict(lr=args.lr, min_lr=0.0, warmup_steps=args.warmup_steps, total_steps=args.steps)
  step = ka.make_train_step(model, hp)
  switch_at, late_step = args.steps + 1, None
  if args.commitment_switch:
    at, value = args.commitment_switch.split(":")
    switch_at = int(at)
    late = ALIT(dataclasses.replace(cfg, commitment_cost=float(value)))
    late_step = ka.make_train_step(late, hp)
  if args.noise_switch:
    if args.commitment_switch or args.noise_std <= 0:
      raise SystemExit("--noise-switch needs --noise-std > 0 and no --commitment-switch")
    at, value = args.noise_switch.split(":")
    switch_at = int(at)
    late = ALIT(dataclasses.replace(cfg, latent_noise_std=float(value)))
    late_step = ka.make_train_step(late, hp)
    per_token_late = late.config.latent_capacity_bits
  state = steps.init_train_state(params, ka.SPEC)
  rng = np.random.default_rng(args.seed)
  codebook = problem.codebook(args.seed)
  probe, bits = ka.probe_set(problem, codebook, args.probe_patterns, REDRAWS, 10_000 + args.seed)
  usage_set = {k: v[:64] if k != "codebook" else v for k, v in probe.items()}
  rollout = ka.make_rollout(model)
  late_rollout = ka.make_rollout(late) if args.noise_switch else rollout
  per_token = math.log2(args.codes) if cfg.quantize_latent else cfg.latent_capacity_bits
  bounds = [ka.nll_bound(args.bits, args.tokens * (i + 1) * per_token) for i in range(args.iters)]
  print(f"information bound per iteration (nats/position): {[round(b, 3) for b in bounds]}")
  if args.noise_switch:
    late_bounds = [
      ka.nll_bound(args.bits, args.tokens * (i + 1) * per_token_late) for i in range(args.iters)
    ]
    print(f"after the noise switch: {[round(b, 3) for b in late_bounds]}")
  rows, t0 = [], time.time()
  for s in range(args.steps + 1):
    row = None
    if s % args.log_every == 0 or s == args.steps:
      row = dict(step=s, **ka.code_usage(model, state["params"], usage_set))
      ev = (rollout if s < switch_at else late_rollout)(state["params"], probe)
      row["heldout_nll"] = [float(v) for v in ev["nll"]]
      if "quant_indices" in ev:
        row["codes"] = ka.code_information(ev["quant_indices"], bits, args.tokens, REDRAWS)
    fn = step if s < switch_at else late_step
    state, m = fn(state, problem.batch(rng, codebook, args.batch_size))
    if row is not None:
      row.update(nll=[float(v) for v in np.asarray(m["nll_loss"])], seconds=time.time() - t0)
      rows.append(row)
      print(_format(row), flush=True)
  return {"args": vars(args), "bounds": bounds, "rows": rows}


def main(argv=None) -> None:
  args = parse_args(argv)
  res = run(args)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  write_json(out / "known_answer.json", res)
  print(f"wrote {out / 'known_answer.json'}")


if __name__ == "__main__":
  main()
