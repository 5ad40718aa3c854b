import sys
sys.path.insert(0, __import__("os").path.dirname(__file__))
import torch
from erasure.diffusers_backbone import load_diffusers
from erasure.lab.demo import lab_prior, lab_concept
from erasure.prior import protected_complement
from exempt_generalized import exempt, words_for
model = sys.argv[1]
bb = load_diffusers(model)
for c in sys.argv[2:]:
    g = lab_prior(bb, [c]).double()
    keep, k = protected_complement(g, 0.999)
    new, k2 = exempt(keep, k, bb, [(words_for(c), lab_concept(c).template_list())], g)
    # unrelated energy newly exposed
    exposed = float(torch.trace((keep.double() @ g @ keep.double().T))) / float(torch.trace(g)); exposed2 = float(torch.trace(new.double() @ g @ new.double().T)) / float(torch.trace(g))
    print(c, f"unrelated energy editable: {exposed:.4%} -> {exposed2:.4%}")
