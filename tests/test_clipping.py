"""Every clipping mode keeps each example's contribution within the bound R the noise is scaled to."""

from __future__ import annotations

import pytest
import torch
from reference import reference_factors

from lightning_autodp.mechanism.clipping import CLIPPING_MODES, clip_factors

# Norms from 1e-8 to 1e8: fitted examples, typical ones and outliers, and exact zero.
NORMS = torch.cat([torch.zeros(1, dtype=torch.float64), torch.logspace(-8, 8, 161, dtype=torch.float64)])


@pytest.mark.parametrize("clipping", CLIPPING_MODES)
@pytest.mark.parametrize("gamma", [1e-3, 0.01, 0.1, 1.0, 10.0])
@pytest.mark.parametrize("bound", [0.1, 1.0, 3.0])
def test_each_clipped_example_has_norm_at_most_r(clipping, gamma, bound):
    factors = clip_factors(NORMS, clipping, bound, gamma)
    assert factors.dtype == torch.float64 and (factors >= 0).all()
    assert ((factors * NORMS) <= bound * (1 + 1e-12)).all()


@pytest.mark.parametrize("clipping", CLIPPING_MODES)
def test_factors_match_the_papers_formulas(clipping):
    norms = NORMS[1:]  # the reference divides by the norm for AUTO-V and Abadi
    expected = reference_factors(norms, clipping, 2.0, 0.1)
    torch.testing.assert_close(clip_factors(norms, clipping, 2.0, 0.1), expected, rtol=1e-5, atol=0)


def test_psac_damps_fitted_examples_and_normalises_the_rest():
    # The reason to use it: an example far below r keeps ~ R * ||g|| (as AUTO-S with gamma 1),
    # one far above r is normalised to ~ R (as AUTO-S with gamma 0.01).
    r, bound = 0.1, 1.0
    norms = torch.tensor([1e-4, 100.0], dtype=torch.float64)
    contribution = clip_factors(norms, "psac", bound, r) * norms
    auto_s_1 = clip_factors(norms, "auto_s", bound, 1.0) * norms
    auto_s_001 = clip_factors(norms, "auto_s", bound, 0.01) * norms
    torch.testing.assert_close(contribution[0], auto_s_1[0], rtol=1e-3, atol=0)
    torch.testing.assert_close(contribution[1], auto_s_001[1], rtol=1e-3, atol=0)
