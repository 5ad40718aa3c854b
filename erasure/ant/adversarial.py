"""Adversarial erasure (``AntSettings.adversarial``): the audit's concept-inversion attack inside ANT's training.

As AdvUnlearn (Zhang et al. 2024) does for the text encoder, training alternates two players. Every
``adversarial_every`` erasure steps, ``adversarial_steps`` steps of concept inversion (``erasure.audit``'s attack:
a learned token in the concept's templates, trained with the denoising loss on images of the concept at timesteps in
``[t_min T, T)``) update the learned token against the *current* edited model; the erasure steps in between also
regress the learned-token prompt, at the batch's mid/late latents, onto the concept prompt's reversed target. The
token is warm-started from round to round (one Adam state), so each round follows the moving model cheaply.

The images of the concept are generated once at the start by the frozen model from the concept's prompts (seeds apart
from the audit's). The learned token enters prompts through :class:`~erasure.audit_text.SlotEncoder`; the
:class:`~erasure.diffusers_backbone.DiffusersBackbone` (SD1.x, SD2.x, SDXL, the lab) has one, other backbones must
pass theirs (docs/ant.md#adversarial).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from ..audit import AuditSettings
from ..audit_text import SLOT, SlotEncoder, check_template, init_vectors
from ..backbone import Backbone, TextConditioning, gradient_checkpointing
from ..errors import BadInputError, TrainingDivergedError
from ..progress import Progress
from ..sampling import sample
from .settings import AntSettings

#: the attack's images per step, its starting word and its timestep range: the audit's defaults, so the attack met in
#: training is the one the audit runs
ATTACK_BATCH = AuditSettings.batch_size
INIT_WORD = AuditSettings.init_word
T_MIN = AuditSettings.t_min
#: first seed of the attack's generated images: apart from the audit's (100000 + ...) and the evaluation seeds, so
#: that training never sees the images an audit inverts on
IMAGE_SEED = 300_000


def slot_encoder_for(backbone: Backbone, given: SlotEncoder | None) -> SlotEncoder:
    """``given``, else the backbone's own slot encoder (diffusers backbones only); refused naming the fix."""
    if given is not None:
        return given
    from ..diffusers_backbone import DiffusersBackbone

    if isinstance(backbone, DiffusersBackbone):
        from ..audit_text import DiffusersSlotEncoder

        return DiffusersSlotEncoder(backbone)
    raise BadInputError(f"adversarial erasure needs a learned-token text encoder (a SlotEncoder), which this model "
                        f"({type(backbone).__name__}) does not provide: use a diffusers or single-file model from "
                        "Python or the command line, pass slot_encoder= to ant(), or set adversarial to 0")


def slot_templates(templates: list[str]) -> list[str]:
    """ANT's prompt templates (``{c}``) as slot templates (:data:`~erasure.audit_text.SLOT`), each checked to hold
    the concept exactly once."""
    out = []
    for t in templates:
        if t.count("{c}") != 1:
            raise BadInputError(f"the prompt template {t!r} must contain {{c}} exactly once for adversarial "
                                "erasure (the learned token takes the concept's place)")
        out.append(t.replace("{c}", SLOT))
        check_template(out[-1])
    return out


@dataclass
class AdversarialToken:
    """The learned token, its optimiser, the concept images it is fitted on and its history."""

    encoder: SlotEncoder
    templates: list[str]  # slot templates, one per ANT template
    images: torch.Tensor  # clean latents of the concept (frozen model)
    vectors: list[torch.Tensor]  # one [n, D] per text encoder, trainable
    opt: torch.optim.Adam
    gen: torch.Generator
    #: per round: the attack's mean loss, and the token's RMS distance from its start (in embedding-table std units)
    history: list[dict[str, float]] = field(default_factory=list)
    start: list[torch.Tensor] = field(default_factory=list)

    def conditioning(self, which: list[int]) -> TextConditioning:
        """The learned-token prompts of templates ``which`` (one row each), detached: the erasure step trains the
        model, not the token."""
        with torch.no_grad():
            return self.encoder.encode([self.templates[j] for j in which], [v.detach() for v in self.vectors])

    def report(self) -> dict[str, object]:
        return {"rounds": len(self.history), "history": self.history,
                "token": [v.detach().cpu().tolist() for v in self.vectors]}


@torch.no_grad()
def concept_images(backbone: Backbone, prompts: list[str], s: AntSettings, progress: Progress) -> tuple[torch.Tensor,
                                                                                                       int]:
    """``s.trajectories`` clean latents of the concept from the model as it is (call before any edit): the prompts
    cycled, ``s.trajectory_steps`` DDIM steps at ``s.guidance``. Returns them and the UNet evaluations spent."""
    n = s.trajectories
    seeds = [IMAGE_SEED + 1000 * s.seed + i for i in range(n)]
    out: list[torch.Tensor | None] = [None] * n
    for k, p in enumerate(prompts[:n]):
        idx = list(range(k, n, len(prompts)))
        # Cancel and log pass through; the bar counts training steps only
        res = sample(backbone, [p], [seeds[i] for i in idx], s.trajectory_steps, s.guidance, resolution=s.resolution,
                     progress=Progress(interrupt=progress.interrupt, log=progress.log), decode=False)
        for j, i in enumerate(idx):
            out[i] = res.latents[j].cpu()
    return torch.stack([x for x in out if x is not None]), 2 * n * s.trajectory_steps


def start_token(backbone: Backbone, encoder: SlotEncoder, templates: list[str], images: torch.Tensor,
                s: AntSettings) -> AdversarialToken:
    """The learned token at its start (``s.adversarial`` copies of the embedding of :data:`INIT_WORD`), with its
    Adam (step size ``s.adversarial_lr`` times each table's std, as the audit's). Every slot prompt is encoded once
    here, so a template too long for the text encoder is refused before training."""
    gen = torch.Generator().manual_seed(1_000_003 * 5 + s.seed)  # its own stream: ANT's draws stay as without it
    init = init_vectors(encoder, s.adversarial, INIT_WORD, gen)
    vecs = [v.detach().clone().float().to(backbone.device).requires_grad_(True) for v in init]
    opt = torch.optim.Adam([{"params": [v], "lr": s.adversarial_lr * sc}
                            for v, sc in zip(vecs, encoder.scales(), strict=True)])
    with torch.no_grad():
        encoder.encode(templates, vecs)
    return AdversarialToken(encoder, templates, images, vecs, opt, gen, start=[v.detach().clone() for v in vecs])


def attack_round(backbone: Backbone, tok: AdversarialToken, s: AntSettings, checkpointing: bool,
                 progress: Progress) -> int:
    """``s.adversarial_steps`` inversion steps of the token against the backbone as it is now (the edited model):
    per step ``ATTACK_BATCH`` images, timesteps in ``[T_MIN T, T)``, noises and templates drawn at random; the loss
    is the denoising MSE. Only the token is stepped (gradients reaching the edit are dropped). Returns the UNet
    evaluations spent."""
    x0 = tok.images.to(backbone.device, backbone.dtype)
    T = backbone.schedule.num_timesteps
    lo, g = int(T_MIN * T), tok.gen
    total = 0.0
    for _ in range(s.adversarial_steps):
        progress.check()
        idx = torch.randint(len(x0), (ATTACK_BATCH,), generator=g)
        t = torch.randint(lo, T, (ATTACK_BATCH,), generator=g)
        noise = torch.randn((ATTACK_BATCH, *x0.shape[1:]), generator=g).to(x0.device, x0.dtype)
        which = torch.randint(len(tok.templates), (ATTACK_BATCH,), generator=g).tolist()
        with torch.enable_grad(), gradient_checkpointing(backbone, True) if checkpointing else \
                contextlib.nullcontext():
            cond = tok.encoder.encode([tok.templates[j] for j in which], tok.vectors)
            x_t = backbone.schedule.add_noise(x0[idx.to(x0.device)], noise, t.to(x0.device))
            loss = torch.nn.functional.mse_loss(backbone.predict_noise(x_t, t.to(x0.device), cond).float(),
                                                noise.float())
            if not torch.isfinite(loss):
                raise TrainingDivergedError("the adversarial token's loss became NaN or infinite: lower "
                                            f"adversarial_lr (now {s.adversarial_lr})")
            grads = torch.autograd.grad(loss, tok.vectors)
        for v, gr in zip(tok.vectors, grads, strict=True):
            v.grad = gr
        tok.opt.step()
        total += float(loss.detach())
    # how far the token is from its start: the RMS over its entries, in units of the embedding table's std
    moved = max(float((v.detach() - v0).pow(2).mean().sqrt()) / sc
                for v, v0, sc in zip(tok.vectors, tok.start, tok.encoder.scales(), strict=True))
    tok.history.append({"attack_loss": round(total / max(1, s.adversarial_steps), 6), "token_moved": round(moved, 4)})
    return ATTACK_BATCH * s.adversarial_steps
