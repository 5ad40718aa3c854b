"""MACE (Lu et al., CVPR 2024): mass concept erasure on the cross-attention key/value projections.

Four stages (the method and where we differ from the reference, with the reasons and measurements: ``docs/mace.md``):

1. ``generate_data``: N images per concept from the frozen model, with masks derived from the concept tokens' own
   cross-attention maps during the same sampling pass (mid-resolution layers, later steps, heads averaged,
   min-max normalised, thresholded). No GroundingDINO/SAM. Styles use no mask; users may pass their own masks.
2. ``refine`` (CFR): closed-form edit of every K/V matrix mapping the concept prompts' non-concept tokens onto the
   anchor's projections, with prior preservation through one ``D x D`` Gram matrix (``prior.py``).
3. ``train_lora``: one rank-1 K/V LoRA per concept on the CFR model, trained to suppress the concept tokens'
   attention inside the mask (``attention_loss``), at timesteps drawn from
   ``p(t) ~ sigmoid(0.05 (t - 200)) - sigmoid(0.05 (t - 400))``.
4. ``erasure.fusion``: closed-form fusion of all concept LoRAs into one set of dense K/V edits.

On purpose unlike the reference code: one prior Gram matrix for all layers, its weight applied once; float64
Cholesky solves of one D x D system for all layers; masks from the model's own attention; the end token and padding
suppressed only where the text encoder carries the concept into them (``end_residue``).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from . import distributed, validation
from .backbone import Backbone, TextConditioning
from .closed_form import factor, solve_factored
from .deltas import BatchedLoRA, TrainableLoRA
from .errors import TrainingDivergedError
from .fusion import FusionSystem, concept_token_embeddings, mean_prompt_count
from .guards import entry_point
from .loss_curve import joined_curve
from .prior import protected_complement
from .progress import Progress, as_progress
from .prompts import Concept
from .sampling import sample
from .settings import Settings
from .slot_adam import SlotAdamW
from .weights import ErasureWeights, change_text, relative_change
from .workdir import WorkDir, matrix_sketch, tensor_hash


@dataclass(frozen=True)
class MaceSettings(Settings):
    """Every setting of the four stages. Presets (``PRESETS``) hold the reference values per kind of concept."""

    kind: str = "object"
    anchor: str = "background"
    images_per_concept: int = 8
    sample_steps: int = 30
    guidance: float = 7.5
    mask_threshold: float = 0.5
    #: restrict the attention loss to the concept's region (from its own attention in the generated images; the
    #: reference's objects and people). Off by default: at the high-noise steps the loss now also sees, the region of
    #: the final image is not yet where the concept acts (docs/mace.md#where-and-when-the-loss-looks). Your own masks
    #: are used either way
    use_masks: bool = False
    lam: float = 0.1  # CFR / fusion regulariser towards the reference weights
    #: read ``lam`` relative to this model's text-token energy, as on SD1.x with the reference's 30 prompts
    #: (``lam_scale``; off: the same absolute number on every model, as the reference; docs/mace.md#lam)
    lam_relative: bool = True
    preserve: float = 1.0  # prior-preservation weight in CFR (per prompt of the prior set)
    fuse_preserve: float = 1.0  # prior-preservation weight in fusion
    lora_steps: int = 50
    lora_lr: float = 1e-5
    #: train each LoRA in rounds of ``lora_steps`` until its attention loss on the fixed probe is at most this
    #: fraction of its start, raising the learning rate after a round that stalled; 0: one round (the reference's
    #: fixed budget). The first round is the reference's training exactly (docs/mace.md#lora_target)
    lora_target: float = 0.1
    #: at most this many rounds of ``lora_steps`` per concept
    lora_max_rounds: int = 10
    lora_rank: int = 1
    lora_batch: int = 1
    grad_clip: float = 1.0
    #: train each LoRA step on a prompt drawn from the concept's templates (the reference's ``augment: true``:
    #: 30 object/style templates); off: the single generation prompt every step
    augment: bool = True
    #: draw LoRA timesteps from ``p(t) ~ sigmoid(0.05 (t-200)) - sigmoid(0.05 (t-400))`` (the reference's
    #: ``importance_sampling: true`` for objects, people and styles); off (default): uniform over all timesteps (the
    #: reference's nudity config), so the concept is also suppressed at the high-noise steps where attributes such as
    #: a colour settle (docs/mace.md#where-and-when-the-loss-looks)
    importance_sampling: bool = False
    #: also suppress the end token and padding after the concept (the reference's positions). ``None`` (default):
    #: only where they carry the concept, as ``end_residue`` measures it (docs/mace.md#suppress_end)
    suppress_end: bool | None = None
    #: also suppress the words between the concept and the end token ("a green *shape*"): a causal text encoder
    #: carries the concept into them, which the reference's positions leave out; nothing changes where the concept
    #: ends its prompt. On by default: with uniform timesteps and whole images it is what erases a colour in a
    #: mixed list at every seed (docs/mace.md#where-and-when-the-loss-looks)
    suppress_following: bool = True
    #: keep the K/V change off the text-embedding directions holding this fraction of the prior prompts' token
    #: energy (``prior.protected_complement``): each LoRA is trained in the other directions (its gradient projected
    #: every step) and the fused change is projected, so unrelated prompts' keys and values stay as they were. Not
    #: in the reference (docs/mace.md#protect)
    protect: float = 0.999
    #: concepts whose LoRAs train together in one UNet forward (each sample carries its own concept's LoRA) and
    #: whose images are generated in one batch; the result equals training them one by one (to float rounding).
    #: ``None``: automatic, from free memory on a GPU, ``CPU_CONCEPT_BATCH`` on the CPU (docs/mace.md#concept-batch)
    concept_batch: int | None = None
    seed: int = 0

    label: ClassVar[str] = "MACE"

    def validate(self) -> None:
        validation.check_mace_settings(self)


#: the reference's configurations per kind (Shilin-LU/MACE ``configs/``; which file each value comes from and every
#: difference: docs/mace.md#presets). Prior weights are the reference's ``train_preserve_scale`` /
#: ``fuse_preserve_scale`` times the 616,767 COCO 2014 captions its cache sums, since our prior is normalised per
#: prompt; its lam 0 is 1e-3 here, as ``refine`` and the validation take lam > 0 only. Every kind trains its LoRA on
#: whole images at uniform timesteps (the reference: masks and p(t) for objects and people, p(t) for styles), also
#: suppresses the words after the concept, and uses ``protect``: measured reasons in
#: docs/mace.md#where-and-when-the-loss-looks and #protect.
PRESETS: dict[str, MaceSettings] = {
    # configs/object/erase_ship.yaml (the README's config): lamb 1e3, mapping 'ground', no prior (scales 0)
    # configs/object/erase_bird.yaml (the reference's objects use lamb 10, 100 or 1000: 10 here) with the prior of
    # the reference's person and style configs, which its object configs leave out (measured reasons for both:
    # docs/mace.md#presets); mapping 'ground' as erase_ship.yaml
    "object": MaceSettings(kind="object", anchor="ground", lam=10.0, preserve=1e-4 * 616_767,
                           fuse_preserve=1e-4 * 616_767, lora_steps=50, lora_lr=1e-5),
    # configs/celebrity/erase_cele_{5,10,100}.yaml: lamb 0, mapping 'a person', scales 1e-4
    "person": MaceSettings(kind="person", anchor="a person", lam=1e-3, preserve=1e-4 * 616_767,
                           fuse_preserve=1e-4 * 616_767, lora_steps=50, lora_lr=1e-4),
    # configs/art/erase_art_100.yaml: lamb 0, mapping 'art', scales 1e-4, no masks (style)
    "style": MaceSettings(kind="style", anchor="art", use_masks=False, lam=1e-3, preserve=1e-4 * 616_767,
                          fuse_preserve=1e-4 * 616_767, lora_steps=50, lora_lr=1e-4),
    # configs/explicit_content/erase_explicit_content.yaml: lamb 0, scales 7e-7, importance_sampling false
    "nudity": MaceSettings(kind="nudity", anchor="a person wearing clothes", lam=1e-3, preserve=7e-7 * 616_767,
                           fuse_preserve=7e-7 * 616_767, lora_steps=120, lora_lr=1e-5, importance_sampling=False),
}


# -- stage 1 ---------------------------------------------------------------------------------------------------
@dataclass
class ConceptData:
    concept: Concept
    prompt: str
    latents: torch.Tensor  # [N, C, h, w] clean latents
    masks: torch.Tensor  # [N, h, w] in {0, 1}
    images: torch.Tensor | None = None  # [N, 3, H, W] decoded, for previews


def masks_from_attention(maps: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Min-max normalise each map and threshold it; an empty result falls back to the whole image."""
    lo = maps.flatten(1).min(1).values.view(-1, 1, 1)
    hi = maps.flatten(1).max(1).values.view(-1, 1, 1)
    norm = (maps - lo) / (hi - lo).clamp_min(1e-8)
    masks = (norm >= threshold).float()
    empty = masks.flatten(1).sum(1) == 0
    masks[empty] = 1.0
    return masks


def generate_data(backbone: Backbone, concept: Concept, s: MaceSettings, user_masks: torch.Tensor | None = None,
                  user_latents: torch.Tensor | None = None, progress: Progress | None = None) -> ConceptData:
    prompt = concept.generation_prompt()
    if user_latents is not None:
        masks = user_masks if user_masks is not None else torch.ones(user_latents.shape[0],
                                                                       *user_latents.shape[2:])
        return ConceptData(concept, prompt, user_latents, masks)
    seeds = [s.seed * 1000 + i for i in range(s.images_per_concept)]
    want_masks = s.use_masks and concept.kind != "style"
    res = sample(backbone, [prompt], seeds, s.sample_steps, s.guidance, progress=progress,
                 attention_word=concept.text if want_masks else None,
                 decode=not getattr(backbone, "latent_only", False))
    if want_masks:
        masks = masks_from_attention(res.attention, s.mask_threshold)
    else:
        masks = torch.ones(res.latents.shape[0], *res.latents.shape[2:])
    if user_masks is not None:
        masks = user_masks
    return ConceptData(concept, prompt, res.latents, masks, res.images if len(res.images) else None)


def _scaled(progress: Progress, factor: float) -> Progress:
    """``progress`` whose steps count ``factor`` units each (a batch of several concepts' sampling steps)."""
    carry = [0.0]

    def update(n: int) -> None:
        carry[0] += n * factor
        whole = int(carry[0])
        carry[0] -= whole
        progress.step(whole)

    return Progress(update, progress.interrupt, progress.log, progress.grow)


def generate_data_batch(backbone: Backbone, concepts: list[Concept], s: MaceSettings,
                        progress: Progress | None = None) -> list[ConceptData]:
    """``generate_data`` (no user images) for several concepts in one sampling batch: the same seeds per concept,
    each concept's masks from its own word's attention, so each equals ``generate_data`` alone to float rounding."""
    progress = as_progress(progress)
    if len(concepts) == 1:
        return [generate_data(backbone, concepts[0], s, progress=progress)]
    seeds = [s.seed * 1000 + i for i in range(s.images_per_concept)]
    want = [s.use_masks and c.kind != "style" for c in concepts]
    chunks = -(-len(concepts) * len(seeds) // SAMPLE_BATCH)  # ``sample`` counts its steps per chunk
    res = sample(backbone, [c.generation_prompt() for c in concepts], seeds, s.sample_steps, s.guidance,
                 batch_size=SAMPLE_BATCH, progress=_scaled(progress, len(concepts) / chunks),
                 attention_word=[c.text for c in concepts] if any(want) else None,
                 decode=not getattr(backbone, "latent_only", False))
    out, n = [], len(seeds)
    for k, c in enumerate(concepts):
        sl = slice(k * n, (k + 1) * n)
        masks = (masks_from_attention(res.attention[sl], s.mask_threshold) if want[k]
                 else torch.ones(n, *res.latents.shape[2:]))
        out.append(ConceptData(c, c.generation_prompt(), res.latents[sl], masks,
                               res.images[sl] if len(res.images) else None))
    return out


#: images per sampling call when several concepts' images are generated together (``sample``'s default)
SAMPLE_BATCH = 128
#: concepts per batch when ``concept_batch`` is automatic on the CPU (docs/mace.md#concept-batch)
CPU_CONCEPT_BATCH = 4
#: automatic on a GPU: the share of free memory the batch's LoRA training may fill, and the largest batch
GPU_MEMORY_SHARE, MAX_CONCEPT_BATCH = 0.6, 32


def batch_from_memory(free_bytes: int, per_concept_bytes: int, n: int) -> int:
    """Concepts per batch that fit ``GPU_MEMORY_SHARE`` of ``free_bytes``, at least 1, at most ``n`` and
    ``MAX_CONCEPT_BATCH``."""
    fit = int(GPU_MEMORY_SHARE * free_bytes // max(per_concept_bytes, 1))
    return max(1, min(fit, n, MAX_CONCEPT_BATCH))


def concept_step_bytes(backbone: Backbone, concept: Concept, s: MaceSettings) -> int:
    """Peak GPU memory of one concept's LoRA training step (``lora_batch`` samples, forward, attention loss and
    backward) above what is allocated before it, measured on random latents (the values do not change it)."""
    dev = torch.device(backbone.device)
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    start = torch.cuda.memory_allocated(dev)
    with TrainableLoRA(backbone.cross_attention_kv(), rank=s.lora_rank) as lora:
        with torch.no_grad():
            cond = backbone.encode_text([concept.generation_prompt()]).repeat(s.lora_batch)
        x = torch.randn(s.lora_batch, *backbone.latent_shape(), device=dev, dtype=backbone.dtype)
        t = torch.full((s.lora_batch,), 300, device=dev)
        loss_fn = AttentionLoss([1], torch.ones(s.lora_batch, *x.shape[2:]))
        with backbone.capture_attention(loss_fn):
            backbone.predict_noise(x, t, cond.to(dev))
        if loss_fn.total is not None:
            loss_fn.total.backward()
        for p in lora.parameters():
            p.grad = None
    torch.cuda.synchronize(dev)
    return torch.cuda.max_memory_allocated(dev) - start


def resolve_concept_batch(backbone: Backbone, concepts: list[Concept], s: MaceSettings) -> int:
    """``s.concept_batch``, or its automatic value: ``CPU_CONCEPT_BATCH`` on the CPU; on a GPU as many concepts
    as ``GPU_MEMORY_SHARE`` of the free memory holds, from one measured training step."""
    n = len(concepts)
    if n <= 1:
        return 1
    if s.concept_batch is not None:
        return min(s.concept_batch, n)
    dev = torch.device(backbone.device)
    if dev.type != "cuda":
        return min(CPU_CONCEPT_BATCH, n)
    per = concept_step_bytes(backbone, concepts[0], s)
    free, _ = torch.cuda.mem_get_info(dev)
    return batch_from_memory(free, per, n)


# -- stage 2 ---------------------------------------------------------------------------------------------------
def encode_pairs(backbone: Backbone, concept: Concept) -> tuple[torch.Tensor, torch.Tensor]:
    """Token embeddings ``[n, L, D]`` (float64, CPU) of ``concept_and_anchor_prompts``: what CFR and
    ``end_residue`` both read, encoded once when ``mace`` runs them."""
    src, dst = concept.prompts(), concept.anchor_prompts()
    with torch.no_grad():
        return backbone.encode_text(src).embeds.double().cpu(), backbone.encode_text(dst).embeds.double().cpu()


def aligned_pairs(backbone: Backbone, concept: Concept,
                  encoded: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(e_f, e_g)``: concept-prompt embeddings at non-concept positions and the anchor prompts' aligned ones.

    Positions before the concept map to themselves; positions after it shift by the difference in token count
    between concept and anchor; positions that fall off the context are dropped. ``encoded``: ``encode_pairs``'s
    result, when already computed.
    """
    src, dst = concept.prompts(), concept.anchor_prompts()
    ef_all, eg_all = encoded if encoded is not None else encode_pairs(backbone, concept)
    length = ef_all.shape[1]
    ef, eg = [], []
    for i, (ps, pd) in enumerate(zip(src, dst, strict=True)):
        cpos = backbone.token_positions(ps, concept.text)
        if not cpos:
            raise ValueError(f"{concept.text!r} was cut off in {ps!r}: shorten the concept")
        apos = backbone.token_positions(pd, concept.anchor) if concept.anchor.strip() else []
        start, k = cpos[0], _span(cpos)
        m = _span(apos) if apos else 0
        for p in range(length):
            if start <= p < start + k:
                continue
            q = p if p < start else p - k + m
            if 0 <= q < length:
                ef.append(ef_all[i, p])
                eg.append(eg_all[i, q])
    return torch.stack(ef), torch.stack(eg)


def _span(positions: list[int]) -> int:
    """Length of the first contiguous run of positions (the first occurrence of a word)."""
    n = 1
    while n < len(positions) and positions[n] == positions[0] + n:
        n += 1
    return n


def _kv_weights(backbone: Backbone) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().double().cpu() for n, m in backbone.cross_attention_kv().items()}


def refine(backbone: Backbone, concepts: list[Concept], prior: torch.Tensor | None, lam: float = 0.1,
           preserve: float = 1.0, end_residues: dict[str, float] | None = None,
           mine: list[int] | None = None) -> ErasureWeights:
    """CFR for all concepts at once; dense K/V deltas. With no concepts the deltas are zero.

    ``end_residues``, when given, receives each concept's ``end_residue`` from the same encodings (stage 3 needs it;
    encoding every concept's prompt pairs a second time cost MACE a third of its text encoding).
    ``mine``: the indices of the concepts this process encodes (several processes, ``distributed.py``): the normal
    equations' sums over concepts are added up over the ranks (``all_reduce``), so that every rank solves the same
    system; ``None``: all of them."""
    w0s = _kv_weights(backbone)
    d = next(iter(w0s.values())).shape[1]
    ef_list, eg_list = [torch.zeros(0, d, dtype=torch.float64)], [torch.zeros(0, d, dtype=torch.float64)]
    for c in concepts if mine is None else [concepts[i] for i in mine]:
        encoded = encode_pairs(backbone, c)
        if end_residues is not None:
            end_residues[c.text] = end_residue(backbone, c, encoded)
        ef, eg = aligned_pairs(backbone, c, encoded)
        ef_list.append(ef)
        eg_list.append(eg)
    ef, eg = torch.cat(ef_list), torch.cat(eg_list)
    if lam <= 0:
        raise ValueError(f"lam must be > 0 (got {lam})")
    # every layer's targets are its own W0 applied to the anchor embeddings, so its normal equations read
    # W M2 = W0 A with A = E_g^T E_f + lam I + s C and M2 = E_f^T E_f + lam I + s C, both layer-independent:
    # W = W0 P with P = A M2^-1, solved once for all layers
    eye = torch.eye(d, dtype=torch.float64)
    a, m2 = eg.T @ ef, ef.T @ ef
    if mine is not None:
        distributed.all_reduce_(a)
        distributed.all_reduce_(m2)
    a = a + lam * eye
    m2 = m2 + lam * eye
    if prior is not None and preserve != 0:
        a = a + preserve * prior.double()
        m2 = m2 + preserve * prior.double()
    p = solve_factored(a, factor(m2))
    deltas = {name: (w0 @ p - w0).float() for name, w0 in w0s.items()}
    return ErasureWeights.dense(deltas, method="mace-cfr", concepts=[c.text for c in concepts],
                                anchors=[c.anchor for c in concepts], settings={"lam": lam, "preserve": preserve})


#: lam as the reference states it, for SD1.x: its fusion sums every token of a concept's 30 prompts (77 CLIP tokens,
#: each of squared norm ~768: unit RMS after CLIP's final layer norm), so one concept's token Gram has a mean
#: eigenvalue of about 30 x 77 = 2310 there (docs/mace.md#lam)
LAM_REFERENCE_EIGENVALUE = 30 * 77
LAM_SCALE_CONCEPTS = 4  # concepts whose prompts measure the scale (the first ones: the same on every rank)


def resolved_lam(backbone: Backbone, concepts: list[Concept], s: MaceSettings) -> tuple[float, float]:
    """``(lam, scale)``: the lam the closed forms use, ``s.lam`` times ``lam_scale`` where ``lam_relative``."""
    scale = lam_scale(backbone, concepts) if s.lam_relative else 1.0
    return s.lam * scale, scale


def lam_scale(backbone: Backbone, concepts: list[Concept]) -> float:
    """The factor on ``lam`` (``lam_relative``) that makes it pull as hard against the concepts' own normal-equation
    terms on this model as the reference's lam does on SD1.x: the mean eigenvalue of a concept's token Gram here
    (``trace(E^T E) / D`` over its prompts' tokens), over ``LAM_REFERENCE_EIGENVALUE``."""
    values = []
    for c in concepts[:LAM_SCALE_CONCEPTS]:
        e = concept_token_embeddings(backbone, c)
        values.append(float(e.pow(2).sum()) / e.shape[1])
    return sum(values) / len(values) / LAM_REFERENCE_EIGENVALUE


# -- stage 3 ---------------------------------------------------------------------------------------------------
def timestep_weights(num_timesteps: int = 1000) -> torch.Tensor:
    """MACE's ``p(t) ~ sigmoid(0.05 (t - 200)) - sigmoid(0.05 (t - 400))``, normalised."""
    t = torch.arange(num_timesteps, dtype=torch.float64)
    p = torch.sigmoid(0.05 * (t - 200)) - torch.sigmoid(0.05 * (t - 400))
    return p / p.sum()


def suppressed_positions(backbone: Backbone, prompt: str, word: str, end: bool = True,
                         following: bool = False) -> list[int]:
    """The concept's token positions plus (``end``) the end token and the padding after it (they carry its residue)
    and (``following``) the tokens between the concept and the end token."""
    pos = backbone.token_positions(prompt, word)
    if end or following:
        ids = backbone.tokenize(prompt)
        first_eos = _end_position(backbone, ids)
        stop = len(ids) if first_eos is None else first_eos
        extra = set(range(stop, len(ids))) if end else set()
        if following and pos:
            extra |= set(range(max(pos) + 1, stop))
        pos = sorted(set(pos) | extra)
    return pos


def _end_position(backbone: Backbone, ids: list[int]) -> int | None:
    """The end token's position in a tokenized prompt (``None``: cut off), whatever the padding token is."""
    eos = backbone.tokenize("")[1]  # [start, end, padding...]
    return next((i for i, t in enumerate(ids) if t == eos and i > 0), None)


#: ``end_residue`` at and above which the end token and padding count as carrying the concept (``suppress_end=None``;
#: docs/mace.md#end_residue_min)
END_RESIDUE_MIN = 0.02


def end_residue(backbone: Backbone, concept: Concept,
                encoded: tuple[torch.Tensor, torch.Tensor] | None = None) -> float:
    """How much of the concept the end token carries, relative to the concept's own token: over the concept's
    prompts, mean cosine distance between the end-token embeddings of the prompt and of the same prompt with the
    anchor, divided by the same distance at the concept's first token. A causal CLIP carries the prompt's content into
    the end token (a randomly initialised one: 0.73; SD's trained one assumed, not measured here); the lab's text
    encoder does not (0.001-0.005). ``encoded``: ``encode_pairs``'s result, when already computed."""
    src, dst = concept.prompts(), concept.anchor_prompts()
    ef, eg = encoded if encoded is not None else encode_pairs(backbone, concept)
    cos = torch.nn.functional.cosine_similarity
    end_d, tok_d = [], []
    for i, (ps, pd) in enumerate(zip(src, dst, strict=True)):
        cpos = backbone.token_positions(ps, concept.text)
        es, ed = _end_position(backbone, backbone.tokenize(ps)), _end_position(backbone, backbone.tokenize(pd))
        if not cpos or es is None or ed is None:
            continue
        end_d.append(1 - float(cos(ef[i, es], eg[i, ed], dim=0)))
        tok_d.append(1 - float(cos(ef[i, cpos[0]], eg[i, cpos[0]], dim=0)))
    if not end_d:
        return 1.0  # no end token found (truncated prompts): keep the reference's behaviour
    return (sum(end_d) / len(end_d)) / max(sum(tok_d) / len(tok_d), 1e-12)


def resolve_suppress_end(backbone: Backbone, concept: Concept, s: MaceSettings) -> bool:
    if s.suppress_end is not None:
        return bool(s.suppress_end)
    return end_residue(backbone, concept) >= END_RESIDUE_MIN


@dataclass
class AttentionLoss:
    """The reference's attention loss: summed over cross-attention layers, the Frobenius norm (not squared) of the
    attention probabilities of ``positions`` at masked pixels, all heads (``AttnController.loss`` in Shilin-LU/MACE
    ``src/cfr_utils.py``: ``sum(torch.norm(item) for item in self.attn_probs)``). Computed in float32.

    ``positions``: token positions shared by the batch, or a ``[B, L]`` 0/1 tensor (one row per sample: the batch's
    prompts may differ). ``groups`` (``[B]`` long, with ``n_groups``): the batch holds several independent losses
    (one per concept, ``train_loras``); each layer's norm is taken over that group's own samples, as if computed
    alone, and ``total`` is then a ``[n_groups]`` vector.
    """

    positions: list[int] | torch.Tensor
    masks: torch.Tensor  # [B, h, w]
    total: torch.Tensor | None = None
    layers: int = 0
    groups: torch.Tensor | None = None
    n_groups: int = 1

    def __call__(self, name: str, probs: torch.Tensor, hw: tuple[int, int]) -> None:
        m = torch.nn.functional.interpolate(self.masks[:, None].to(probs.device, torch.float32), size=hw,
                                            mode="nearest").flatten(1)  # [B, HW]
        if isinstance(self.positions, torch.Tensor):
            sq = (probs.pow(2) * self.positions.to(probs.device, probs.dtype)[:, None, None, :]).sum(-1)
        else:
            sq = probs[..., self.positions].pow(2).sum(-1)  # [B, heads, HW]
        per_sample = (sq.float() * m[:, None]).sum((1, 2))  # [B]: squares summed over heads and masked pixels
        if self.groups is None:
            val = self._norm_of(per_sample.sum())
        else:
            g = self.groups.to(probs.device)
            val = self._norm_of(per_sample.new_zeros(self.n_groups).index_add(0, g, per_sample))
        self.total = val if self.total is None else self.total + val
        self.layers += 1

    @staticmethod
    def _norm_of(sum_sq: torch.Tensor) -> torch.Tensor:
        """``sqrt(sum_sq)`` with a zero gradient where ``sum_sq`` is 0 (a mask or position set that selects
        nothing), where a plain ``sqrt`` would give an infinite one."""
        nonzero = sum_sq > 0
        return torch.where(nonzero, sum_sq.clamp_min(torch.finfo(sum_sq.dtype).tiny).sqrt(), sum_sq.new_zeros(()))


def lora_prompts(data: ConceptData, augment: bool = True) -> list[str]:
    """The prompts the LoRA trains on: the concept's templates (the reference draws one of its 30 per step, so the
    concept's attention is suppressed in any context, not only in the prompt its images came from), or the
    generation prompt alone."""
    if not augment:
        return [data.prompt]
    return list(dict.fromkeys(data.concept.prompts()))


#: a LoRA whose attention loss on the fixed probe ends above this fraction of its start has barely changed the
#: attention (``mace`` warns; docs/mace.md#stalled_loss)
STALLED_LOSS = 0.9
#: probe samples: the same images, timesteps, prompts and noise before and after training, so that the two losses
#: compare (docs/mace.md#probe_samples)
PROBE_SAMPLES = 8
PROBE_CHUNK = 4  # samples per UNet call of the probe
#: a round that leaves more than this fraction of the probe loss it started from has stalled, and so has one at whose
#: pace the target would not be reached in the rounds left: the next round's learning rate is ``LORA_LR_RAISE``
#: times higher, up to ``LORA_LR_MAX`` times ``lora_lr`` (docs/mace.md#lora_target)
LORA_STALL = 0.9
LORA_LR_RAISE = 10 ** 0.5
LORA_LR_MAX = 100.0


@dataclass
class LoraRounds:
    """One concept's LoRA schedule (``lora_target``): rounds of ``lora_steps``; after each, the probe decides
    whether the concept is done (at most ``lora_target`` of its start, or ``lora_max_rounds`` rounds) and whether
    the next round's learning rate rises (the round stalled, or its pace would miss the target). A concept that
    reaches the target in the first round is trained exactly as with ``lora_target`` 0."""

    settings: MaceSettings
    start: float | None  # the probe before training; None (not measured): one round
    lr: float = 0.0
    steps: int = 0
    rounds: int = 0
    last: float | None = None

    def __post_init__(self) -> None:
        self.lr = self.settings.lora_lr
        self.last = self.start

    def fraction(self) -> float | None:
        if self.start is None or self.last is None:
            return None
        return self.last / self.start if self.start > 0 else 0.0

    def finished(self, probe: float | None) -> bool:
        """Called after each round of ``lora_steps`` with the probe loss then: whether training stops (else the
        next round's learning rate is set)."""
        s = self.settings
        self.steps += s.lora_steps
        self.rounds += 1
        before, self.last = self.last, probe
        frac = self.fraction()
        if not s.lora_target or frac is None or frac <= s.lora_target or self.rounds >= s.lora_max_rounds:
            return True
        if before is not None and before > 0 and probe is not None and self._too_slow(probe / before, frac):
            self.lr = min(self.lr * LORA_LR_RAISE, s.lora_lr * LORA_LR_MAX)
        return False

    def _too_slow(self, ratio: float, frac: float) -> bool:
        """The round just finished stalled (kept more than ``LORA_STALL`` of the loss it started from), or at its
        pace the target would not be reached in the rounds left."""
        if ratio > LORA_STALL:
            return True
        s = self.settings
        needed = math.log(s.lora_target / frac) / math.log(ratio) if 0 < ratio < 1 and frac > 0 else math.inf
        return needed > s.lora_max_rounds - self.rounds

    def note(self, name: str) -> str:
        """What the next round does, for the log."""
        return (f"{name!r}: attention loss at {self.fraction():.1%} of its start after {self.steps} steps (target "
                f"{self.settings.lora_target:.0%}); {self.settings.lora_steps} more at learning rate {self.lr:.3g}")

    def info(self) -> dict:
        """What the schedule did, for the summary, the console and the metadata."""
        frac = self.fraction()
        return {"steps": self.steps, "lr": self.lr, "fraction": None if frac is None else round(frac, 4),
                "target_reached": None if frac is None or not self.settings.lora_target
                else frac <= self.settings.lora_target}


@dataclass
class LoraResult:
    weights: ErasureWeights
    losses: list[float] = field(default_factory=list)
    suppress_end: bool = True  # whether the loss covered the end token and padding (``suppress_end`` resolved)
    #: the attention loss on the fixed probe before and after training (``None``: not measured)
    probe: tuple[float, float] | None = None
    #: the LoRA prompts' token embeddings ``[n * L, D]`` (float64, CPU) when they are the concept's prompts: the
    #: fusion's ``E_i``, so that ``mace`` need not encode them again (it drops them once they are added)
    prompt_embeds: torch.Tensor | None = field(default=None, repr=False)
    #: what ``LoraRounds`` did: steps, final learning rate, probe fraction, whether the target was reached
    schedule: dict = field(default_factory=dict)

    def stalled(self) -> bool:
        return self.probe is not None and self.probe[0] > 0 and self.probe[1] / self.probe[0] > STALLED_LOSS


def _probe_draws(data: ConceptData, cond: TextConditioning, pt: torch.Tensor, seed: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The probe's fixed samples: timesteps, image and prompt indices, noise (``PROBE_SAMPLES`` each)."""
    gen = torch.Generator().manual_seed(seed + 7919)
    n = PROBE_SAMPLES
    cdf = torch.cumsum(pt, 0)
    ts = torch.searchsorted(cdf, (torch.arange(n, dtype=cdf.dtype) + 0.5) / n).clamp_max(len(pt) - 1)
    img = torch.arange(n) % data.latents.shape[0]
    pidx = torch.arange(n) % len(cond)
    noise = torch.randn((n, *data.latents.shape[1:]), generator=gen)
    return ts, img, pidx, noise


@torch.no_grad()
def probe_loss(backbone: Backbone, data: ConceptData, cond: TextConditioning, positions: torch.Tensor,
               pt: torch.Tensor, seed: int, chunk: int = PROBE_CHUNK) -> float:
    """Mean attention loss over ``PROBE_SAMPLES`` fixed samples (see ``PROBE_SAMPLES``)."""
    ts, img, pidx, noise = _probe_draws(data, cond, pt, seed)
    n = len(ts)
    total = 0.0
    for i in range(0, n, chunk):
        sl = slice(i, i + chunk)
        x0 = data.latents[img[sl]].to(backbone.device, backbone.dtype)
        t = ts[sl].to(backbone.device)
        x_t = backbone.schedule.add_noise(x0, noise[sl].to(x0), t)
        loss_fn = AttentionLoss(positions[pidx[sl]], data.masks[img[sl]])
        with backbone.capture_attention(loss_fn):
            backbone.predict_noise(x_t, t, cond[pidx[sl]].to(backbone.device))
        total += float(loss_fn.total) * len(t) if loss_fn.total is not None else 0.0
    return total / n


@torch.no_grad()
def probe_losses(backbone: Backbone, items: list[tuple[ConceptData, TextConditioning, torch.Tensor]],
                 pt: torch.Tensor, seed: int, lora: BatchedLoRA, chunk: int = PROBE_CHUNK,
                 slots: list[int] | None = None) -> list[float]:
    """``probe_loss`` for several concepts at once, concept ``k`` through ``lora``'s slot ``slots[k]`` (default
    ``k``): the same samples, each chunk of ``chunk`` samples normalised on its own as ``probe_loss`` does, several
    chunks per forward."""
    slots = list(range(len(items))) if slots is None else slots
    rows = []  # one per chunk: (item, x0, t, noise, cond, positions, masks)
    for k, (data, cond, positions) in enumerate(items):
        ts, img, pidx, noise = _probe_draws(data, cond, pt, seed)
        for i in range(0, len(ts), chunk):
            sl = slice(i, i + chunk)
            rows.append((k, data.latents[img[sl]], ts[sl], noise[sl], cond[pidx[sl]], positions[pidx[sl]],
                         data.masks[img[sl]]))
    sums = [0.0] * len(items)
    per_forward = len(items)  # chunks per UNet call: one per concept (no gradients: far less memory than training)
    for start in range(0, len(rows), per_forward):
        part = rows[start:start + per_forward]
        sizes = [len(r[2]) for r in part]
        x0 = torch.cat([r[1] for r in part]).to(backbone.device, backbone.dtype)
        t = torch.cat([r[2] for r in part]).to(backbone.device)
        x_t = backbone.schedule.add_noise(x0, torch.cat([r[3] for r in part]).to(x0), t)
        dev = backbone.device
        groups = torch.repeat_interleave(torch.arange(len(part)), torch.tensor(sizes)).to(dev)
        loss_fn = AttentionLoss(torch.cat([r[5] for r in part]).to(dev), torch.cat([r[6] for r in part]).to(dev),
                                groups=groups, n_groups=len(part))
        lora.slots = torch.repeat_interleave(torch.tensor([slots[r[0]] for r in part]), torch.tensor(sizes)).to(dev)
        with backbone.capture_attention(loss_fn):
            backbone.predict_noise(x_t, t, TextConditioning.cat([r[4] for r in part]).to(backbone.device))
        if loss_fn.total is not None:
            for j, r in enumerate(part):
                sums[r[0]] += float(loss_fn.total[j]) * sizes[j]
    return [v / PROBE_SAMPLES for v in sums]


def _timestep_distribution(backbone: Backbone, s: MaceSettings) -> torch.Tensor:
    """The LoRA stage's ``p(t)``: MACE's (``importance_sampling``) or uniform."""
    pt = timestep_weights(backbone.schedule.num_timesteps)
    return pt if s.importance_sampling else torch.full_like(pt, 1.0 / len(pt))


def _lora_inputs(backbone: Backbone, data: ConceptData, s: MaceSettings, end: bool
                 ) -> tuple[list[str], TextConditioning, torch.Tensor]:
    """A concept's LoRA prompts, their encoding and the ``[n, L]`` 0/1 rows of the positions its loss suppresses."""
    prompts = lora_prompts(data, s.augment)
    with torch.no_grad():
        cond = backbone.encode_text(prompts)
    positions = torch.zeros(len(prompts), cond.embeds.shape[1])
    for i, p in enumerate(prompts):
        positions[i, suppressed_positions(backbone, p, data.concept.text, end, s.suppress_following)] = 1.0
    return prompts, cond, positions


def _fusion_embeds(data: ConceptData, prompts: list[str], cond: TextConditioning) -> torch.Tensor | None:
    """The LoRA prompts' embeddings ``[n * L, D]`` for the fusion, when they are the concept's prompts."""
    if prompts != data.concept.prompts():
        return None
    embeds = cond.embeds.double().cpu()
    return embeds.reshape(-1, embeds.shape[-1])


def train_lora(backbone: Backbone, data: ConceptData, base: ErasureWeights | None, s: MaceSettings,
               progress: Progress | None = None, probe: bool = True, keep: torch.Tensor | None = None
               ) -> LoraResult:
    """Stage 3 for one concept: a rank-``s.lora_rank`` K/V LoRA on top of ``base`` (the CFR edit). ``keep``
    (``protect``: ``I - V V^T`` of the prior): the LoRA's input side is kept in its range from the start, and each
    step's gradient is projected before the clip and AdamW (projected gradient descent), so the LoRA learns with the
    directions the fused result will keep instead of losing its protected part afterwards."""
    progress = as_progress(progress)
    gen = torch.Generator().manual_seed(s.seed)
    end = resolve_suppress_end(backbone, data.concept, s)
    pt = _timestep_distribution(backbone, s)
    unet = backbone.unet()
    losses: list[float] = []
    base = base or ErasureWeights()
    prompts, cond_all, positions = _lora_inputs(backbone, data, s, end)
    with base.applied(unet), TrainableLoRA(backbone.cross_attention_kv(), rank=s.lora_rank, generator=gen) as lora:
        opt = torch.optim.AdamW(lora.parameters(), lr=s.lora_lr)
        if keep is not None:
            lora.project_inputs(keep)
        n = data.latents.shape[0]
        # the LoRA starts at zero: the probe measures the base model
        probe_before = probe_loss(backbone, data, cond_all, positions, pt, s.seed) if probe else None
        rounds = LoraRounds(s, probe_before)
        while True:
            for _step in range(s.lora_steps):
                progress.check()
                idx = torch.randint(0, n, (s.lora_batch,), generator=gen)
                x0 = data.latents[idx].to(backbone.device, backbone.dtype)
                t = torch.multinomial(pt, s.lora_batch, replacement=True, generator=gen).to(backbone.device)
                noise = torch.randn(x0.shape, generator=gen).to(x0)
                x_t = backbone.schedule.add_noise(x0, noise, t)
                pidx = (torch.randint(0, len(prompts), (s.lora_batch,), generator=gen) if len(prompts) > 1
                        else torch.zeros(s.lora_batch, dtype=torch.long))
                loss_fn = AttentionLoss(positions[pidx], data.masks[idx])
                with backbone.capture_attention(loss_fn):
                    backbone.predict_noise(x_t, t, cond_all[pidx].to(backbone.device))
                loss = loss_fn.total
                if loss is None or not torch.isfinite(loss):
                    raise TrainingDivergedError(f"MACE attention loss is {loss} for {data.concept.text!r}: "
                                                "lower lora_lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if keep is not None:
                    lora.project_input_grads(keep)
                torch.nn.utils.clip_grad_norm_(lora.parameters(), s.grad_clip)
                opt.step()
                if keep is not None:  # AdamW's per-element step leaves the range; bring it back
                    lora.project_inputs(keep)
                losses.append(float(loss.detach()))
                progress.step()
            now = probe_loss(backbone, data, cond_all, positions, pt, s.seed) if probe else None
            if rounds.finished(now):
                break
            progress.say(rounds.note(data.concept.text))
            progress.extend(s.lora_steps)
            for group in opt.param_groups:
                group["lr"] = rounds.lr
        if not lora.all_finite():
            raise TrainingDivergedError(f"MACE LoRA for {data.concept.text!r} became non-finite: lower lora_lr")
        measured = (probe_before, now) if probe else None
        w = lora.result(method="mace-lora", concepts=[data.concept.text], anchors=[data.concept.anchor],
                        settings={**asdict(s), "suppress_end": end}, schedule=rounds.info())
    return LoraResult(w, losses, end, measured, _fusion_embeds(data, prompts, cond_all), rounds.info())


def train_loras(backbone: Backbone, datas: list[ConceptData], base: ErasureWeights | None, s: MaceSettings,
                progress: Progress | None = None, probe: bool = True, ends: list[bool] | None = None,
                keep: torch.Tensor | None = None) -> list[LoraResult]:
    """``train_lora`` for several concepts in one UNet forward per step (issue 20): each concept keeps its own LoRA
    (a slot of a ``BatchedLoRA``), random draws (its own generator seeded as ``train_lora`` seeds it), AdamW
    state, gradient clipping and loss normalisation, so each result equals ``train_lora`` on that concept alone to
    float rounding (``tests/test_mace_batched.py``). The concepts' latents must share one shape. ``ends``: each
    concept's ``suppress_end`` when already resolved; ``keep`` as in ``train_lora``."""
    progress = as_progress(progress)
    if len({tuple(d.latents.shape[1:]) for d in datas}) != 1:
        raise ValueError("train_loras: the concepts' latents differ in shape; train them in separate batches")
    pt = _timestep_distribution(backbone, s)
    gens = [torch.Generator().manual_seed(s.seed) for _ in datas]
    ends = ends if ends is not None else [resolve_suppress_end(backbone, d.concept, s) for d in datas]
    prompts, conds, positions = zip(*(_lora_inputs(backbone, d, s, end) for d, end in zip(datas, ends, strict=True)),
                                    strict=True)
    k_all = len(datas)
    b = s.lora_batch
    losses: list[list[float]] = [[] for _ in datas]
    unet = backbone.unet()
    base = base or ErasureWeights()
    items = list(zip(datas, conds, positions, strict=True))
    with base.applied(unet), BatchedLoRA(backbone.cross_attention_kv(), s.lora_rank, gens) as lora:
        opt = SlotAdamW(list(lora.parameters()), [s.lora_lr] * k_all)
        if keep is not None:
            lora.project_inputs(keep)
        before = probe_losses(backbone, items, pt, s.seed, lora) if probe else None
        rounds = [LoraRounds(s, before[k] if before is not None else None) for k in range(k_all)]
        after: list[float | None] = [None] * k_all
        active = list(range(k_all))  # the concepts still training: a finished one leaves the batch
        while active:
            # each sample's concept: the LoRA slot and the loss group, on the device once (every hooked layer reads
            # them)
            slots = torch.tensor(active).repeat_interleave(b).to(backbone.device)
            groups = torch.arange(len(active)).repeat_interleave(b).to(backbone.device)
            for _step in range(s.lora_steps):
                progress.check()
                x0s, ts, noises, cs, pos_rows, masks = [], [], [], [], [], []
                for k in active:  # each concept's draws, in train_lora's order
                    d, cond, pos = items[k]
                    g = gens[k]
                    idx = torch.randint(0, d.latents.shape[0], (b,), generator=g)
                    x0s.append(d.latents[idx])
                    ts.append(torch.multinomial(pt, b, replacement=True, generator=g))
                    noises.append(torch.randn((b, *d.latents.shape[1:]), generator=g))
                    pidx = (torch.randint(0, len(cond), (b,), generator=g) if len(cond) > 1
                            else torch.zeros(b, dtype=torch.long))
                    cs.append(cond[pidx])
                    pos_rows.append(pos[pidx])
                    masks.append(d.masks[idx])
                x0 = torch.cat(x0s).to(backbone.device, backbone.dtype)
                t = torch.cat(ts).to(backbone.device)
                x_t = backbone.schedule.add_noise(x0, torch.cat(noises).to(x0), t)
                loss_fn = AttentionLoss(torch.cat(pos_rows).to(backbone.device),
                                        torch.cat(masks).to(backbone.device), groups=groups, n_groups=len(active))
                lora.slots = slots
                with backbone.capture_attention(loss_fn):
                    backbone.predict_noise(x_t, t, TextConditioning.cat(cs).to(backbone.device))
                loss = loss_fn.total
                values = [float("nan")] * len(active) if loss is None else loss.detach().cpu().tolist()  # one sync
                if not all(math.isfinite(v) for v in values):
                    bad = [datas[k].concept.text for k, v in zip(active, values, strict=True) if not math.isfinite(v)]
                    raise TrainingDivergedError(f"MACE attention loss is not finite for {', '.join(map(repr, bad))}: "
                                                "lower lora_lr")
                opt.zero_grad()
                loss.sum().backward()  # each slot's gradient is its own concept's loss's
                if keep is not None:
                    lora.project_input_grads(keep)
                lora.clip_grad_norm_per_slot(s.grad_clip)
                opt.step(active)
                if keep is not None:
                    lora.project_inputs(keep)
                for k, v in zip(active, values, strict=True):
                    losses[k].append(v)
                progress.step(len(active))
            now = (probe_losses(backbone, [items[k] for k in active], pt, s.seed, lora, slots=active) if probe
                   else [None] * len(active))
            still = []
            for k, v in zip(active, now, strict=True):
                after[k] = v
                if not rounds[k].finished(v):
                    still.append(k)
                    opt.lr[k] = rounds[k].lr
                    progress.say(rounds[k].note(datas[k].concept.text))
            progress.extend(s.lora_steps * len(still))
            active = still
        for k, d in enumerate(datas):
            if not lora.slot_finite(k):
                raise TrainingDivergedError(f"MACE LoRA for {d.concept.text!r} became non-finite: lower lora_lr")
        results = []
        for k, d in enumerate(datas):
            info = rounds[k].info()
            w = lora.result(k, method="mace-lora", concepts=[d.concept.text], anchors=[d.concept.anchor],
                            settings={**asdict(s), "suppress_end": ends[k]}, schedule=info)
            measured = (before[k], after[k]) if before is not None and after[k] is not None else None
            results.append(LoraResult(w, losses[k], ends[k], measured, _fusion_embeds(d, prompts[k], conds[k]),
                                      info))
    return results


# -- the pipeline ------------------------------------------------------------------------------------------------
@dataclass
class MaceResult:
    weights: ErasureWeights
    cfr: ErasureWeights
    loras: list[LoraResult]
    data: list[ConceptData]
    seconds: float = 0.0
    unet_evaluations: int = 0  # samples through the UNet (a backward counts as one more), whatever the batching
    unet_calls: int = 0  # UNet calls (a backward counts as one): what batching concepts reduces
    concept_batch: int = 1  # concepts per batch used (``concept_batch`` resolved)
    #: ``||dW|| / ||W||`` of the fused edit per layer group (``weights.relative_change``)
    relative_change: dict[str, float] = field(default_factory=dict)


def schedule_text(info: dict, s: MaceSettings) -> str:
    """One line on what a concept's LoRA schedule did (``LoraRounds.info``), for the console and the summary."""
    if not info:
        return "LoRA schedule not recorded"
    frac = info.get("fraction")
    text = f"LoRA {info['steps']} steps, learning rate {info['lr']:.3g}"
    if frac is None:
        return text + " (probe not measured)"
    text += f", attention loss at {frac:.1%} of its start"
    if info.get("target_reached") is None:
        return text
    return text + (f" (target {s.lora_target:.0%} reached)" if info["target_reached"]
                   else f" (target {s.lora_target:.0%} not reached in {s.lora_max_rounds} rounds)")


def _eta(started: float, done: int, total: int, size: int = 1) -> str:
    """`` (k/n; about X left)`` (``k-l/n`` for a batch of ``size`` items) from the mean time of the finished items;
    no estimate before the first one."""
    if total <= 1:
        return ""
    which = f"{done + 1}" if size <= 1 else f"{done + 1}-{done + size}"
    if done <= 0:
        return f" ({which}/{total})"
    left = (time.time() - started) / done * (total - done)
    when = f"{left / 3600:.1f} h" if left >= 5400 else f"{left / 60:.0f} min" if left >= 90 else f"{left:.0f} s"
    return f" ({which}/{total}; about {when} left in this stage)"


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[k:k + size] for k in range(0, len(items), size)]


def work_manifest(backbone: Backbone, concepts: list[Concept], settings: MaceSettings, prior: torch.Tensor | None,
                  user_data: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None) -> dict:
    """What a MACE work directory (``erasure.workdir``) is tied to: everything a finished concept's LoRA depends
    on (settings, base model, prior, the concept list, which the CFR edit under every LoRA depends on, and users'
    own images)."""
    fingerprint = backbone.fingerprint() if hasattr(backbone, "fingerprint") else "unknown"
    items = []
    for c in concepts:
        user = (user_data or {}).get(c.text)
        items.append({**asdict(c), "user_data": None if user is None else [tensor_hash(user[0]),
                                                                            tensor_hash(user[1])]})
    # the concept batch changes the result by float rounding only: a resumed run may use another one
    kept = {k: v for k, v in asdict(settings).items() if k != "concept_batch"}
    return {"method": "mace", "settings": kept, "base_model": fingerprint,
            "prior": matrix_sketch(prior), "concepts": items}


@entry_point("MACE", "the resolution, images_per_concept or lora_batch")
def mace(backbone: Backbone, concepts: list[Concept], settings: MaceSettings, prior: torch.Tensor | None,
         user_data: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None,
         progress: Progress | None = None, work_dir: str | Path | None = None) -> MaceResult:
    """All four stages. ``user_data[concept] = (latents, masks or None)`` replaces stage 1 for that concept.

    ``work_dir``: each finished concept's LoRA and fusion terms are written there, and a rerun with the same inputs
    skips the concepts found there (a different run's directory is refused). Several processes (``torch.distributed``
    initialised, e.g. by ``distributed.init_from_env`` under ``torchrun``): each rank generates and trains its share
    of the concepts (``distributed.owned``); the CFR's and the fusion's sums are added up over the ranks, and every
    rank returns the same fused weights. ``loras`` then holds every concept's ``LoraResult``, with weights only for
    this rank's concepts; ``data`` holds the concepts this process generated in this run. Both: docs/mace.md, "Many
    concepts"."""
    validation.check_mace_inputs(backbone, concepts, settings)
    progress = as_progress(progress)
    t0 = time.time()
    s = settings
    several = distributed.active()
    mine = distributed.owned(len(concepts))
    wd = (WorkDir.open(work_dir, work_manifest(backbone, concepts, s, prior, user_data)) if work_dir is not None
          else None)
    loaded = {}
    for i in mine if wd is not None else ():
        got = wd.load(i)
        if got is not None:
            loaded[i] = got
    if wd is not None:
        progress.say(f"work directory {wd.path}: {len(loaded)} of {len(mine)} concepts finished already"
                     + (f" (this process's share of {len(concepts)})" if several else ""))
        # a progress total over this process's concepts (sampling steps + LoRA steps each) stays right
        progress.step(sum((0 if concepts[i].text in (user_data or {}) else s.sample_steps) + s.lora_steps
                          for i in loaded))
    todo = [i for i in mine if i not in loaded]
    batch = resolve_concept_batch(backbone, concepts, s) if todo else 1
    if batch > 1:
        progress.say(f"{batch} concepts per batch (concept_batch"
                     f"{'' if s.concept_batch is not None else ', automatic'})")
    evals = calls = 0
    data: dict[int, ConceptData] = {}
    started = time.time()
    users = [i for i in todo if concepts[i].text in (user_data or {})]
    generated = [i for i in todo if i not in users]
    done = 0
    for group in [[i] for i in users] + _chunks(generated, batch):
        names = ", ".join(repr(concepts[i].text) for i in group)
        progress.say(f"stage 1/4: generating {s.images_per_concept} images of {names}"
                     + _eta(started, done, len(todo), len(group)))
        if group[0] in users:
            user = user_data[concepts[group[0]].text]  # type: ignore[index]
            data[group[0]] = generate_data(backbone, concepts[group[0]], s, user_masks=user[1],
                                           user_latents=user[0], progress=progress)
        else:
            for i, d in zip(group, generate_data_batch(backbone, [concepts[i] for i in group], s, progress),
                            strict=True):
                data[i] = d
            evals += 2 * s.images_per_concept * s.sample_steps * len(group)
            calls += s.sample_steps * -(-len(group) * s.images_per_concept // SAMPLE_BATCH)
        done += len(group)
    lam, scale = resolved_lam(backbone, concepts, s)
    progress.say(f"stage 2/4: closed-form refinement of the cross-attention K/V (lam {s.lam:g}"
                 + (f" x {scale:.3g} for this model's token energy = {lam:.3g})" if s.lam_relative else ")"))
    residues: dict[str, float] = {}
    cfr = refine(backbone, concepts, prior, lam, s.preserve, end_residues=residues, mine=mine if several else None)
    keep, protected = (protected_complement(prior, s.protect) if s.protect > 0 and prior is not None
                       else (None, None))
    # stage 4's system is built as the LoRAs finish: each enters with the prompt embeddings it trained on
    system = FusionSystem(backbone, mean_prompt_count([[c] for c in concepts]))
    loras: dict[int, LoraResult] = {}
    for i in mine:
        if i in loaded:
            weights, embeds, info = loaded.pop(i)
            probe = tuple(info["probe"]) if info["probe"] is not None else None
            loras[i] = LoraResult(weights, list(info["losses"]), bool(info["suppress_end"]), probe,
                                  schedule=info.get("schedule") or {})
            system.add(concepts[i], weights, embeddings=embeds)
    # concepts train together when their latents share a shape (users' images may have their own size)
    shapes: dict[tuple[int, ...], list[int]] = {}
    for i in todo:
        shapes.setdefault(tuple(data[i].latents.shape[1:]), []).append(i)
    started, done = time.time(), 0
    for group in [g for same in shapes.values() for g in _chunks(same, batch)]:
        names = ", ".join(repr(concepts[i].text) for i in group)
        progress.say(f"stage 3/4: attention-loss LoRA for {names}" + _eta(started, done, len(todo), len(group)))
        ends = [s.suppress_end if s.suppress_end is not None else residues[concepts[i].text] >= END_RESIDUE_MIN
                for i in group]
        if len(group) == 1:
            results = [train_lora(backbone, data[group[0]], cfr, s.override(suppress_end=ends[0]), progress,
                                  keep=keep)]
        else:
            results = train_loras(backbone, [data[i] for i in group], cfr, s, progress, ends=ends, keep=keep)
        # forward and backward per step; the probe before training and after each round
        n_rounds = max(lr.schedule.get("steps", s.lora_steps) for lr in results) // s.lora_steps
        calls += s.lora_steps * n_rounds * 2 + (1 + n_rounds) * -(-PROBE_SAMPLES // PROBE_CHUNK)
        for i, lr in zip(group, results, strict=True):
            c = concepts[i]
            loras[i] = lr
            if wd is not None:
                wd.save(i, lr.weights, lr.prompt_embeds, {"losses": lr.losses, "suppress_end": lr.suppress_end,
                                                          "probe": list(lr.probe) if lr.probe is not None else None,
                                                          "schedule": lr.schedule})
            system.add(c, lr.weights, embeddings=lr.prompt_embeds)
            lr.prompt_embeds = None
            steps = lr.schedule.get("steps", s.lora_steps)
            evals += steps * s.lora_batch * 2 + (1 + steps // s.lora_steps) * PROBE_SAMPLES
            progress.say(f"{c.text!r}: {schedule_text(lr.schedule, s)}")
            if lr.stalled():
                a, b = lr.probe
                progress.say(f"warning: the attention loss of {c.text!r} only went from {a:.3g} to {b:.3g} on "
                             f"the fixed probe: its LoRA barely changed the attention (lr {lr.schedule['lr']:.3g}, "
                             f"{steps} steps); raise the LoRA learning rate, its steps or its rounds (CLI: --lr, "
                             "--steps, --max-rounds; ComfyUI: lora_lr, lora_steps, lora_max_rounds on a MACE "
                             "Settings node)")
        done += len(group)
    progress.say("stage 4/4: closed-form fusion")
    system.all_reduce([[c] for c in concepts])  # several processes: every rank's sums; one: nothing to do
    fused = system.solve(cfr, prior, lam, s.fuse_preserve)  # = fuse(backbone, [(c, lr.weights), ...], cfr, ...)
    if keep is not None:
        fused = fused.projected(keep, backbone.cross_attention_kv())
        progress.say(f"the K/V change kept off {protected} of {keep.shape[0]} text-embedding directions "
                     f"({s.protect:.2%} of the prior prompts' token energy)")
    elif s.protect > 0:
        progress.say("protect: no prior prompts were given, so the K/V change is not projected")
    if several:  # the other ranks' LoRAs: their losses and probes (not their weights) for the summary
        for part in distributed.all_gather_object({i: LoraResult(ErasureWeights(), lr.losses, lr.suppress_end,
                                                                  lr.probe, schedule=lr.schedule)
                                                   for i, lr in loras.items()}):
            for i, lr in part.items():
                loras.setdefault(i, lr)
        evals, calls = (int(v) for v in distributed.all_reduce_(torch.tensor([evals, calls], dtype=torch.float64)))
    ordered = [loras[i] for i in range(len(concepts))]
    used = {c.text: lr.suppress_end for c, lr in zip(concepts, ordered, strict=True)}  # suppress_end=None resolved
    schedules = {c.text: lr.schedule for c, lr in zip(concepts, ordered, strict=True)}  # what each LoRA did
    change = relative_change(fused, dict(backbone.unet().named_modules()))
    progress.say(f"the MACE edit: {change_text(change)}")
    fused.metadata.update(ErasureWeights.dense({}, method="mace", settings={**asdict(s), "suppress_end_used": used},
                                               lora_schedule=schedules, lam_scale=scale,
                                               protect_used=protected is not None,
                                               relative_change=change).metadata)
    fused.metadata.update(joined_curve([(c.text, lr.losses) for c, lr in zip(concepts, ordered, strict=True)]))
    return MaceResult(fused, cfr, ordered, [data[i] for i in sorted(data)], round(time.time() - t0, 2), evals,
                      calls, batch, change)
