"""Test setup: 8 simulated CPU devices, float32 matmuls at full precision."""

import os

# Must happen before jax is imported anywhere.
# Appended, not set-if-absent: an XLA_FLAGS already in the environment (even an empty one)
# must not silently leave the suite on one device.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu (jax[tpu], for the ahead-of-time TPU compiles of test_aot.py / test_splash.py) loads
# only when a test asks for a TPU topology; on a host without TPUs these settings keep it quiet
# and let parallel test processes load it (no /tmp/libtpu_lockfile). The backend stays CPU.
from mopd_jax.aot import quiet_libtpu_environment  # noqa: E402  (stdlib only at import)

quiet_libtpu_environment()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
