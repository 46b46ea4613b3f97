"""Flax FID InceptionV3 vs an independent plain-torch InceptionV3 with the same random weights."""

import numpy as np
import pytest

from alit_jax.convert.mapping import ConversionError
from alit_jax.metrics import inception

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

pytestmark = pytest.mark.torch


# ---------------------------------------------------------------------------------------------
# Plain-torch FID InceptionV3 (pytorch-fid's InceptionV3([3]) on top of fid_inception_v3()),
# written here from the architecture description; torchvision is not available.


class TorchBasicConv2d(nn.Module):
  def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
    self.bn = nn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
  return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class TorchA(nn.Module):
  def __init__(self, cin, pool_features):
    super().__init__()
    self.branch1x1 = TorchBasicConv2d(cin, 64, 1)
    self.branch5x5_1 = TorchBasicConv2d(cin, 48, 1)
    self.branch5x5_2 = TorchBasicConv2d(48, 64, 5, padding=2)
    self.branch3x3dbl_1 = TorchBasicConv2d(cin, 64, 1)
    self.branch3x3dbl_2 = TorchBasicConv2d(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = TorchBasicConv2d(96, 96, 3, padding=1)
    self.branch_pool = TorchBasicConv2d(cin, pool_features, 1)

  def forward(self, x):
    b1 = self.branch1x1(x)
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(tf_avg_pool(x))
    return torch.cat([b1, b5, b3, bp], 1)


class TorchB(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = TorchBasicConv2d(cin, 384, 3, stride=2)
    self.branch3x3dbl_1 = TorchBasicConv2d(cin, 64, 1)
    self.branch3x3dbl_2 = TorchBasicConv2d(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = TorchBasicConv2d(96, 96, 3, stride=2)

  def forward(self, x):
    b3 = self.branch3x3(x)
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class TorchC(nn.Module):
  def __init__(self, cin, c7):
    super().__init__()
    self.branch1x1 = TorchBasicConv2d(cin, 192, 1)
    self.branch7x7_1 = TorchBasicConv2d(cin, c7, 1)
    self.branch7x7_2 = TorchBasicConv2d(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = TorchBasicConv2d(c7, 192, (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = TorchBasicConv2d(cin, c7, 1)
    self.branch7x7dbl_2 = TorchBasicConv2d(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = TorchBasicConv2d(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = TorchBasicConv2d(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = TorchBasicConv2d(c7, 192, (1, 7), padding=(0, 3))
    self.branch_pool = TorchBasicConv2d(cin, 192, 1)

  def forward(self, x):
    b1 = self.branch1x1(x)
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = self.branch7x7dbl_1(x)
    for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
      bd = layer(bd)
    bd = self.branch7x7dbl_5(bd)
    bp = self.branch_pool(tf_avg_pool(x))
    return torch.cat([b1, b7, bd, bp], 1)


class TorchD(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1 = TorchBasicConv2d(cin, 192, 1)
    self.branch3x3_2 = TorchBasicConv2d(192, 320, 3, stride=2)
    self.branch7x7x3_1 = TorchBasicConv2d(cin, 192, 1)
    self.branch7x7x3_2 = TorchBasicConv2d(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = TorchBasicConv2d(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = TorchBasicConv2d(192, 192, 3, stride=2)

  def forward(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_1(x)
    for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
      b7 = layer(b7)
    return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class TorchE(nn.Module):
  def __init__(self, cin, max_pool):
    super().__init__()
    self.max_pool = max_pool
    self.branch1x1 = TorchBasicConv2d(cin, 320, 1)
    self.branch3x3_1 = TorchBasicConv2d(cin, 384, 1)
    self.branch3x3_2a = TorchBasicConv2d(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3_2b = TorchBasicConv2d(384, 384, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = TorchBasicConv2d(cin, 448, 1)
    self.branch3x3dbl_2 = TorchBasicConv2d(448, 384, 3, padding=1)
    self.branch3x3dbl_3a = TorchBasicConv2d(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = TorchBasicConv2d(384, 384, (3, 1), padding=(1, 0))
    self.branch_pool = TorchBasicConv2d(cin, 192, 1)

  def forward(self, x):
    b1 = self.branch1x1(x)
    b3 = self.branch3x3_1(x)
    b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
    if self.max_pool:
      pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    else:
      pooled = tf_avg_pool(x)
    return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)


class TorchFIDInception(nn.Module):
  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3 = TorchBasicConv2d(3, 32, 3, stride=2)
    self.Conv2d_2a_3x3 = TorchBasicConv2d(32, 32, 3)
    self.Conv2d_2b_3x3 = TorchBasicConv2d(32, 64, 3, padding=1)
    self.Conv2d_3b_1x1 = TorchBasicConv2d(64, 80, 1)
    self.Conv2d_4a_3x3 = TorchBasicConv2d(80, 192, 3)
    self.Mixed_5b = TorchA(192, 32)
    self.Mixed_5c = TorchA(256, 64)
    self.Mixed_5d = TorchA(288, 64)
    self.Mixed_6a = TorchB(288)
    self.Mixed_6b = TorchC(768, 128)
    self.Mixed_6c = TorchC(768, 160)
    self.Mixed_6d = TorchC(768, 160)
    self.Mixed_6e = TorchC(768, 192)
    self.Mixed_7a = TorchD(768)
    self.Mixed_7b = TorchE(1280, max_pool=False)
    self.Mixed_7c = TorchE(2048, max_pool=True)
    # The released weights carry the 1008-way classifier; features never use it.
    self.fc = nn.Linear(2048, 1008)

  def forward(self, x):
    """x: (B, 3, H, W) in [0, 1] -> (B, 2048) pool3 features."""
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    x = 2 * x - 1
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
      x = getattr(self, f"Mixed_{name}")(x)
    return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)


def randomized_torch_inception(seed=0):
  """Random weights with He-scaled convs and random BatchNorm statistics, in eval mode."""
  torch.manual_seed(seed)
  model = TorchFIDInception()
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5)
      elif isinstance(m, nn.BatchNorm2d):
        m.weight.uniform_(0.7, 1.3)
        m.bias.normal_(0.0, 0.1)
        m.running_mean.normal_(0.0, 0.1)
        m.running_var.uniform_(0.5, 1.5)
  return model.eval()


@pytest.fixture(scope="module")
def torch_model():
  return randomized_torch_inception()


@pytest.fixture(scope="module")
def state_dict(torch_model):
  return {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_hw", [(75, 75), (400, 333), (299, 299), (7, 512)])
def test_resize_matches_torch_interpolate(in_hw):
  """If this fails, inputs are resized differently from pytorch-fid (e.g. jax.image.resize's
  antialiasing on downsampling, or a half-pixel offset), shifting every FID value."""
  x = np.random.default_rng(0).random((2, *in_hw, 3), dtype=np.float32)
  ours = np.asarray(inception.resize_bilinear_torch(x, (299, 299)))
  ref = F.interpolate(
    torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear", align_corners=False
  )
  # Weights are bit-identical; only the summation order differs (measured max 1.8e-7).
  np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=5e-7, rtol=0)


def test_state_dict_converts_strictly(state_dict):
  """If this fails, Flax parameter names or shapes no longer mirror the pytorch-fid state dict
  (pt_inception-2015-12-05 would not load), or fc.* is no longer ignored."""
  variables = inception.inception_variables_from_state_dict(state_dict)
  shapes = inception.inception_shapes()
  assert set(variables) == {"params", "batch_stats"}
  import jax

  assert jax.tree.structure(variables) == jax.tree.structure(shapes)
  n_conv = sum(k.endswith(".conv.weight") for k in state_dict)
  assert n_conv == 94  # every BasicConv2d of the FID Inception
  assert len(jax.tree.leaves(variables["batch_stats"])) == 2 * n_conv
  np.testing.assert_array_equal(
    variables["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["var"],
    state_dict["Mixed_7c.branch_pool.bn.running_var"],
  )
  np.testing.assert_array_equal(
    variables["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"],
    state_dict["Mixed_6b.branch7x7_2.conv.weight"].transpose(2, 3, 1, 0),
  )


def test_unknown_or_missing_keys_raise(state_dict):
  """If this fails, a wrong or truncated weights file would load silently (only fc.* may be
  skipped)."""
  extra = dict(state_dict)
  extra["Mixed_5b.branch9x9.conv.weight"] = np.zeros((1, 1, 1, 1), np.float32)
  with pytest.raises(ConversionError, match="Mixed_5b.branch9x9.conv.weight"):
    inception.inception_variables_from_state_dict(extra)
  aux = dict(state_dict)
  aux["AuxLogits.fc.weight"] = np.zeros((1008, 768), np.float32)
  with pytest.raises(ConversionError, match="AuxLogits"):
    inception.inception_variables_from_state_dict(aux)
  missing = {k: v for k, v in state_dict.items() if k != "Mixed_6e.branch_pool.bn.running_mean"}
  with pytest.raises(ConversionError, match="Mixed_6e/branch_pool/bn/mean"):
    inception.inception_variables_from_state_dict(missing, name="trimmed.pth")


def test_features_match_torch(torch_model, state_dict):
  """If this fails, the Flax network computes different FID features than pytorch-fid's
  architecture (block wiring, padding, pooling quirks, BatchNorm eps, resize or scaling)."""
  images = np.random.default_rng(1).random((2, 75, 75, 3), dtype=np.float32)
  with torch.no_grad():
    ref = torch_model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  variables = inception.inception_variables_from_state_dict(state_dict)
  ours = np.asarray(inception.inception_features(variables, images))
  assert ours.shape == (2, 2048) and ours.dtype == np.float32
  # The random network must produce a non-degenerate signal for the comparison to mean anything.
  assert np.isfinite(ref).all() and ref.std() > 1e-2 and np.abs(ref[0] - ref[1]).max() > 1e-3
  # Measured 4.6e-7 on CPU; float32 summation order is the only expected difference.
  err = np.abs(ours - ref).max() / np.abs(ref).max()
  assert err < 1e-5, f"max relative error {err:.2e}"


def test_load_inception_from_files(tmp_path, state_dict, monkeypatch):
  """If this fails, a user-supplied weights file (.pth or .npz, by argument or environment
  variable) cannot be loaded, or the fc.* keys in the real file are not skipped."""
  pth_path = tmp_path / inception.FID_WEIGHTS_FILE
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, pth_path)
  npz_path = tmp_path / "inception.npz"
  np.savez(npz_path, **state_dict)
  from_pth = inception.load_inception(str(pth_path))
  from_npz = inception.load_inception(npz_path)
  monkeypatch.setenv(inception.WEIGHTS_ENV, str(npz_path))
  from_env = inception.load_inception()
  key = ("Mixed_5d", "branch5x5_2", "conv", "kernel")
  expected = state_dict["Mixed_5d.branch5x5_2.conv.weight"].transpose(2, 3, 1, 0)
  for v in (from_pth, from_npz, from_env):
    leaf = v["params"]
    for k in key:
      leaf = leaf[k]
    np.testing.assert_array_equal(np.asarray(leaf), expected)


def test_missing_weights_error_is_helpful(tmp_path, monkeypatch):
  """If this fails, a user without the weights gets an unhelpful error instead of the file name,
  where to download it and how to pass it."""
  monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
  with pytest.raises(FileNotFoundError) as e:
    inception.load_inception()
  msg = str(e.value)
  assert inception.FID_WEIGHTS_FILE in msg and "github.com/mseitzer/pytorch-fid" in msg
  assert inception.WEIGHTS_ENV in msg
  with pytest.raises(FileNotFoundError, match="nowhere.pth"):
    inception.load_inception(tmp_path / "nowhere.pth")
