"""Writes demo.ipynb and token_attention.ipynb (run after editing the cells below).

    python experiments/colab/make_notebooks.py

The notebooks import the package and define no model code of their own. They read the model
from $ALIT_MODEL (default "demo", the bundled model), so the test suite can run them as they are.
"""

import pathlib

import nbformat as nbf

HERE = pathlib.Path(__file__).resolve().parent

INSTALL = """# Colab: install alit-jax (skipped when it is already importable, e.g. in the test suite).
import importlib.util
if importlib.util.find_spec("alit_jax") is None:
  # Point this at your copy of the repository (a git URL or an uploaded folder).
  !pip install -q "git+https://github.com/alit-jax/alit-jax.git"
"""

SETUP = """import os
import pathlib

import matplotlib.pyplot as plt
import numpy as np

import alit_jax
from alit_jax import Tokenizer
from alit_jax.images import list_images, load_image

# "demo" is the small model bundled with the package (no download). For an official checkpoint:
#   tok = Tokenizer.from_pytorch("alit_small_vqgan_quantized_latents.pth")
# or convert it once with `python -m alit_jax.convert CKPT --out DIR` and use DIR here.
MODEL = os.environ.get("ALIT_MODEL", "demo")
tok = Tokenizer.load(MODEL)
print(tok.config.name, "| image size", tok.image_size, "| token counts", tok.token_counts)
"""

DEMO_CELLS = [
  ("markdown", "# ALIT in JAX: adaptive-length image tokens\n\nThe bundled demo model "
   "(or any converted checkpoint) turns each image into 32 to 256 tokens. Simple images need "
   "few tokens, complex ones many."),
  ("code", INSTALL),
  ("code", SETUP),
  ("markdown", "## Sample images shipped with the package"),
  ("code", """samples = pathlib.Path(alit_jax.__file__).parent / "assets" / "samples"
files = list_images([samples])
images = np.stack([load_image(f, tok.image_size) for f in files])
names = [pathlib.Path(f).stem for f in files]
fig, axes = plt.subplots(1, len(images), figsize=(2 * len(images), 2.3))
for ax, im, n in zip(axes, images, names):
  ax.imshow(im); ax.set_title(n, fontsize=7); ax.axis("off")
plt.show()
"""),
  ("markdown", "## Reconstructions at every token count\n\n`rollout` runs all iterations and "
   "returns the reconstruction after each (32, 64, ..., 256 tokens)."),
  ("code", """trace = tok.rollout(images)
recon = np.clip(np.asarray(trace["reconstructions"]), 0, 1)  # (N, B, H, W, 3)
l1 = np.abs(recon - images[None] / 255.0).mean(axis=(2, 3, 4))  # (N, B)
n = len(tok.token_counts)
fig, axes = plt.subplots(len(images), n + 1, figsize=(1.6 * (n + 1), 1.6 * len(images)))
for b in range(len(images)):
  axes[b, 0].imshow(images[b]); axes[b, 0].set_ylabel(names[b], fontsize=7)
  for i in range(n):
    axes[b, i + 1].imshow(recon[i, b])
    axes[b, i + 1].set_title(f"{tok.token_counts[i]}: {l1[i, b]:.3f}", fontsize=6)
for ax in axes.ravel():
  ax.set_xticks([]); ax.set_yticks([])
plt.tight_layout(); plt.show()
print("mean L1 per token count:", dict(zip(tok.token_counts, np.round(l1.mean(1), 4))))
"""),
  ("markdown", "## Per-image minimum length\n\n`encode` keeps, per image, the fewest tokens whose "
   "reconstruction L1 is below the threshold (and stops iterating once every image is done)."),
  ("code", """threshold = tok.default_threshold("l1")  # 0.07, or the model's own (the demo records one)
enc = tok.encode(images, criterion="l1", threshold=threshold)
for n_, length, s in zip(names, np.asarray(enc.lengths), np.asarray(enc.scores).T):
  print(f"{n_:>24}: {int(length):3d} tokens")
decoded = np.asarray(tok.decode(enc.tokens, enc.lengths))
print("decode(tokens) reproduces the chosen reconstruction:",
      np.allclose(decoded, np.asarray(enc.reconstructions), atol=1e-4))
"""),
  ("markdown", "## Token count vs image complexity\n\nComplexity = PNG bits per pixel."),
  ("code", """from alit_jax.analysis import complexity

bpp = np.array([complexity.png_bits_per_pixel(im) for im in images])
lengths = np.asarray(enc.lengths)
print("Spearman(tokens, PNG bits/pixel):", complexity.spearman(lengths, bpp))
plt.figure(figsize=(4, 3))
plt.scatter(bpp, lengths)
for x, y, n_ in zip(bpp, lengths, names):
  plt.annotate(n_, (x, y), fontsize=6)
plt.xlabel("PNG bits per pixel"); plt.ylabel("tokens chosen"); plt.tight_layout(); plt.show()
"""),
]

ATTN_CELLS = [
  ("markdown", "# Where do latent tokens look?\n\nDecoder attention between the 1D latent "
   "tokens and the 2D positions, at every rollout iteration (the paper's object-discovery "
   "figure)."),
  ("code", INSTALL),
  ("code", SETUP),
  ("code", """from alit_jax.analysis import attention

samples = pathlib.Path(alit_jax.__file__).parent / "assets" / "samples"
image = load_image(sorted(list_images([samples]))[0], tok.image_size)
att = attention.decoder_attention(tok, image)
print("layer", att["layer"], "| maps", att["image_to_latent"].shape)
"""),
  ("markdown", "Rows: iterations. Columns: the input, which latent token each position attends "
   "to most, then the maps of the first latent tokens."),
  ("code", """out = pathlib.Path("attention_out"); out.mkdir(exist_ok=True)
attention.plot_iterations(image, att, out / "attention_iterations.png", num_tokens=6)
from IPython.display import Image, display
display(Image(filename=str(out / "attention_iterations.png")))
"""),
  ("code", """# All latent tokens of the last iteration.
last = len(att["num_tokens"]) - 1
attention.plot_tokens(image, att, last, out / "attention_last.png")
display(Image(filename=str(out / "attention_last.png")))
"""),
]


def write(cells, path):
  nb = nbf.v4.new_notebook()
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
  nb.cells = [nbf.v4.new_markdown_cell(s) if k == "markdown" else nbf.v4.new_code_cell(s) for k, s in cells]
  for i, cell in enumerate(nb.cells):
    cell["id"] = f"{pathlib.Path(path).stem}-{i:02d}"  # stable ids: no diff on regeneration
  nbf.write(nb, path)


if __name__ == "__main__":
  write(DEMO_CELLS, HERE / "demo.ipynb")
  write(ATTN_CELLS, HERE / "token_attention.ipynb")
  print("wrote", HERE / "demo.ipynb", HERE / "token_attention.ipynb")
