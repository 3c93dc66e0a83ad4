"""The reference precision's fp32 CPU kernel (engine.kernels.OneDnnLinear): a row's bits do not depend on
how many rows share the call. On Zen 4 (AVX-512) oneDNN computed a single row of the 576x1536 down
projection with another kernel, so a 1-row pass (plain decoding) and a verify pass disagreed in the last
bits; this test failed there before the one-row case went through the two-row kernel."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import OneDnnLinear


@pytest.mark.parametrize("shape", [(576, 576), (1536, 576), (576, 1536), (192, 576)])
def test_onednn_rows_do_not_depend_on_the_number_of_rows(shape):
    g = torch.Generator().manual_seed(0)
    lin = OneDnnLinear(torch.randn(*shape, generator=g), torch.randn(shape[0], generator=g))
    x = torch.randn(40, shape[1], generator=g)
    full = lin(x)
    for m in range(1, 41):
        assert torch.equal(lin(x[:m]), full[:m]), m
    for i in range(40):
        assert torch.equal(lin(x[i : i + 1])[0], full[i]), i
