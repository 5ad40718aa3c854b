"""ANT (Li et al., ACMMM 2025): erase a concept by reversing classifier-free guidance in the mid-to-late steps while
keeping the early, structure-laying steps intact.

``settings`` (every setting and its check), ``objective`` (targets and loss), ``sources`` (where training latents
come from), ``saliency`` (which weights are trained), ``train`` (the loop, one concept or many). The method, where
it differs from the reference code on purpose and why, and the measurements behind the defaults: ``docs/ant.md``.
"""

from .objective import Batch, ant_loss, stage_targets, use_checkpointing
from .saliency import saliency_masks, scope_modules, top_fraction_mask
from .settings import (
    AUTO_CHECKPOINT_CELLS,
    AUTO_CHECKPOINT_PARAMS,
    CHECKPOINTING,
    FUSE_LAM,
    FUSE_PRESERVE,
    FUSE_STRENGTH,
    PREDICTIONS,
    PRESERVE_LATENTS,
    PRESETS,
    SAMPLINGS,
    SCOPES,
    AntSettings,
)
from .sources import Trajectories, build_trajectories, draw, run_trajectory, trajectory_plan
from .train import AntMultiResult, AntResult, ant, ant_multi

__all__ = [
    "AUTO_CHECKPOINT_CELLS", "AUTO_CHECKPOINT_PARAMS", "CHECKPOINTING", "FUSE_LAM", "FUSE_PRESERVE", "FUSE_STRENGTH",
    "PREDICTIONS", "PRESERVE_LATENTS", "PRESETS", "SAMPLINGS", "SCOPES", "AntMultiResult", "AntResult",
    "AntSettings", "Batch",
    "Trajectories", "ant", "ant_loss", "ant_multi", "build_trajectories", "draw", "run_trajectory", "saliency_masks",
    "scope_modules", "stage_targets", "top_fraction_mask", "trajectory_plan", "use_checkpointing",
]
