"""The lab's erasure metrics, as pure functions of classifier hits and images.

- ``accuracy`` of a concept: the fraction of images generated from its own prompts that the classifier assigns to it.
- ``efficacy`` = 1 - mean accuracy over the erased concepts (their own prompts).
- ``generality`` = 1 - mean synonym accuracy over the erased concepts (prompts that use their synonyms).
- ``specificity`` = mean accuracy over every other concept.
- ``H`` = harmonic mean of efficacy, generality and specificity (0 if any is 0).
- ``fidelity`` = 1 - mean absolute pixel difference (on a 0..1 scale) between the edited and the original model's
  images for the unrelated prompts (the other concepts' prompts), same seeds. 1 means identical images; two
  unrelated random lab images differ by about 0.25, so fidelity 0.95 means small local changes.
"""

from __future__ import annotations

import torch


def harmonic_mean(values: list[float]) -> float:
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def fidelity(edited: torch.Tensor, original: torch.Tensor) -> float:
    """1 - mean |edited - original| with images in [-1, 1] mapped to [0, 1]."""
    if edited.shape != original.shape:
        raise ValueError("fidelity needs images of the same shape")
    if edited.numel() == 0:
        return 1.0
    return 1.0 - float((edited.float() - original.float()).abs().mean() / 2)


def summarise(accuracy: dict[str, float], synonym_accuracy: dict[str, float], erased: list[str],
              fidelity_value: float) -> dict[str, float]:
    """Efficacy, generality, specificity, H and fidelity from per-concept accuracies."""
    unknown = [c for c in erased if c not in accuracy]
    if unknown:
        raise KeyError(f"erased concepts not in the evaluation: {unknown}")
    others = [c for c in accuracy if c not in erased]
    efficacy = 1.0 - sum(accuracy[c] for c in erased) / len(erased)
    generality = 1.0 - sum(synonym_accuracy[c] for c in erased) / len(erased)
    specificity = sum(accuracy[c] for c in others) / len(others) if others else 1.0
    return {
        "efficacy": efficacy,
        "generality": generality,
        "specificity": specificity,
        "H": harmonic_mean([efficacy, generality, specificity]),
        "fidelity": fidelity_value,
    }
