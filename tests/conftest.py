"""Test setup: 8 simulated CPU devices, float32 matmuls at full precision."""

import os

# Must happen before jax is imported anywhere.
# Appended, not set-if-absent: an XLA_FLAGS already in the environment (even an empty one)
# must not silently leave the suite on one device.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
