"""The matmul roofline: FLOP counts against hand-counted values, floors, and real peaks."""

from __future__ import annotations

import pytest

from modelkiln.bench.roofline import Floor, Peak, count_flops, floor_seconds, measure_peak
from modelkiln.errors import InputError

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch


def test_a_linear_layer_counts_two_flops_per_multiply_add() -> None:
    assert count_flops(torch.nn.Linear(64, 32), torch.randn(5, 64)) == 2 * 5 * 64 * 32


def test_a_convolution_counts_every_output_times_its_receptive_field() -> None:
    conv = torch.nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1)
    # (2, 3, 16, 16) -> (2, 8, 8, 8); each output: 3 * 3 * 3 multiply-adds
    assert count_flops(conv, torch.randn(2, 3, 16, 16)) == 2 * (2 * 8 * 8 * 8) * (3 * 3 * 3)


def test_attention_counts_on_cpu_and_on_meta_tensors() -> None:
    def attention(q: object) -> object:
        return torch.nn.functional.scaled_dot_product_attention(q, q, q)

    # q @ k^T and weights @ v: two (16 x 8) x (8 x 16)-sized matmuls per head, 2 heads
    expected = 2 * (2 * 2 * 16 * 16 * 8)
    assert count_flops(attention, torch.randn(1, 2, 16, 8)) == expected
    assert count_flops(attention, torch.randn(1, 2, 16, 8, device="meta")) == expected


def test_the_floor_is_flops_over_the_peak_and_x_floor_the_time_over_it() -> None:
    peak = Peak("bf16", 2e11, "torch.mm bf16 (oneDNN)", 1024)
    assert floor_seconds(10**12, peak) == pytest.approx(5.0)
    floor = Floor(10**12, peak)
    assert floor.seconds == pytest.approx(5.0)
    assert floor.times(7.5) == pytest.approx(1.5)
    with pytest.raises(InputError, match="negative"):
        floor_seconds(-1, peak)
    with pytest.raises(InputError, match="positive"):
        floor.times(0.0)


def test_the_fp32_peak_is_measured_at_the_size_asked() -> None:
    peak = measure_peak("fp32", 1, size=256, seconds=0.2)
    assert peak is not None
    assert (peak.precision, peak.size) == ("fp32", 256)
    assert peak.ops_per_s > 1e8
    # whichever of the two fp32 kernel paths was faster on this host, named
    assert peak.how.startswith(("torch.mm fp32", "OpenVINO MatMul fp32"))


def test_the_threads_setting_is_restored() -> None:
    before = torch.get_num_threads()
    measure_peak("bf16", 1, size=128, seconds=0.05)
    assert torch.get_num_threads() == before


def test_the_int8_peak_names_the_kernel_that_reached_it() -> None:
    peak = measure_peak("int8", 1, size=256, seconds=0.2)
    assert peak is not None
    assert (peak.precision, peak.size) == ("int8", 256)
    assert peak.how.startswith(("torch._int_mm", "onnxruntime MatMulInteger"))
    assert peak.ops_per_s > 1e8


def test_an_unknown_precision_is_refused_with_the_choices() -> None:
    with pytest.raises(
        InputError, match=r"unknown precision 'fp33'.*did you mean 'fp32'.*fp32, bf16, int8"
    ):
        measure_peak("fp33", 1)
    with pytest.raises(InputError, match="positive"):
        measure_peak("fp32", 0)
