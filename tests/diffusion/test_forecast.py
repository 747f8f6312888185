"""TaylorSeer's forecast (diffusion/forecast.py) on denoisers whose output is known: the steps
it computes, the extrapolation it makes between them (first order as GenAI's Lite, higher as
diffusers' TaylorSeerState, against which it is pinned), and what it keeps per guided call
and per batch."""

from __future__ import annotations

import numpy as np
import pytest

from modelkiln.diffusion.denoise import Conditioning
from modelkiln.diffusion.forecast import ForecastSchedule, TaylorSeerDenoiser

CONDITIONING = Conditioning(np.zeros((2, 3, 4), np.float32))


class Polynomial:
    """A denoiser whose output on step `index` is coefficients · (1, index, index²), one row
    per sample; it records the steps it was called on."""

    def __init__(self, *coefficients: float) -> None:
        self.coefficients = coefficients
        self.calls: list[tuple[int, int]] = []  # (step, batch)
        self.step = 0

    def value(self, step: int) -> float:
        return float(sum(c * step**power for power, c in enumerate(self.coefficients)))

    def __call__(self, sample: np.ndarray, timestep: float, _: Conditioning) -> np.ndarray:
        self.calls.append((self.step, len(sample)))
        return np.full_like(sample, self.value(self.step))


def run(
    denoiser: Polynomial, schedule: ForecastSchedule, guided_steps: int | None = None
) -> list[float]:
    """The loop's calls: start_step, then one call of the step's batch (2 guided, 1 not)."""
    forecasting = TaylorSeerDenoiser(denoiser, schedule)
    outputs = []
    for index in range(schedule.steps):
        guided = guided_steps is None or index < guided_steps
        denoiser.step = index
        forecasting.start_step(index, guided)
        batch = 2 if guided else 1
        outputs.append(
            float(
                forecasting(np.zeros((batch, 4, 2, 2), np.float32), 1.0, CONDITIONING)[0, 0, 0, 0]
            )
        )
    return outputs


def test_schedule_computes_the_steps_openvino_genai_computes() -> None:
    """GenAI's TaylorSeerState: the warm-up (at least 2 steps), then the last step of each
    interval counted from the warm-up's last step, and the cooldown."""
    schedule = ForecastSchedule(interval=3, warmup=2, cooldown=1, steps=10)
    assert [i for i in range(10) if schedule.computes(i)] == [0, 1, 4, 7, 9]
    # GenAI's defaults (cache_interval 3, disable_cache_before_step 6, after -2), 20 steps
    defaults = ForecastSchedule(interval=3, warmup=6, cooldown=2, steps=20)
    computed = [i for i in range(20) if defaults.computes(i)]
    assert computed == [0, 1, 2, 3, 4, 5, 8, 11, 14, 17, 18, 19]
    assert all(ForecastSchedule(1, 0, 0, 7).computes(i) for i in range(7))
    assert [i for i in range(9) if ForecastSchedule(4, 0, 0, 9).computes(i)] == [0, 1, 5]


def test_a_linear_output_is_forecast_exactly_between_computed_steps() -> None:
    denoiser = Polynomial(5.0, -0.25)
    outputs = run(denoiser, ForecastSchedule(interval=3, warmup=2, cooldown=1, steps=10))
    assert [step for step, _ in denoiser.calls] == [0, 1, 4, 7, 9]
    np.testing.assert_allclose(outputs, [denoiser.value(i) for i in range(10)], rtol=1e-6)


def test_the_forecast_is_first_order_from_the_last_two_computed_steps() -> None:
    denoiser = Polynomial(1.0, 0.0, 1.0)  # 1 + i²: a first-order forecast misses by a known amount
    outputs = run(denoiser, ForecastSchedule(interval=3, warmup=2, cooldown=1, steps=10))
    # Steps 2, 3 from steps 0 (1) and 1 (2): 2 + k; steps 5, 6 from 1 and 4 (17): 17 + 5k;
    # step 8 from 4 and 7 (50): 50 + 11.
    expected = {2: 3, 3: 4, 5: 22, 6: 27, 8: 61}
    for step, value in expected.items():
        assert outputs[step] == pytest.approx(value)
    for step in (0, 1, 4, 7, 9):
        assert outputs[step] == denoiser.value(step)


def test_a_second_order_forecast_misses_a_quadratic_by_less() -> None:
    """The paper's (and diffusers') Taylor series of divided differences: on 1 + i², with
    computed steps h = 3 apart, the second derivative is exact (2) and the first is the last
    interval's slope, so a forecast s steps on misses by h·s, where first order misses by
    h·s + s²."""
    schedule = ForecastSchedule(interval=3, warmup=2, cooldown=1, steps=14, order=2)
    denoiser = Polynomial(1.0, 0.0, 1.0)
    outputs = run(denoiser, schedule)
    first = run(Polynomial(1.0, 0.0, 1.0), ForecastSchedule(3, 2, 1, 14))
    # Computed: 0, 1, 4, 7, 10, 13. Steps 8, 9 from 7 (after 4 and 1), 11, 12 from 10.
    for step, since in ((8, 1), (9, 2), (11, 1), (12, 2)):
        true = denoiser.value(step)
        assert true - outputs[step] == pytest.approx(3 * since)
        assert true - first[step] == pytest.approx(3 * since + since**2)
    # Steps 2, 3 follow two computed steps: one derivative, the first-order forecast.
    assert outputs[2:4] == first[2:4]


@pytest.mark.torch
@pytest.mark.parametrize("order", [1, 2, 3])
def test_forecasts_equal_diffusers_taylorseer_state(order: int) -> None:
    """diffusers' TaylorSeerState (its max_order), fed the outputs our schedule computed,
    predicts what we forecast on every other step."""
    torch = pytest.importorskip("torch")
    taylorseer = pytest.importorskip("diffusers.hooks.taylorseer_cache")
    schedule = ForecastSchedule(interval=3, warmup=2, cooldown=1, steps=14, order=order)
    denoiser = Polynomial(0.5, -1.0, 0.25, -0.01)
    outputs = run(denoiser, schedule)
    state = taylorseer.TaylorSeerState(taylor_factors_dtype=torch.float64, max_order=order)
    for step, output in enumerate(outputs):
        state.current_step = step
        if schedule.computes(step):
            state.update((torch.tensor([output], dtype=torch.float64),))
        else:
            (predicted,) = state.predict()
            assert output == pytest.approx(float(predicted[0]), rel=1e-5), step


def test_a_changed_batch_computes_until_it_has_a_derivative() -> None:
    """Guidance ends after step 2: what was kept belongs to the guided batch, so steps 3 and
    4 compute on the prompt's half (3 would have been forecast) before any forecast of it."""
    denoiser = Polynomial(3.0, 0.5)
    outputs = run(denoiser, ForecastSchedule(3, 2, 1, 10), guided_steps=3)
    assert denoiser.calls == [(0, 2), (1, 2), (3, 1), (4, 1), (7, 1), (9, 1)]
    np.testing.assert_allclose(outputs, [denoiser.value(i) for i in range(10)], rtol=1e-6)


def test_split_guidance_forecasts_each_call_on_its_own() -> None:
    """Two calls per step (the negative half, then the positive): each keeps its outputs."""
    halves = [Polynomial(1.0, 2.0), Polynomial(-4.0, 0.5)]
    order = iter(halves * 10)

    def split(sample: np.ndarray, timestep: float, conditioning: Conditioning) -> np.ndarray:
        return next(order)(sample, timestep, conditioning)

    forecasting = TaylorSeerDenoiser(split, ForecastSchedule(3, 2, 0, 8))
    for index in range(8):
        for half in halves:
            half.step = index
        forecasting.start_step(index, guided=True)
        for half in halves:
            value = forecasting(np.zeros((1, 2), np.float32), 1.0, CONDITIONING)[0, 0]
            assert value == pytest.approx(half.value(index))
