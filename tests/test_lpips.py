"""LPIPS (VGG16) in Flax: properties, plain-torch equivalence, conversion and file loading."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alit_jax.convert import mapping
from alit_jax.losses import lpips as lp

H = W = 32  # smallest comfortable size for four 2x2 max-pools


def random_lpips_variables(seed=0):
  """He-scaled random LPIPS weights from numpy (much faster than a Flax init of 14.7M params);
  heads non-negative as in real LPIPS."""
  rng = np.random.default_rng(seed)

  def make(path, s):
    if len(s.shape) != 4:
      return np.zeros(s.shape, np.float32)
    w = rng.standard_normal(s.shape, dtype=np.float32) * np.sqrt(2.0 / np.prod(s.shape[:3]))
    w = w.astype(np.float32)
    return np.abs(w) if path[1].key.startswith("lin") else w

  return jax.tree_util.tree_map_with_path(make, lp.lpips_target())


@pytest.fixture(scope="module")
def lpips_vars():
  return random_lpips_variables()


def _lpips(variables, a, b, rng=None):
  if rng is None:
    return lp.LPIPS().apply(variables, a, b)
  return lp.LPIPS().apply(variables, a, b, deterministic=False, rngs={"dropout": rng})


_apply = jax.jit(_lpips)


def _images(seed, b=2):
  return jax.random.uniform(jax.random.key(seed), (b, H, W, 3))


def test_identity_and_symmetry(lpips_vars):
  """LPIPS(x, x) ~ 0 (< 1e-12), LPIPS(x, y) = LPIPS(y, x) > 0, shape (B,), float32.

  Failing means the two inputs are not processed identically (scaling layer, VGG pass) or the
  distance is not a squared difference of normalised features.
  """
  x, y = _images(1), _images(2)
  dxx = np.asarray(_apply(lpips_vars, x, x, None))
  dxy = np.asarray(_apply(lpips_vars, x, y, None))
  dyx = np.asarray(_apply(lpips_vars, y, x, None))
  assert dxx.shape == (2,) and dxy.dtype == np.float32
  assert np.all(np.abs(dxx) < 1e-12), dxx  # XLA's batched conv rounds per batch position
  np.testing.assert_allclose(dxy, dyx, rtol=1e-6)
  assert np.all(dxy > 0)


def test_head_dropout_only_when_not_deterministic():
  """deterministic=False applies the heads' Dropout(0.5) (reference train mode), True does not.

  Failing means the reference's training-time LPIPS dropout cannot be reproduced or leaks into
  evaluation (the head is what LPIPS calls with its `deterministic` argument).
  """
  head = lp.NetLinLayer()
  x = jnp.ones((1, 8, 8, 16))
  v = {"params": {"model_1": {"kernel": jnp.ones((1, 1, 16, 1))}}}
  np.testing.assert_array_equal(head.apply(v, x), 16.0)
  y = np.asarray(head.apply(v, x, deterministic=False, rngs={"dropout": jax.random.key(1)}))
  # Each output is 2 x (number of kept channels): p = 0.5 and the 1 / (1 - p) rescaling.
  np.testing.assert_array_equal(y % 2, 0.0)
  assert len(np.unique(y)) > 1 and abs(y.mean() - 16.0) < 3.0
  no_drop = lp.NetLinLayer(use_dropout=False).apply(v, x, deterministic=False)
  np.testing.assert_array_equal(no_drop, 16.0)


def test_shapes_and_input_checks(lpips_vars):
  """256x256 inputs give (B,) distances; mismatched or too small inputs raise clearly.

  Failing means LPIPS cannot run at ALIT's resolution or bad input fails obscurely.
  """
  x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
  out = jax.eval_shape(lambda v, a, b: lp.LPIPS().apply(v, a, b), lpips_vars, x, x)
  assert out.shape == (2,) and out.dtype == jnp.float32
  with pytest.raises(ValueError, match="equal shape"):
    lp.LPIPS().apply(lpips_vars, jnp.zeros((2, 32, 32, 3)), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match=">= 16"):
    lp.LPIPS().apply(lpips_vars, jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 8, 8, 3)))


def test_normalize_gradient_is_finite():
  """The channel normalisation has a finite gradient at an all-zero feature vector.

  Failing means stage-2 training can produce NaN updates when a VGG feature vector is all zero.
  """
  z = jnp.zeros((1, 1, 1, 4))
  gz = jax.grad(lambda f: lp.normalize_channels(f).sum())(z)
  assert np.all(np.isfinite(np.asarray(gz)))
  f = jnp.asarray([[[[3.0, 4.0]]]])
  np.testing.assert_allclose(lp.normalize_channels(f), [[[[0.6, 0.8]]]], rtol=1e-6)


def test_scaling_constants_checked(lpips_vars):
  """lpips_from_state_dict accepts the standard ScalingLayer buffers and rejects others/absent.

  Failing means a checkpoint with a different input normalisation would load silently.
  """
  sd = mapping.tree_to_state_dict(lpips_vars, prefix="p.")
  sd["p.scaling_layer.shift"] = np.asarray(lp.LPIPS_SHIFT, np.float32).reshape(1, 3, 1, 1)
  sd["p.scaling_layer.scale"] = np.asarray(lp.LPIPS_SCALE, np.float32).reshape(1, 3, 1, 1)
  out = lp.lpips_from_state_dict(sd, "p.")
  np.testing.assert_array_equal(
    out["params"]["lin2"]["model_1"]["kernel"], lpips_vars["params"]["lin2"]["model_1"]["kernel"]
  )
  bad = dict(sd)
  bad["p.scaling_layer.shift"] = np.zeros((1, 3, 1, 1), np.float32)
  with pytest.raises(mapping.ConversionError, match="standard LPIPS constants"):
    lp.lpips_from_state_dict(bad, "p.", name="bad.pth")
  missing = {k: v for k, v in sd.items() if "scale" not in k.split(".")[-1]}
  with pytest.raises(mapping.ConversionError, match=re.escape("missing p.scaling_layer.scale")):
    lp.lpips_from_state_dict(missing, "p.")
  extra = dict(sd)
  extra["p.lin5.model.1.weight"] = np.zeros((1, 8, 1, 1), np.float32)
  with pytest.raises(mapping.ConversionError, match="p.lin5.model.1.weight"):
    lp.lpips_from_state_dict(extra, "p.")


def test_missing_weight_files_explain_origin(tmp_path):
  """load_lpips without files names torchvision's VGG16 and the lpips package heads.

  Failing means a user without weights gets an unhelpful error.
  """
  with pytest.raises(FileNotFoundError, match="torchvision") as e:
    lp.load_lpips(None, tmp_path / "vgg.pth")
  assert "lpips/weights/v0.1/vgg.pth" in str(e.value)


# ----------------------------------------------------------------------------------------------
# Plain-torch comparisons.

try:
  import torch
except ImportError:  # the comparisons below need it; the tests above do not
  torch = None

requires_torch = pytest.mark.skipif(
  torch is None, reason="torch not installed: plain-torch LPIPS checks skipped"
)

# VGG16 configuration "D" (torchvision `features` layout): channel counts and max-pools.
_VGG_D = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
_SLICE_ENDS = (4, 9, 16, 23, 30)  # exclusive ends of the five LPIPS slices in `features`


def _make_torch_lpips():
  """LPIPS written with plain torch.nn from the paper's definition (random weights)."""
  tnn = torch.nn
  layers, c = [], 3
  for v in _VGG_D:
    if v == "M":
      layers.append(tnn.MaxPool2d(2, 2))
    else:
      layers += [tnn.Conv2d(c, v, 3, padding=1), tnn.ReLU()]
      c = v

  class TorchLPIPS(tnn.Module):
    def __init__(self):
      super().__init__()
      self.features = tnn.Sequential(*layers)
      self.lins = tnn.ModuleList(tnn.Conv2d(c, 1, 1, bias=False) for c in (64, 128, 256, 512, 512))
      with torch.no_grad():
        for lin in self.lins:  # LPIPS heads are non-negative
          lin.weight.abs_()

    def slices(self, x):
      outs, start = [], 0
      for end in _SLICE_ENDS:
        for i in range(start, end):
          x = self.features[i](x)
        outs.append(x)
        start = end
      return outs

    def forward(self, a, b):
      shift = torch.tensor(lp.LPIPS_SHIFT).view(1, 3, 1, 1)
      scale = torch.tensor(lp.LPIPS_SCALE).view(1, 3, 1, 1)
      fa, fb = self.slices((a - shift) / scale), self.slices((b - shift) / scale)
      total = 0
      for lin, x, y in zip(self.lins, fa, fb):
        x = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        y = y / (y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total = total + lin((x - y) ** 2).mean((2, 3), keepdim=True)
      return total  # (B, 1, 1, 1)

  return TorchLPIPS()


@pytest.fixture(scope="module")
def torch_lpips():
  if torch is None:
    pytest.skip("torch not installed")
  torch.manual_seed(0)
  return _make_torch_lpips().eval()


def _torchvision_sd(model):
  vgg = {f"features.{k}": v.numpy() for k, v in model.features.state_dict().items()}
  vgg["classifier.0.weight"] = np.zeros((4, 4), np.float32)  # ignored by the converter
  heads = {
    f"lin{k}.model.1.weight": lin.weight.detach().numpy() for k, lin in enumerate(model.lins)
  }
  return vgg, heads


def _nchw(x):
  return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


@pytest.mark.torch
@requires_torch
def test_vgg_slices_match_torch(torch_lpips):
  """All five Flax VGG16 slices equal a plain-torch VGG16 `features` with the same weights.

  Failing means the conv layout conversion (OIHW -> HWIO), the torchvision index -> slice map,
  padding or pooling differ from torchvision's VGG16, so LPIPS with real weights would be wrong.
  """
  vgg, heads = _torchvision_sd(torch_lpips)
  variables = lp.lpips_from_torchvision(vgg, heads)
  x = np.random.default_rng(0).normal(size=(2, H, W, 3)).astype(np.float32)
  feats = lp.VGG16Features().apply({"params": variables["params"]["net"]}, x)
  with torch.no_grad():
    ref = torch_lpips.slices(_nchw(x))
  for k, (f, r) in enumerate(zip(feats, ref)):
    r = r.numpy().transpose(0, 2, 3, 1)
    assert f.shape == r.shape, k
    np.testing.assert_allclose(
      f, r, rtol=1e-4, atol=1e-5 * np.abs(r).max(), err_msg=f"slice{k + 1}"
    )


@pytest.mark.torch
@requires_torch
def test_lpips_matches_torch_and_alit_keys(torch_lpips):
  """LPIPS from ALIT-style `gan_losses.<i>.perceptual_loss.*` keys equals a plain-torch LPIPS,
  in value and in gradient w.r.t. the reconstruction.

  Failing means the perceptual term (or its gradient) of stage-2 training differs from the
  reference, or the ALIT checkpoint keys map to the wrong modules.
  """
  prefix = "gan_losses.5.perceptual_loss."
  sd = {}
  for i, t in torch_lpips.features.state_dict().items():
    idx = int(i.split(".")[0])
    s = next(k for k, end in enumerate(_SLICE_ENDS) if idx < end) + 1
    sd[f"{prefix}net.slice{s}.{i}"] = t.numpy()
  for k, lin in enumerate(torch_lpips.lins):
    sd[f"{prefix}lin{k}.model.1.weight"] = lin.weight.detach().numpy()
  sd[f"{prefix}scaling_layer.shift"] = np.asarray(lp.LPIPS_SHIFT, np.float32).reshape(1, 3, 1, 1)
  sd[f"{prefix}scaling_layer.scale"] = np.asarray(lp.LPIPS_SCALE, np.float32).reshape(1, 3, 1, 1)
  sd["gan_losses.5.discriminator.main.0.bias"] = np.zeros(64, np.float32)  # other prefix: ignored
  variables = lp.lpips_from_state_dict(sd, prefix)
  rng = np.random.default_rng(1)
  a = rng.uniform(size=(2, H, W, 3)).astype(np.float32)
  b = np.clip(a + 0.1 * rng.normal(size=a.shape), 0, 1).astype(np.float32)

  def loss(v, y):
    d = _lpips(v, a, y)
    return d.sum(), d

  (_, d), g = jax.jit(jax.value_and_grad(loss, argnums=1, has_aux=True))(variables, b)
  tb = _nchw(b).requires_grad_(True)
  ref = torch_lpips(_nchw(a), tb)
  ref.sum().backward()
  assert ref.shape == (2, 1, 1, 1)
  np.testing.assert_allclose(d, ref.detach().numpy().reshape(2), rtol=1e-4)
  gr = tb.grad.numpy().transpose(0, 2, 3, 1)
  assert np.all(np.isfinite(np.asarray(g)))
  np.testing.assert_allclose(g, gr, rtol=1e-3, atol=1e-4 * np.abs(gr).max())


@pytest.mark.torch
@requires_torch
def test_load_lpips_from_files(torch_lpips, tmp_path):
  """load_lpips reads .pth (torch.save) and .npz files into the same variables as the dicts.

  Failing means users cannot load torchvision's VGG16 file and the lpips heads file.
  """
  vgg, heads = _torchvision_sd(torch_lpips)
  torch.save({k: torch.from_numpy(v) for k, v in vgg.items()}, tmp_path / "vgg16.pth")
  np.savez(tmp_path / "heads.npz", **heads)
  got = lp.load_lpips(tmp_path / "vgg16.pth", tmp_path / "heads.npz")
  want = lp.lpips_from_torchvision(vgg, heads)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  with pytest.raises(mapping.ConversionError, match="features.30.weight"):
    lp.lpips_from_torchvision({**vgg, "features.30.weight": np.zeros(1, np.float32)}, heads)
