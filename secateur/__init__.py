"""secateur: make causal language models smaller and faster, and prove it."""

from secateur.api import CalibrationSpec, PruneRun, count_parameters, prune
from secateur.errors import SecateurError
from secateur.methods import PruneOptions
from secateur.models.loading import Loaded, load

__all__ = [
    "CalibrationSpec",
    "Loaded",
    "PruneOptions",
    "PruneRun",
    "SecateurError",
    "count_parameters",
    "load",
    "prune",
]
