"""README.md's API example runs as written, and its data passes the checks done outside jit."""
import contextlib
import io
import pathlib

import jax
import numpy as np

import diffusion_jax as dj

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_the_api_example_runs_and_prints_what_it_says():
    code = README.read_text().split("## The API", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    scope, out = {}, io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), scope)  # noqa: S102
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("loss (8,) ") and lines[1:] == ["nll bits/dim (8,) (8, 1000)",
                                                                "samples (4, 16, 16, 1)"]
    # A zero model predicts eps = 0: the simple loss is E|eps|^2 = 1 (8 * 256 draws: within ~0.1).
    assert abs(float(lines[0].split()[-1]) - 1.0) < 0.15
    # The data is on the 8-bit grid: the bound's eager check accepts it, and gives jit's values.
    eager = dj.nll_bpd(scope["model_fn"], scope["schedule"], scope["x0"], scope["key_nll"])
    np.testing.assert_allclose(np.asarray(eager.total), np.asarray(scope["nll"].total), rtol=1e-5)
    # One key per use: the noise is not a copy of the data.
    corr = np.corrcoef(np.ravel(scope["x0"]), np.ravel(scope["noise"]))[0, 1]
    assert abs(corr) < 0.1
    assert isinstance(scope["samples"], jax.Array)
