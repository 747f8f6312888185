"""diffusers' schedulers in numpy, by kiln's name and by the diffusers class a
scheduler_config.json names.

A scheduler config of a class we have not written is refused with the names we have; a name
picks our class and overrides (dpmpp-2m-karras is dpmpp-2m with Karras sigmas), configured
from the artifact's config as diffusers' `from_config` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from modelkiln.diffusion.schedulers.base import NoiseSource, Scheduler
from modelkiln.diffusion.schedulers.ddim import DDIM
from modelkiln.diffusion.schedulers.dpm_solver import DPMSolverMultistep
from modelkiln.diffusion.schedulers.euler import EulerAncestralDiscrete, EulerDiscrete
from modelkiln.diffusion.schedulers.flow_match import FlowMatchEulerDiscrete
from modelkiln.diffusion.schedulers.lcm import LCM
from modelkiln.diffusion.schedulers.lms import LMSDiscrete
from modelkiln.diffusion.schedulers.pndm import PNDM
from modelkiln.diffusion.schedulers.unipc import UniPCMultistep
from modelkiln.errors import InputError, UnsupportedError, did_you_mean

# name -> (class, config overrides), as `kiln generate --scheduler NAME` takes them.
SCHEDULERS: Mapping[str, tuple[type[Scheduler], Mapping[str, Any]]] = {
    "euler": (EulerDiscrete, {}),
    "euler-ancestral": (EulerAncestralDiscrete, {}),
    "dpmpp-2m": (DPMSolverMultistep, {}),
    "dpmpp-2m-karras": (DPMSolverMultistep, {"use_karras_sigmas": True}),
    "ddim": (DDIM, {}),
    "pndm": (PNDM, {}),
    "lms": (LMSDiscrete, {}),
    "unipc": (UniPCMultistep, {}),
    "lcm": (LCM, {}),
    "flow-match-euler": (FlowMatchEulerDiscrete, {}),
}
_BY_DIFFUSERS_CLASS = {cls.diffusers_class: cls for cls, _ in SCHEDULERS.values()}


def scheduler_from_config(config: Mapping[str, Any], name: str | None = None) -> Scheduler:
    """The scheduler `name` (default: the config's own class) configured from `config`."""
    if name is None:
        class_name = str(config.get("_class_name", ""))
        scheduler_class = _BY_DIFFUSERS_CLASS.get(class_name)
        if scheduler_class is None:
            raise UnsupportedError(
                f"the artifact's scheduler {class_name or '(unnamed)'} is not one modelkiln runs; "
                f"pick one with --scheduler: {', '.join(SCHEDULERS)}"
            )
        return scheduler_class(config)
    if name not in SCHEDULERS:
        raise InputError(
            f"unknown scheduler '{name}'{did_you_mean(name, SCHEDULERS)}; "
            f"available: {', '.join(SCHEDULERS)}"
        )
    scheduler_class, overrides = SCHEDULERS[name]
    return scheduler_class({**config, **overrides})


__all__ = ["SCHEDULERS", "NoiseSource", "Scheduler", "scheduler_from_config"]
