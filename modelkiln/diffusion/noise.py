"""torch's CPU generator and ``torch.randn`` (float32) reproduced bit for bit in numpy.

diffusers draws its initial latents with ``torch.Generator("cpu").manual_seed(seed)`` and
``torch.randn(shape, generator=g)``; a device without torch gets the same noise, and so the
same image for the same seed, from ``TorchGenerator(seed).randn(shape)``.

What torch does (aten: CPUGeneratorImpl.cpp, core/MT19937RNGEngine.h,
core/DistributionsHelper.h, native/cpu/DistributionTemplates.h and avx_mathfun.h):

- the seed is kept modulo 2**64 and mt19937 is seeded with its low 32 bits (init_genrand);
- numel >= 16: one 32-bit draw per element, uniform = (draw & 0xFFFFFF) / 2**24, then
  Box-Muller over blocks of 16 (8 u1, 8 u2) in float32. If numel % 16 != 0, 16 more draws
  replace the last 16 values. On x86 this is the AVX2 kernel (also on AVX-512 CPUs: torch
  registers no AVX-512 normal kernel) whose log/sin/cos are avx_mathfun's cephes
  polynomials, compiled with fused multiply-adds; both are reproduced here exactly;
- numel < 16: per element, float64 Box-Muller from two 53-bit uniforms, each from two draws;
  the sine sample is cached in the generator and returned by the next small draw, however
  many large draws come between.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import numpy as np

from modelkiln.errors import InputError

__all__ = ["TorchGenerator"]

_F32 = np.float32
_SEED_MIN = -(2**63)
_SEED_MAX = 2**64 - 1
_BLOCK = 16  # torch's Box-Muller block: 8 u1 then 8 u2


class TorchGenerator:
    """torch's CPU generator (mt19937) and torch.randn for float32, reproduced in numpy."""

    def __init__(self, seed: int) -> None:
        self._bits = np.random.MT19937()
        self._seed = 0
        self._next_normal: float | None = None
        self.manual_seed(seed)

    def manual_seed(self, seed: int) -> TorchGenerator:
        """Reseed as torch.Generator.manual_seed does (which also drops the cached normal)."""
        self._seed = _check_seed(seed)
        _seed_mt19937(self._bits, self._seed & 0xFFFFFFFF)
        self._next_normal = None
        return self

    def initial_seed(self) -> int:
        """The seed as torch reports it: modulo 2**64."""
        return self._seed

    def randn(self, shape: int | Sequence[int]) -> np.ndarray:
        """The next ``torch.randn(shape, generator=g)`` of this generator: float32, C order."""
        dims = _check_shape(shape)
        count = math.prod(dims)
        flat = self._normal_fill(count) if count >= _BLOCK else self._normal_serial(count)
        return flat.reshape(dims)

    def _draw(self, count: int) -> np.ndarray:
        """The next ``count`` 32-bit outputs of mt19937, as uint64."""
        return self._bits.random_raw(count)

    def _normal_fill(self, count: int) -> np.ndarray:
        """torch's normal_fill: uniforms for every element, Box-Muller per block of 16."""
        out = np.empty(count, dtype=_F32)
        whole = count - count % _BLOCK
        out[:whole] = _box_muller_blocks(_uniform24(self._draw(count))[:whole])
        if whole != count:
            # torch draws 16 fresh uniforms for the last 16 values (overlapping the last block).
            out[count - _BLOCK :] = _box_muller_blocks(_uniform24(self._draw(_BLOCK)))
        return out

    def _normal_serial(self, count: int) -> np.ndarray:
        """torch's scalar path: at::normal_distribution<double> per element."""
        return np.array([self._normal_double() for _ in range(count)], dtype=_F32)

    def _normal_double(self) -> float:
        if self._next_normal is not None:
            sample, self._next_normal = self._next_normal, None
            return sample + 0.0  # val * std + mean: -0.0 becomes +0.0 as in torch
        u1 = self._uniform53()
        u2 = self._uniform53()
        radius = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._next_normal = radius * math.sin(theta)
        return radius * math.cos(theta) + 0.0

    def _uniform53(self) -> float:
        """uniform_real_distribution<double>: random64() = (first << 32) | second, low 53 bits."""
        first, second = (int(word) for word in self._draw(2))
        return (((first << 32) | second) & ((1 << 53) - 1)) * 2.0**-53


def _check_seed(seed: int) -> int:
    """The seed modulo 2**64, for the integers torch.Generator.manual_seed accepts."""
    if isinstance(seed, bool):
        raise InputError(f"seed must be an integer, got {seed!r}")
    try:
        value = operator.index(seed)
    except TypeError:
        raise InputError(f"seed must be an integer, got {seed!r}") from None
    if not _SEED_MIN <= value <= _SEED_MAX:
        raise InputError(f"seed {value} is out of range: torch accepts -2**63 to 2**64 - 1")
    return value % 2**64


def _check_shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    items = (shape,) if isinstance(shape, int | np.integer) else shape
    try:
        return tuple(_dimension(dim) for dim in items)
    except (TypeError, ValueError):
        raise InputError(f"shape must be a tuple of non-negative integers, got {shape!r}") from None


def _dimension(dim: int) -> int:
    if isinstance(dim, bool):
        raise TypeError(dim)
    value = operator.index(dim)
    if value < 0:
        raise ValueError(dim)
    return value


def _seed_mt19937(bits: np.random.MT19937, seed32: int) -> None:
    """Put ``bits`` in the state init_genrand(seed32) gives, as torch's mt19937 seeds itself.

    RandomState's integer seeding is init_genrand (numpy's own MT19937(seed) hashes the
    seed through SeedSequence instead), so its state is torch's state word for word.
    """
    state = bits.state
    state["state"] = np.random.RandomState(seed32).get_state(legacy=False)["state"]
    bits.state = state


def _uniform24(draws: np.ndarray) -> np.ndarray:
    """uniform_real_distribution<float>: the low 24 bits of each draw over 2**24 (exact)."""
    return (draws & 0xFFFFFF).astype(_F32) * _F32(2.0**-24)


def _box_muller_blocks(uniforms: np.ndarray) -> np.ndarray:
    """torch's NormalFill16<float> (AVX2) on consecutive blocks of 16 uniforms."""
    blocks = uniforms.reshape(-1, 2, 8)
    u1 = _F32(1) - blocks[:, 0]  # [0, 1) -> (0, 1] for log
    radius = np.sqrt(_F32(-2) * _log256(u1))
    sin, cos = _sincos256(_F32(2.0 * math.pi) * blocks[:, 1])
    out = np.empty_like(blocks)
    # fmadd(n, std=1, mean=0) is exact but for -0.0, which becomes +0.0.
    out[:, 0] = radius * cos + _F32(0)
    out[:, 1] = radius * sin + _F32(0)
    return out.reshape(-1)


def _fma(a: np.ndarray, b: np.ndarray | np.float32, c: np.ndarray | np.float32) -> np.ndarray:
    """float32 fused multiply-add, rounded once, as the compiled kernel computes it.

    a*b is exact in float64; a*b + c rounded to float64 and then to float32 can round twice
    the wrong way only when the float64 sum sits exactly on a float32 midpoint, so there the
    float64 sum is nudged towards its rounding error first.
    """
    product = np.asarray(a, dtype=np.float64) * np.asarray(b, dtype=np.float64)
    addend = np.asarray(c, dtype=np.float64)
    total = product + addend
    virtual = total - product  # TwoSum: error = exact sum - total
    error = (product - (total - virtual)) + (addend - virtual)
    midpoint = (total.view(np.uint64) & np.uint64(0x1FFFFFFF)) == np.uint64(0x10000000)
    fix = midpoint & (error != 0)
    if fix.any():
        total[fix] = np.nextafter(total[fix], np.where(error[fix] > 0, np.inf, -np.inf))
    return total.astype(_F32)


# avx_mathfun.h's cephes constants, as float32.
_LOG_P = [
    _F32(c)
    for c in (
        7.0376836292e-2,
        -1.1514610310e-1,
        1.1676998740e-1,
        -1.2420140846e-1,
        1.4249322787e-1,
        -1.6668057665e-1,
        2.0000714765e-1,
        -2.4999993993e-1,
        3.3333331174e-1,
    )
]
_LOG_Q1 = _F32(-2.12194440e-4)
_LOG_Q2 = _F32(0.693359375)
_SQRTHF = _F32(0.707106781186547524)
_MINUS_DP = [_F32(-0.78515625), _F32(-2.4187564849853515625e-4), _F32(-3.77489497744594108e-8)]
_SINCOF = [_F32(-1.9515295891e-4), _F32(8.3321608736e-3), _F32(-1.6666654611e-1)]
_COSCOF = [
    _F32(2.443315711809948e-005),
    _F32(-1.388731625493765e-003),
    _F32(4.166664568298827e-002),
]
_FOPI = _F32(1.27323954473516)  # 4 / pi

# The kernel is built with FMA enabled, so the compiler fuses every multiply whose result
# only feeds an add into that add (the first such multiply, where an add has two). The
# fused sites below are the ones that reproduce torch's output bit for bit.


def _horner(coefficients: list[np.float32], x: np.ndarray) -> np.ndarray:
    """c0*x**(n-1) + ... + c(n-1), one fused multiply-add per step."""
    y = np.full_like(x, coefficients[0])
    for coefficient in coefficients[1:]:
        y = _fma(y, x, coefficient)
    return y


def _log256(x: np.ndarray) -> np.ndarray:
    """avx_mathfun's log256_ps for x in (0, 1] (no NaN or denormal handling needed)."""
    bits = x.view(np.int32)
    exponent = ((bits >> 23) - 0x7F).astype(_F32) + _F32(1)
    x = ((bits & ~0x7F800000) | _F32(0.5).view(np.int32)).view(_F32)  # mantissa in [0.5, 1)
    small = x < _SQRTHF
    x = (x - _F32(1)) + np.where(small, x, _F32(0))
    exponent = exponent - np.where(small, _F32(1), _F32(0))
    z = x * x
    y = _fma(_horner(_LOG_P, x) * x, z, exponent * _LOG_Q1)
    y = y - z * _F32(0.5)  # z * 0.5 is exact: fused or not, one rounding
    return _fma(exponent, _LOG_Q2, x + y)


def _sincos256(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """avx_mathfun's sincos256_ps: (sin x, cos x) for float32 x."""
    sign_sin = x.view(np.uint32) & np.uint32(0x80000000)
    x = np.abs(x)
    octant = (x * _FOPI).astype(np.int32)  # cvttps: truncation
    octant = (octant + 1) & ~1
    y = octant.astype(_F32)
    sign_sin = sign_sin ^ ((octant & 4) << 29).view(np.uint32)
    sign_cos = ((~(octant - 2) & 4) << 29).view(np.uint32)
    use_sin_poly = (octant & 2) == 0
    # "Extended precision modular arithmetic": x - y * pi/4 in three parts.
    for part in _MINUS_DP:
        x = _fma(y, part, x)
    z = x * x
    cos_poly = _horner(_COSCOF, z)
    cos_poly = _fma(cos_poly * z, z, -(z * _F32(0.5))) + _F32(1)
    sin_poly = _fma(_horner(_SINCOF, z) * z, x, x)
    # The kernel selects by masking and adding +0.0, which turns a -0.0 into +0.0.
    sin = np.where(use_sin_poly, sin_poly, cos_poly) + _F32(0)
    cos = np.where(use_sin_poly, cos_poly, sin_poly) + _F32(0)
    return (sin.view(np.uint32) ^ sign_sin).view(_F32), (cos.view(np.uint32) ^ sign_cos).view(_F32)
