"""How close our numpy schedulers come to diffusers' torch ones, and why not closer.

torch's vectorised float32 sqrt is not correctly rounded on every CPU: on AMD EPYC (AVX-512,
no AMX) 18 % of a 1000-element `alphas_cumprod.sqrt()` came out one ulp off, where numpy's
sqrt is exact (on Sapphire Rapids the parity tests passed at rtol 2.5e-7 for sigmas and
atol 1e-6 for samples). The sigmas built from such square roots differ by a few ulp, and a
step's result by a few ulps of the sample it was computed from (zero-SNR's first step starts
from |x| ~ 4096·4, where one ulp is 5e-4).
"""

from __future__ import annotations

import numpy as np

SIGMA_RTOL = 4e-6
STEP_ULPS = 8 * float(np.finfo(np.float32).eps)  # of the step's input sample's largest value
