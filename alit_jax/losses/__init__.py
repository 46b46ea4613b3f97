"""Stage-2 fine-tuning losses: LPIPS, PatchGAN discriminator, adversarial-loss functions."""

from alit_jax.losses.discriminator import BatchNorm2d, NLayerDiscriminator
from alit_jax.losses.gan import (
  adaptive_weight,
  convert_gan_losses,
  disc_factor,
  gan_optimizer_idx,
  gan_weight_schedule,
  generator_loss,
  hinge_d_loss,
  nll_loss,
  vanilla_d_loss,
)
from alit_jax.losses.lpips import (
  LPIPS,
  load_lpips,
  lpips_from_state_dict,
  lpips_from_torchvision,
)

__all__ = [
  "LPIPS",
  "BatchNorm2d",
  "NLayerDiscriminator",
  "adaptive_weight",
  "convert_gan_losses",
  "disc_factor",
  "gan_optimizer_idx",
  "gan_weight_schedule",
  "generator_loss",
  "hinge_d_loss",
  "load_lpips",
  "lpips_from_state_dict",
  "lpips_from_torchvision",
  "nll_loss",
  "vanilla_d_loss",
]
