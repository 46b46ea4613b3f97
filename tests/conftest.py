"""Shared pytest set-up: CPU only, 8 simulated devices, absl flags parsed (grain needs it)."""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()

import pytest  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("ALIT_SHARED", REPO.parent / "shared"))
REFERENCE = SHARED / "reference"


@pytest.fixture(scope="session")
def reference_dir():
  """`../shared/reference`, or skip with a clear message when it is absent."""
  if not REFERENCE.is_dir():
    pytest.skip(
      f"reference vectors not found at {REFERENCE} (set ALIT_SHARED to the shared/ folder)"
    )
  return REFERENCE
