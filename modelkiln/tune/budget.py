"""`kiln tune --budget`: how much quality a faster build may cost, as the build's own gate.

A budget is the end-to-end bounds of [validation], so every candidate is judged by the same
code that gates any build: top-1 drop on labelled images for classifiers, PSNR / SSIM against
the fp32 torch pipeline's images for generators, cosine of the outputs for embeddings. A
candidate whose build misses them is outside the budget, with the build's numbers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

from modelkiln.errors import InputError, did_you_mean

# budget key -> ([validation] key, what it bounds)
KEYS = {
    "top1-drop": ("max_accuracy_drop", "percentage points of top-1 lost on labelled images"),
    "psnr": ("min_psnr_db", "dB of PSNR against the torch pipeline's images"),
    "ssim": ("min_ssim", "SSIM against the torch pipeline's images"),
    "cosine": ("min_cosine", "cosine of every output against torch"),
}


@dataclass(frozen=True)
class Budget:
    """[validation] bounds by key (max_accuracy_drop, min_psnr_db, min_ssim, min_cosine)."""

    bounds: tuple[tuple[str, float], ...]

    @property
    def text(self) -> str:
        names = {key: name for name, (key, _) in KEYS.items()}
        return ", ".join(f"{names[key]}={value:g}" for key, value in self.bounds)

    def overrides(self, data: str | None, prompts: Sequence[str], steps: int | None) -> list[str]:
        """The --set overrides that make a build gate on this budget: the bounds, the
        labelled images (which calibrate too, where a scheme needs it) or the prompts."""
        found = [f"validation.{key}={value!r}" for key, value in self.bounds]
        bounded = dict(self.bounds)
        if "max_accuracy_drop" in bounded:
            # The budget is top-1 on real images: the profile's own bounds on how far the
            # logits may move (tight for fp32) would refuse what the budget allows (merged
            # tokens, 4-bit weights) before it was asked. A cosine budget still sets one.
            found += [
                f"validation.{key}=0.0"
                for key in ("min_cosine", "min_top1_agreement")
                if key not in bounded
            ]
            found.append("validation.min_sqnr_db=")  # none
        if data is not None:
            found += [f"validation.data={json.dumps(data)}", f"calibration.data={json.dumps(data)}"]
        if prompts:
            found.append(f"validation.prompts={json.dumps(list(prompts))}")
        if steps is not None:
            found.append(f"validation.steps={steps}")
        return found


def parse_budget(text: str) -> Budget:
    """'top1-drop=1' or 'psnr=30,ssim=0.9' -> Budget; a one-line error naming the fix."""
    bounds: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        name, equals, value = part.partition("=")
        name = name.strip().lower()
        if not equals or name not in KEYS:
            known = ", ".join(f"{key}=N ({what})" for key, (_, what) in KEYS.items())
            hint = did_you_mean(name, list(KEYS)) if equals else ""
            raise InputError(f"budget {part!r} is not one of {known}{hint}")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number) or number < 0:
            raise InputError(f"budget {name} must be a finite number >= 0, got {value.strip()!r}")
        bounds[KEYS[name][0]] = number
    return Budget(tuple(bounds.items()))


__all__ = ["KEYS", "Budget", "parse_budget"]
