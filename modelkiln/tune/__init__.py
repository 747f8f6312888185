"""`kiln tune`: the fastest build of a model inside a quality budget (tuner.py)."""

from modelkiln.tune.budget import Budget, parse_budget
from modelkiln.tune.search import Tried, TuneSettings
from modelkiln.tune.space import Candidate, candidate_space
from modelkiln.tune.tuner import TuneResult, tune

__all__ = [
    "Budget",
    "Candidate",
    "Tried",
    "TuneResult",
    "TuneSettings",
    "candidate_space",
    "parse_budget",
    "tune",
]
