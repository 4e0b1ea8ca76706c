"""TFDS dataset builders that ship with diffusion_jax (offline, no TensorFlow).

`Digits`: scikit-learn's 8x8 handwritten digits, train 1500 / test 297. The
builders are not registered with TFDS on import; `diffusion_jax.input_pipeline`
constructs them directly for `DataConfig(name="digits")`.
"""

from diffusion_jax.datasets.digits import Digits

__all__ = ["Digits"]
