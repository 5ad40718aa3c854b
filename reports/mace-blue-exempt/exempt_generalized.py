import os, torch
from erasure.lab import world
from exempt_principal import word_embeddings
R = int(os.environ.get("EXEMPT_R", "1"))

def exempt(keep, k, bb, concept_words_templates, g):
    """keep = I - V V^T (k directions); return I - U U^T with U spanning V's columns projected off each concept's
    most concept-specific directions: the top-R generalized eigenvectors of (concept-word token Gram, prior Gram)."""
    D = keep.shape[0]
    g = g.double()
    qs = []
    for words, templates in concept_words_templates:
        X = word_embeddings(bb, words, templates)
        cc = X.T @ X / len(X)
        # whiten by the prior: B = g + eps I
        B = g + 1e-6 * torch.trace(g) / D * torch.eye(D, dtype=torch.float64)
        L = torch.linalg.cholesky(B)
        Li = torch.linalg.inv(L)
        ev, vec = torch.linalg.eigh(Li @ cc @ Li.T)
        ev, vec = ev.flip(0), vec.flip(1)
        v = Li.T @ vec[:, :R]
        v = v / v.norm(dim=0, keepdim=True)
        qs.append(v.T)
        prot = float(((X @ (torch.eye(D, dtype=torch.float64) - keep.double())) ** 2).sum() / (X**2).sum())
        share = float(((X @ v) ** 2).sum() / (X**2).sum())
        print(f"exempt: {words} top ratios {[round(float(x), 2) for x in ev[:4]]}; {R} direction(s) hold {share:.1%} of the words' token energy; protected share before: {prot:.1%}", flush=True)
    Q, _ = torch.linalg.qr(torch.cat(qs).T)
    V = torch.linalg.eigh(torch.eye(D, dtype=torch.float64) - keep.double())[1][:, -k:]
    V2 = V - Q @ (Q.T @ V)
    U, S, _ = torch.linalg.svd(V2, full_matrices=False)
    U = U[:, S > 1e-6]
    print(f"exempt: protected directions {k} -> {U.shape[1]}", flush=True)
    return (torch.eye(D, dtype=torch.float64) - U @ U.T).float(), U.shape[1]

def words_for(c):
    return [c] + (list(world.SYNONYMS.get(c, ())) if os.environ.get("EXEMPT_SYN") == "1" else [])
