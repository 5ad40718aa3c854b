"""MACE's published pipeline, as the benchmark's yardstick (not part of the library; never used to erase).

What differs from the library, as the reference code does it:

* **Per-layer prior caches**: for every K/V matrix the reference computes, from the prior prompts' token
  embeddings, and keeps two matrices, ``C = sum p p^T`` (D x D) and ``W0 C`` (out x D), all resident together
  (``prior_caches``). The library keeps one D x D matrix for all layers.
* **Unbatched generation**: each training image is its own sampling run (one image, classifier-free guidance in a
  batch of two, as a diffusers pipeline call with one image does). The reference's GroundingDINO + SAM masks are
  not run here (their cost is left out, in the reference's favour): masks are the whole image.
* **float32 explicit inverses**: refinement and fusion solve ``W = M1 inv(M2)`` with ``torch.inverse`` in float32,
  accumulating ``M1``, ``M2`` per concept and per layer (``E_i E_i^T`` recomputed inside the layer loop).

Stage 3 (the attention-loss LoRA) is the same algorithm in both, so both call the library's ``train_lora`` (the
reference's call with the end token always suppressed and without the probe loss ours measures).
"""

from __future__ import annotations

import torch

from erasure.diffusers_backbone import DiffusersBackbone
from erasure.fusion import concept_token_embeddings
from erasure.mace import ConceptData, MaceSettings, aligned_pairs, train_lora
from erasure.prior import token_embeddings
from erasure.prompts import Concept
from erasure.sampling import sample
from erasure.weights import ErasureWeights


def prior_caches(bb: DiffusersBackbone, prompts: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per K/V layer ``(C, W0 C)`` in float32, computed layer by layer from the prior prompts' tokens."""
    e = token_embeddings(bb, prompts).float()
    e = e.reshape(-1, e.shape[-1])
    caches = {}
    for name, m in bb.cross_attention_kv().items():
        w0 = m.weight.detach().float().cpu()
        c = e.T @ e / len(prompts)
        caches[name] = (c, w0 @ c)
    return caches


def generate_unbatched(bb: DiffusersBackbone, concept: Concept, s: MaceSettings) -> ConceptData:
    """One sampling run per image (no attention capture: the reference's masks come from detectors)."""
    prompt = concept.generation_prompt()
    latents = [sample(bb, [prompt], [s.seed * 1000 + i], s.sample_steps, s.guidance, decode=False).latents
               for i in range(s.images_per_concept)]
    x = torch.cat(latents)
    return ConceptData(concept, prompt, x, torch.ones(x.shape[0], *x.shape[2:]))


def reference_cfr(bb: DiffusersBackbone, concepts: list[Concept], caches: dict, lam: float,
                  preserve: float) -> ErasureWeights:
    """Closed-form refinement, float32, explicit inverse per layer."""
    pairs = [aligned_pairs(bb, c) for c in concepts]
    deltas = {}
    for name, m in bb.cross_attention_kv().items():
        w0 = m.weight.detach().float().cpu()
        c, w0c = caches[name]
        mat1 = lam * w0 + preserve * w0c
        mat2 = lam * torch.eye(w0.shape[1]) + preserve * c
        for ef, eg in pairs:
            ef, eg = ef.float(), eg.float()
            mat1 += (eg @ w0.T).T @ ef
            mat2 += ef.T @ ef
        deltas[name] = mat1 @ torch.inverse(mat2) - w0
    return ErasureWeights.dense(deltas, method="reference-cfr")


def reference_fuse(bb: DiffusersBackbone, concepts: list[Concept], loras: list[ErasureWeights],
                   base: ErasureWeights | None, caches: dict, lam: float, preserve: float) -> ErasureWeights:
    """Closed-form fusion, float32, explicit inverse; ``E_i E_i^T`` recomputed for every layer."""
    embeds = [concept_token_embeddings(bb, c).float() for c in concepts]
    deltas = {}
    for name, m in bb.cross_attention_kv().items():
        w0 = m.weight.detach().float().cpu()
        wb = w0 + (base.deltas[name].matrix() if base is not None and name in base.deltas else 0)
        c, w0c = caches[name]
        mat1 = lam * wb + preserve * w0c
        mat2 = lam * torch.eye(w0.shape[1]) + preserve * c
        for e, lw in zip(embeds, loras, strict=True):
            g = e.T @ e
            dw = lw.deltas[name].matrix() if name in lw.deltas else 0
            mat1 += (wb + dw) @ g
            mat2 += g
        deltas[name] = mat1 @ torch.inverse(mat2) - w0
    return ErasureWeights.dense(deltas, method="reference-fused")


def reference_mace(bb: DiffusersBackbone, concepts: list[Concept], s: MaceSettings, caches: dict) -> ErasureWeights:
    """The four stages, the reference's way."""
    # its objects' masks and p(t), its positions (no following words); the library's default differs
    # (docs/mace.md#where-and-when-the-loss-looks)
    s = s.override(use_masks=True, importance_sampling=True, suppress_following=False)
    data = [generate_unbatched(bb, c, s) for c in concepts]
    cfr = reference_cfr(bb, concepts, caches, s.lam, s.preserve)
    # the reference suppresses the end token and padding always (``use_pooler``), never measuring whether they carry
    # the concept, and measures no probe loss
    loras = [train_lora(bb, d, cfr, s.override(suppress_end=True), probe=False).weights for d in data]
    return reference_fuse(bb, concepts, loras, cfr, caches, s.lam, s.fuse_preserve)
