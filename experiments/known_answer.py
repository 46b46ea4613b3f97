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
import math
import pathlib
import time

import _common  # noqa: F401  (puts the repository on sys.path)
import jax
import numpy as np
from _common import write_json

from alit_jax.analysis import known_answer as ka
from alit_jax.models.alit import ALIT
from alit_jax.train import steps


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--bits", type=int, default=16)
  p.add_argument("--grid", type=int, default=16, help="side of the base code map")
  p.add_argument("--tokens", type=int, default=8, help="latent tokens per iteration")
  p.add_argument("--codes", type=int, default=2, help="latent codebook size")
  p.add_argument("--iters", type=int, default=2, help="rollout iterations")
  p.add_argument("--continuous", action="store_true", help="unquantized latents")
  p.add_argument("--commitment", type=float, default=0.25, help="quantizer commitment weight")
  p.add_argument(
    "--decoder-embed-scale",
    type=float,
    default=1.0,
    help="probe: multiply decoder_embed's kernel at init (its output is ~0.02 sqrt(width))",
  )
  p.add_argument("--width", type=int, default=64)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--warmup-steps", type=int, default=50)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--log-every", type=int, default=25)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="runs/known_answer")
  return p.parse_args(argv)


def run(args) -> dict:
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
    quantize_latent=not args.continuous,
    commitment_cost=args.commitment,
  )
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
  state = steps.init_train_state(params, ka.SPEC)
  rng = np.random.default_rng(args.seed)
  codebook = problem.codebook(args.seed)
  probe = problem.batch(np.random.default_rng(10_000 + args.seed), codebook, 64)
  bounds = [
    0.0
    if args.continuous
    else ka.nll_bound(args.bits, args.tokens * (i + 1) * math.log2(args.codes))
    for i in range(args.iters)
  ]
  print(f"information bound per iteration (nats/position): {[round(b, 3) for b in bounds]}")
  rows, t0 = [], time.time()
  for s in range(args.steps + 1):
    usage = ka.code_usage(model, state["params"], probe) if s % args.log_every == 0 else None
    state, m = step(state, problem.batch(rng, codebook, args.batch_size))
    if usage is not None:
      nll = [float(v) for v in np.asarray(m["nll_loss"])]
      rows.append(dict(step=s, nll=nll, seconds=time.time() - t0, **usage))
      extra = " ".join(f"{k} {v:.3f}" for k, v in usage.items())
      print(f"step {s:5d}  nll " + " ".join(f"{v:.4f}" for v in nll) + f"  {extra}", flush=True)
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
