"""norm_fast: the NORM knowledge-distillation loss, fast and exact.

    from norm_fast import NORM
    norm = NORM(student_channels=512, teacher_channels=512, n=8)
    features, loss = norm(f_s, f_t)
"""
from . import functional
from .dispatch import ALGORITHMS, BACKENDS
from .functional import match_spatial, norm_loss
from .fold import ft_affine, merge_into
from .module import NORM
from .schedule import norm_weight
from .attach import attach, merge
from .info import info
from .distiller import Distiller

__all__ = ["NORM", "functional", "norm_loss", "match_spatial", "merge_into", "ft_affine",
           "BACKENDS", "ALGORITHMS", "attach", "merge", "norm_weight", "info",
           "Distiller"]
__version__ = "0.1.0"
