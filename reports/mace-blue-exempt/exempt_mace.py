import sys
sys.path.insert(0, __import__("os").path.dirname(__file__))
import erasure.mace as M
from exempt_principal import exempt, words_for
state = {}
orig_mace = M.mace
def mace(backbone, concepts, settings, prior, *a, **k):
    state["bb"], state["concepts"] = backbone, concepts
    return orig_mace(backbone, concepts, settings, prior, *a, **k)
M.mace = mace
import erasure.cli as C
C.mace = mace
orig_pc = M.protected_complement
def pc(g, energy):
    keep, k = orig_pc(g, energy)
    return exempt(keep, k, state["bb"], [(words_for(c.text), c.template_list()) for c in state["concepts"]], g)
M.protected_complement = pc
sys.exit(C.main(sys.argv[1:]))
