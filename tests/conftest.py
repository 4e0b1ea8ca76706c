"""Test configuration: 8 simulated CPU devices for the multi-device tests.

XLA reads this flag once, when the backend starts, so it must be set before
anything imports jax.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
