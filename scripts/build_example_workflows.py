"""Write the UI-format example workflows in ``example_workflows/`` (what ComfyUI's editor saves and its template
browser lists). Run: ``python scripts/build_example_workflows.py``. The host tests convert each to the API format
with the real node definitions, validate and execute it, so a wrong widget order here fails there."""

from __future__ import annotations

import json
from pathlib import Path

from erasure.ant import AntSettings
from erasure.mace import MaceSettings

OUT = Path(__file__).resolve().parents[1] / "example_workflows"
CKPT = "v1-5-pruned-emaonly.safetensors"


class Workflow:
    def __init__(self) -> None:
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def node(self, type_: str, pos: tuple[int, int], widgets: list, inputs: list[tuple[str, str]] = (),
             outputs: list[tuple[str, str]] = (), size: tuple[int, int] = (320, 200)) -> int:
        nid = len(self.nodes) + 1
        self.nodes.append({
            "id": nid, "type": type_, "pos": list(pos), "size": list(size), "flags": {}, "order": nid - 1,
            "mode": 0, "inputs": [{"name": n, "type": t, "link": None} for n, t in inputs],
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(outputs)],
            "properties": {"Node name for S&R": type_}, "widgets_values": list(widgets)})
        return nid

    def link(self, src: int, slot: int, dst: int, name: str) -> None:
        lid = len(self.links) + 1
        s, d = self.nodes[src - 1], self.nodes[dst - 1]
        typ = s["outputs"][slot]["type"]
        s["outputs"][slot]["links"].append(lid)
        inp = next(i for i in d["inputs"] if i["name"] == name)
        inp["link"] = lid
        self.links.append([lid, src, slot, dst, list(i["name"] for i in d["inputs"]).index(name), typ])

    def json(self) -> dict:
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def checkpoint(w: Workflow) -> int:
    return w.node("CheckpointLoaderSimple", (40, 200), [CKPT],
                  outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], size=(320, 100))


def generate(w: Workflow, model: int, ckpt: int, text: str, x: int, prefix: str) -> None:
    pos = w.node("CLIPTextEncode", (x, 40), [text], [("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")])
    neg = w.node("CLIPTextEncode", (x, 300), [""], [("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")])
    lat = w.node("EmptyLatentImage", (x, 560), [512, 512, 1], outputs=[("LATENT", "LATENT")])
    ks = w.node("KSampler", (x + 360, 40), [0, "fixed", 25, 7.5, "euler", "normal", 1.0],
                [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                 ("latent_image", "LATENT")], [("LATENT", "LATENT")], size=(320, 260))
    dec = w.node("VAEDecode", (x + 720, 40), [], [("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")])
    save = w.node("SaveImage", (x + 960, 40), [prefix], [("images", "IMAGE")])
    for n in (pos, neg):
        w.link(ckpt, 1, n, "clip")
    w.link(model, 0, ks, "model")
    w.link(pos, 0, ks, "positive")
    w.link(neg, 0, ks, "negative")
    w.link(lat, 0, ks, "latent_image")
    w.link(ks, 0, dec, "samples")
    w.link(ckpt, 2, dec, "vae")
    w.link(dec, 0, save, "images")


def ant_settings_widgets() -> list:
    """The ANT Settings node's widgets at the library's defaults (a node left as it is changes nothing)."""
    d = AntSettings()
    return [d.lr, d.lr_relative, d.eta, d.preserve, d.scope, d.saliency_fraction, d.saliency_maps, d.lora_rank,
            d.prediction, d.sampling, d.trajectories, d.trajectory_steps, d.early_steps, d.reuse, d.refresh_every,
            d.guidance, d.batch_size, d.preserve_prompts, d.grad_clip, d.gradient_checkpointing, "native", True]


def mace_settings_widgets() -> list:
    d = MaceSettings()
    return [d.lora_steps, d.lora_lr, d.lora_rank, d.lora_batch, d.images_per_concept, d.sample_steps, d.guidance,
            d.use_masks, d.mask_threshold, d.lam, d.preserve, d.fuse_preserve, d.augment, d.importance_sampling,
            "auto", d.grad_clip, "native", True]


def erase_one_concept_ant() -> dict:
    w = Workflow()
    ck = checkpoint(w)
    ant = w.node("EraseConceptANTv2", (400, 200),
                 ["nudity", "naked; nude", "nudity", "default", AntSettings().steps, 0, False],
                 [("model", "MODEL"), ("clip", "CLIP"), ("settings", "ERASURE_ANT_SETTINGS")],
                 [("MODEL", "MODEL"), ("LORA", "LORA_MODEL"), ("LOSS", "LOSS_MAP"), ("REPORT", "STRING")],
                 size=(340, 300))
    settings = w.node("ANTSettings", (40, 360), ant_settings_widgets(),
                      outputs=[("SETTINGS", "ERASURE_ANT_SETTINGS")], size=(320, 560))
    w.link(ck, 0, ant, "model")
    w.link(ck, 1, ant, "clip")
    w.link(settings, 0, ant, "settings")
    save = w.node("SaveErasureLoRA", (780, 520), ["erase-nudity", True], [("lora", "LORA_MODEL")])
    w.link(ant, 1, save, "lora")
    plot = w.node("LossGraphNode", (400, 560), ["erasure-loss"], [("loss", "LOSS_MAP")], size=(340, 100))
    w.link(ant, 2, plot, "loss")
    report = w.node("PreviewAny", (400, 720), [], [("source", "*")], size=(340, 200))
    w.link(ant, 3, report, "source")
    prev = w.node("PreviewErasure", (780, 40),
                  ["a photo of a naked woman on a beach\nnude figure painting",
                   "a photo of a woman on a beach\na dog in a park\na city street at night", 4, 25, 7.5, "native", 0],
                  [("original", "MODEL"), ("erased", "MODEL"), ("clip", "CLIP"), ("vae", "VAE")],
                  [("IMAGE", "IMAGE")], size=(360, 420))
    w.link(ck, 0, prev, "original")
    w.link(ant, 0, prev, "erased")
    w.link(ck, 1, prev, "clip")
    w.link(ck, 2, prev, "vae")
    show = w.node("PreviewImage", (1180, 40), [], [("images", "IMAGE")], size=(500, 700))
    w.link(prev, 0, show, "images")
    return w.json()


def mass_erase_mace() -> dict:
    w = Workflow()
    ck = checkpoint(w)
    mace = w.node("MassEraseMACEv2", (400, 200),
                  ["Mickey Mouse\nSpider-Man\nPikachu", "object", "", "", 0, False, ""],
                  [("model", "MODEL"), ("clip", "CLIP"), ("latents", "LATENT"), ("images", "IMAGE"),
                   ("vae", "VAE"), ("masks", "MASK"), ("settings", "ERASURE_MACE_SETTINGS")],
                  [("MODEL", "MODEL"), ("LORA", "LORA_MODEL"), ("LOSS", "LOSS_MAP"), ("REPORT", "STRING")],
                  size=(340, 360))
    settings = w.node("MACESettings", (40, 360), mace_settings_widgets(),
                      outputs=[("SETTINGS", "ERASURE_MACE_SETTINGS")], size=(320, 500))
    w.link(ck, 0, mace, "model")
    w.link(ck, 1, mace, "clip")
    w.link(settings, 0, mace, "settings")
    save = w.node("SaveErasureLoRA", (780, 560), ["erase-characters", True], [("lora", "LORA_MODEL")])
    w.link(mace, 1, save, "lora")
    report = w.node("PreviewAny", (400, 600), [], [("source", "*")], size=(340, 200))
    w.link(mace, 3, report, "source")
    generate(w, mace, ck, "Mickey Mouse waving in a park", 780, "erased/characters")
    return w.json()


def fuse_two_loras() -> dict:
    w = Workflow()
    ck = checkpoint(w)
    a = w.node("LoadErasureLoRA", (40, 400), ["erase-nudity.safetensors"], outputs=[("LORA", "LORA_MODEL")])
    b = w.node("LoadErasureLoRA", (40, 540), ["erase-characters.safetensors"], outputs=[("LORA", "LORA_MODEL")])
    fuse = w.node("FuseErasureLoRAs", (400, 200), ["", 1.0],
                  [("model", "MODEL"), ("clip", "CLIP"), ("lora_1", "LORA_MODEL"), ("lora_2", "LORA_MODEL")],
                  [("MODEL", "MODEL"), ("LORA", "LORA_MODEL")], size=(340, 260))
    w.link(ck, 0, fuse, "model")
    w.link(ck, 1, fuse, "clip")
    w.link(a, 0, fuse, "lora_1")
    w.link(b, 0, fuse, "lora_2")
    save = w.node("SaveErasureLoRA", (780, 560), ["erase-nudity-and-characters", True], [("lora", "LORA_MODEL")])
    w.link(fuse, 1, save, "lora")
    generate(w, fuse, ck, "Spider-Man on a beach", 780, "erased/fused")
    return w.json()


WORKFLOWS = {"1-erase-one-concept-ant.json": erase_one_concept_ant,
             "2-mass-erase-mace-save-lora.json": mass_erase_mace,
             "3-fuse-two-erasure-loras.json": fuse_two_loras}

if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    for name, build in WORKFLOWS.items():
        (OUT / name).write_text(json.dumps(build(), indent=1) + "\n")
        print("wrote", OUT / name)
