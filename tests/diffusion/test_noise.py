"""TorchGenerator against torch itself: same seed, same calls, the same float32 bits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modelkiln.diffusion.noise import TorchGenerator, _fma
from modelkiln.errors import InputError

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]
SEEDS = [0, 1, 42, 2**32 + 5, 0xDEADBEEF_CAFEF00D, -1, -(2**63), 2**64 - 1]
SHAPES = [(), (1,), (7,), (15,), (16,), (17,), (33,), (1, 4, 8, 8), (2, 4, 64, 64), (3, 5, 7)]
# On x86 torch fills >= 16 values with its AVX2 kernel (AVX-512 CPUs included), which
# TorchGenerator reproduces bit for bit. Without AVX2 torch calls the C library's logf/sinf/
# cosf instead: within 2.3e-6 of the AVX2 values over 1M draws (torch 2.14.1, glibc 2.36).
BIT_EXACT = torch.backends.cpu.get_cpu_capability() in {"AVX2", "AVX512"}


def torch_randn(generator: torch.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return torch.randn(shape, generator=generator, dtype=torch.float32).numpy()


def assert_same(mine: np.ndarray, reference: np.ndarray) -> None:
    assert mine.dtype == np.float32
    assert mine.flags.c_contiguous
    assert mine.shape == reference.shape
    if BIT_EXACT or reference.size < 16:
        np.testing.assert_array_equal(mine.view(np.uint32), reference.view(np.uint32))
    else:
        np.testing.assert_allclose(mine, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_one_call_matches_torch(seed: int, shape: tuple[int, ...]) -> None:
    reference = torch.Generator("cpu").manual_seed(seed)
    assert_same(TorchGenerator(seed).randn(shape), torch_randn(reference, shape))


SEQUENCES = {
    # the cached sine sample of a small call is used by the next small call, after large ones
    "small-large-small": [(1,), (16,), (3,), (2, 4, 8, 8), (1,), ()],
    "odd-small-counts": [(3,), (5,), (1,), (15,), (7,)],
    # the last 16 values of a ragged large call are drawn afresh: the stream moves on by 16
    "ragged-large": [(17,), (31,), (1,), (33,), (4, 5, 7), (100,)],
    "empty-in-between": [(1,), (0,), (3, 0, 2), (1,), (0,), (16,), (1,)],
    "latents": [(1, 4, 64, 64), (1,), (2, 4, 32, 32), (5,)],
}


@pytest.mark.parametrize("shapes", SEQUENCES.values(), ids=list(SEQUENCES))
@pytest.mark.parametrize("seed", [0, 42, 2**32 + 5])
def test_successive_calls_match_torch(seed: int, shapes: list[tuple[int, ...]]) -> None:
    reference = torch.Generator("cpu").manual_seed(seed)
    mine = TorchGenerator(seed)
    for shape in shapes:
        assert_same(mine.randn(shape), torch_randn(reference, shape))


def test_manual_seed_restarts_the_stream_and_drops_the_cached_sample() -> None:
    reference = torch.Generator("cpu").manual_seed(3)
    mine = TorchGenerator(3)
    for _ in range(2):
        assert_same(mine.randn((1,)), torch_randn(reference, (1,)))  # leaves a cached sample
        assert mine.manual_seed(7) is mine
        reference.manual_seed(7)
        for shape in [(1,), (20,), (2,)]:
            assert_same(mine.randn(shape), torch_randn(reference, shape))
        mine.manual_seed(3)
        reference.manual_seed(3)


@pytest.mark.parametrize("seed", SEEDS)
def test_initial_seed_is_torch_s(seed: int) -> None:
    assert TorchGenerator(seed).initial_seed() == torch.Generator().manual_seed(seed).initial_seed()


def test_an_int_shape_is_one_dimension() -> None:
    reference = torch.Generator("cpu").manual_seed(5)
    mine = TorchGenerator(5)
    assert_same(mine.randn(20), torch_randn(reference, (20,)))
    assert_same(mine.randn(np.int64(4)), torch_randn(reference, (4,)))


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 1.5, True, "3", None])
def test_a_seed_torch_would_refuse_is_an_input_error(seed: object) -> None:
    with pytest.raises(InputError, match="seed"):
        TorchGenerator(seed)  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(-1,), (2, -3), (1.5,), (True,), None, "ab", -2])
def test_a_bad_shape_is_an_input_error(shape: object) -> None:
    with pytest.raises(InputError, match="shape must be a tuple of non-negative integers"):
        TorchGenerator(0).randn(shape)  # type: ignore[arg-type]


def test_fma_rounds_once_where_float64_then_float32_would_round_twice() -> None:
    # a*b + c = (1 + 2**-23) + 2**-24 - 2**-70: just below the float32 midpoint, so it rounds
    # down to c; through float64 it lands on the midpoint and rounds to even, up.
    a = np.array([2.0**-24 * (1 + 2.0**-23)], dtype=np.float32)
    b = np.float32(1 - 2.0**-23)
    c = np.array([1 + 2.0**-23], dtype=np.float32)
    twice = (a.astype(np.float64) * np.float64(b) + c.astype(np.float64)).astype(np.float32)
    assert twice[0] != c[0]
    assert _fma(a, b, c)[0] == c[0]


def test_importing_it_does_not_import_torch() -> None:
    code = "import modelkiln.diffusion.noise, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
