"""The exemption run as mace-lab-clip-blue-s0-r4 (EXEMPT_R=4, EXEMPT_ENERGY=0.9: one direction held 91.5%)."""
import os

import torch

from erasure.lab import world

R = int(os.environ.get("EXEMPT_R", "4")); EN = float(os.environ.get("EXEMPT_ENERGY", "0.9"))


def word_embeddings(bb, words, templates):
    """The words' token embeddings at their positions in their templates, [n, D] float64."""
    rows = []
    for w in words:
        prompts = [t.replace("{c}", w) for t in templates]
        e = bb.encode_text(prompts).embeds.double().cpu()
        for i, p in enumerate(prompts):
            for pos in bb.token_positions(p, w):
                rows.append(e[i, pos])
    return torch.stack(rows)


def exempt(keep, k, bb, concept_words_templates, g=None):
    """keep = I - V V^T (k directions); return I - U U^T with U spanning V's columns projected off the concept
    words' principal token directions (the words' embeddings at their positions in their templates)."""
    D = keep.shape[0]
    qs = []
    for words, templates in concept_words_templates:
        X = word_embeddings(bb, words, templates)
        _, sv, vt = torch.linalg.svd(X, full_matrices=False)
        en = (sv**2).cumsum(0) / (sv**2).sum()
        r = min(int((en < EN).sum()) + 1, R)
        qs.append(vt[:r])
    Q, _ = torch.linalg.qr(torch.cat(qs).T)
    V = torch.linalg.eigh(torch.eye(D, dtype=torch.float64) - keep.double())[1][:, -k:]
    V2 = V - Q @ (Q.T @ V)
    U, S, _ = torch.linalg.svd(V2, full_matrices=False)
    U = U[:, S > 1e-6]
    return (torch.eye(D, dtype=torch.float64) - U @ U.T).float(), U.shape[1]


def words_for(c):
    return [c] + (list(world.SYNONYMS.get(c, ())) if os.environ.get("EXEMPT_SYN") == "1" else [])
