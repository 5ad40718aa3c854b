"""Every ANT setting, its default and how it is checked. Why each default is what it is, with the measurements
behind it: ``docs/ant.md#settings``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .. import validation
from ..errors import BadInputError
from ..prompts import CONCEPT_TEMPLATES
from ..settings import Settings

SCOPES = ("saliency", "xattn", "non-xattn", "kv", "lora")
PREDICTIONS = ("cond", "guided")
SAMPLINGS = ("on-policy", "cached")
#: where the preservation prompts are evaluated: at the concept's training latents ("concept"), or at noised images
#: of their own, drawn once from the frozen model ("own": the prompts' own distribution;
#: docs/ant.md#the-defaults-on-the-lab)
PRESERVE_LATENTS = ("concept", "own")
#: the scopes ``protect`` applies to: their cross-attention K/V edits are projected; the others train without it (a
#: sparse saliency edit would lose its sparsity, non-xattn has no K/V; docs/ant.md#protect)
PROTECTABLE_SCOPES = ("kv", "lora", "xattn")
CHECKPOINTING = ("auto", "on", "off")
#: ``gradient_checkpointing="auto"`` turns checkpointing on for UNets of at least this many parameters (SDXL's
#: 2.57 G, not SD1.5's 860 M) or latents of more than this many cells (docs/ant.md#auto-checkpointing)
AUTO_CHECKPOINT_PARAMS, AUTO_CHECKPOINT_CELLS = 1_500_000_000, 64 * 64
#: the many-concept path's fusion: regulariser, prior weight, and the factor each concept's edit enters it with
#: (docs/ant.md#fusion-settings)
FUSE_LAM, FUSE_PRESERVE = 0.01, 0.1
FUSE_STRENGTH = 1.25
#: ``calibrate``: the largest strength it may choose, and the reports it may spend finding it
CALIBRATE_MAX, CALIBRATE_EVALUATIONS = 2.0, 4


@dataclass(frozen=True)
class AntSettings(Settings):
    """Every ANT setting, with the defaults used everywhere (command line, nodes, lab). The reference's value is in
    the comment where it differs; docs/ant.md#settings says why."""

    label: ClassVar[str] = "ANT"

    steps: int = 250  # training steps (reference 250)
    multi_steps: int = 300  # training steps per concept on the many-concept path (``ant_multi``)
    #: Adam's step size. Relative (``lr_relative``, the default): each layer steps by ``lr`` times its own weights'
    #: RMS, so that a value means the same relative change on the lab, SD1.5 or SDXL (docs/ant.md#lr). Absolute:
    #: the same step for every weight, as the reference (5e-4)
    lr: float = 0.02
    lr_relative: bool = True
    batch_size: int = 1  # reference 1
    trajectory_steps: int = 10  # DDIM steps of the training trajectories (reference 50)
    early_steps: int = 1  # the first ``early_steps`` of them are the early (structure) stage (reference ~4 of 50)
    guidance: float = 7.5  # guidance of the trajectories, and of the edited model's guided prediction
    #: the fraction of the concept's guidance direction reversed in the mid/late steps (the early target keeps all of
    #: it whatever eta; reference 1, which on the lab changed far more of the unrelated images: docs/ant.md#eta)
    eta: float = 0.3
    a1: float = 2.5
    a2: float = 0.5
    #: weight of the project's preservation term (not in the paper): the edited model's conditional prediction for
    #: prompts without the concept must match the frozen one at the same latents (0 = the paper's objective)
    preserve: float = 5.0
    preserve_prompts: int = 64  # how many of the prior-preservation prompts are used
    #: the edited model's prediction that is regressed: its conditional one ("cond"), or its guided one ("guided",
    #: as in the reference's many-concept code)
    prediction: str = "guided"
    #: where training latents come from: "on-policy" (the edited model's own trajectories, regenerated as training
    #: goes: the reference's loop) or "cached" (frozen-model trajectories computed once, refreshed every
    #: ``refresh_every`` steps)
    sampling: str = "on-policy"
    trajectories: int = 16  # trajectories (augmentations cycled, new seeds each cycle) and saliency maps drawn from
    refresh_every: int = 25  # cached sampling: regenerate the trajectories with the edited model every N steps
    #: on-policy: each regenerated trajectory serves this many training steps at newly drawn steps (1 = the
    #: reference's loop, a new trajectory for every step)
    reuse: int = 8
    multi_reuse: int = 1  # ``reuse`` on the many-concept path
    #: what is trained: dense cross-attention K/V ("kv"), the paper's saliency mask over the whole UNet
    #: ("saliency"), every cross-attention Linear ("xattn"), everything else ("non-xattn"), or a K/V LoRA ("lora")
    scope: str = "kv"  # reference: saliency
    saliency_fraction: float = 0.5  # fraction of entries each saliency map keeps (before intersecting)
    saliency_maps: int = 8  # maps intersected: the first N trajectories (prompt augmentations x seeds)
    lora_rank: int = 4
    grad_clip: float = 1.0
    resolution: int | None = None
    seed: int = 0
    kind: str = "object"  # which prompt templates augment the concept (object, person, style, nudity)
    #: gradient checkpointing of the training forward: "on" recomputes activations in backward (about one extra
    #: forward of the training rows per step), "off" keeps them, "auto" is on for large UNets or latents
    gradient_checkpointing: str = "auto"
    #: adversarial erasure (one concept, not in the paper): learned tokens of a concept-inversion attack run inside
    #: training against the edited model, whose prompts get the concept's reversed target too (0 = off;
    #: docs/ant.md#adversarial)
    adversarial: int = 0
    adversarial_every: int = 25  # erasure steps between attack rounds (a round at step 0, then every N)
    adversarial_steps: int = 20  # inversion steps per round (4 images each, as the audit's)
    adversarial_lr: float = 0.3  # the attack's Adam step, in units of the token-embedding table's std (the audit's)
    adversarial_weight: float = 1.0  # weight of the learned-token prompt's erase term against the concept prompt's
    #: where the preservation term's prompts are evaluated: "concept" (at the concept's training latents), "own" (at
    #: their own images from the frozen model, noised to the step's timesteps; docs/ant.md#the-defaults-on-the-lab)
    preserve_latents: str = "concept"
    #: keep the edit off what unrelated prompts feed the cross-attention: every step's gradient and the K/V edit after
    #: it are projected off the text-embedding directions that hold this fraction of the preservation prompts' token
    #: energy, so their keys and values barely move (0 = off, the paper's; used by scopes kv, lora, xattn;
    #: docs/ant.md#protect)
    protect: float = 0.999
    #: the many-concept path with scope lora: this many concepts' LoRAs trained together, one training forward per
    #: step with each sample through its own concept's LoRA; the same result as one at a time
    #: (docs/ant.md#concept-batch)
    concept_batch: int = 1
    #: after training, raise the edit's strength (never lower it; at most CALIBRATE_MAX) until the erasure report's
    #: guidance left on the concept's prompts is at most 0 at the mid and at the late steps: the concept reversed
    #: everywhere after the layout, as ANT's targets ask, measured on the user's model (one concept;
    #: docs/ant.md#calibrate)
    calibrate: bool = False

    def validate(self) -> None:
        """Reject bad settings before any expensive work, naming the fix."""
        for k in ("steps", "multi_steps", "batch_size", "trajectories", "reuse", "multi_reuse", "lora_rank",
                  "saliency_maps", "preserve_prompts", "concept_batch"):
            validation.check_count(k, getattr(self, k))
        validation.check_count("refresh_every", self.refresh_every, low=0)
        validation.check_learning_rate(self.lr)
        validation.check_count("trajectory_steps", self.trajectory_steps, low=2)
        if not 0 < self.early_steps < self.trajectory_steps:
            # the early (kept) stage and the mid/late (reversed) stage each need a step of their own
            raise BadInputError(f"early_steps must be between 1 and trajectory_steps - 1 (got {self.early_steps} of "
                                f"{self.trajectory_steps}): lower early_steps or raise trajectory_steps")
        validation.check_number("saliency_fraction", self.saliency_fraction, 0.0, 1.0, low_open=True)
        validation.check_choice("sampling", self.sampling, SAMPLINGS)
        validation.check_choice("preserve_latents", self.preserve_latents, PRESERVE_LATENTS)
        validation.check_number("protect", self.protect, 0.0, 0.99999)  # 1 would leave no direction to edit
        validation.check_choice("prediction", self.prediction, PREDICTIONS)
        validation.check_choice("scope", self.scope, SCOPES)
        validation.check_choice("gradient_checkpointing", self.gradient_checkpointing, CHECKPOINTING)
        validation.check_choice("kind", self.kind, tuple(CONCEPT_TEMPLATES))
        for k in ("eta", "a1", "a2", "guidance", "grad_clip", "preserve"):
            validation.check_number(k, getattr(self, k))
        validation.check_resolution(self.resolution)
        validation.check_count("adversarial", self.adversarial, low=0)
        for k in ("adversarial_every", "adversarial_steps"):
            validation.check_count(k, getattr(self, k))
        # in units of the token-embedding table's std (not a weight step): the audit's 0.3; 10 stds is far outside
        validation.check_number("adversarial_lr", self.adversarial_lr, 0.0, 10.0, low_open=True)
        validation.check_number("adversarial_weight", self.adversarial_weight, 0.0, low_open=True)
        if self.adversarial and self.protect > 0 and self.scope in PROTECTABLE_SCOPES:
            # measured on the lab: under protect the learned token still revives the concept in every image, and at
            # the default weight the attack's term undoes the erasure itself (docs/audit.md#adversarial-with-protect)
            raise BadInputError(f"adversarial erasure does not work with protect {self.protect:g}: on the lab a "
                                "learned token still revived the concept in every image, and the attack's term "
                                "undid the erasure itself. Set protect to 0 for "
                                "adversarial erasure (more robust, more change to unrelated prompts), or "
                                "adversarial to 0")


#: named configurations: "default" (the library's defaults) and "paper" (the published method as specified, with the
#: reference code's bugs fixed: saliency mask over the whole UNet ranked within each tensor, sparse Adam at the
#: reference's absolute learning rate, the conditional prediction, 50-step trajectories regenerated with the edited
#: model for every step, early stage the first 4 of them, no preservation term beyond the paper's; docs/ant.md#presets)
PRESETS: dict[str, AntSettings] = {
    "default": AntSettings(),
    "paper": AntSettings(scope="saliency", lr=5e-4, lr_relative=False, prediction="cond", trajectory_steps=50,
                         early_steps=4, preserve=0.0, reuse=1, grad_clip=0.0, sampling="on-policy", steps=250,
                         batch_size=1, eta=1.0, protect=0.0),
    # harder to bring back with a learned token: the default's objective on the paper's whole-UNet saliency scope,
    # the preservation prompts at their own images and weighted 25; on the lab a learned token revived circle in
    # 3-31% of images against 100% for the default, with more change to unrelated images (docs/audit.md#robust)
    "robust": AntSettings(scope="saliency", preserve_latents="own", preserve=25.0),
}
