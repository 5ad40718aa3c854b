"""The benchmark's sizes and one measured run (a "cell": method x implementation x architecture x concepts).

Every size keeps ours and the reference on the same settings (training steps, trajectory steps, trajectories,
saliency maps, images, sampling steps, LoRA steps, resolution, dtype); only what the two algorithms do differently
differs. The settings of each size are written into the JSON with its rows.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import torch

from erasure.ant import AntSettings, ant, ant_multi
from erasure.fusion import fuse
from erasure.mace import MaceSettings, mace
from erasure.prior import gram
from erasure.prompts import Concept, prior_prompts
from erasure.weights import META_PREFIX, Delta, ErasureWeights

from .archs import build_backbone, concept_names, param_count
from .meter import Meter
from .reference_ant import frozen_copy, reference_ant_multi, reference_ant_single
from .reference_mace import prior_caches, reference_fuse, reference_mace

METHODS = ("ant-single", "ant-multi", "mace", "fusion")
IMPLS = ("ours", "reference")


@dataclass(frozen=True)
class Size:
    """Everything a size fixes. ``latent`` is per (method, arch); pixels = 8 x latent."""

    name: str
    scale: str  # "full" (the real architectures) or "tiny" (their layouts at toy widths)
    device: str
    dtype: str
    latent: dict[str, int]  # "method/arch" -> latent size
    ant: dict  # AntSettings overrides, shared by ours and the reference
    mace: dict  # MaceSettings overrides
    prior_prompts: int
    #: cells run at this size: (method, arch, concepts)
    cells: tuple[tuple[str, str, int], ...]
    #: cells not run at this size, with the reason (reported in the JSON)
    skipped: tuple[tuple[str, str, str], ...] = field(default_factory=tuple)
    #: "method/arch" -> scale, where it differs from ``scale``
    scales: dict[str, str] = field(default_factory=dict)
    #: AntSettings overrides for ANT multi on top of ``ant`` (its reference trains 10 iterations per concept)
    ant_multi: dict = field(default_factory=dict)

    #: "method/arch" -> dtype, where it differs from ``dtype``
    dtypes: dict[str, str] = field(default_factory=dict)
    #: extra ANT settings run beside the defaults (name -> variant; see ``_variants``)
    variants: dict[str, Variant] = field(default_factory=dict)
    #: extra runs at another scale: (method, impl, arch, concepts, variant, scale)
    also: tuple[tuple[str, str, str, int, str, str], ...] = field(default_factory=tuple)

    def scale_of(self, method: str, arch: str) -> str:
        return self.scales.get(f"{method}/{arch}", self.scale)

    def dtype_of(self, method: str, arch: str) -> str:
        return self.dtypes.get(f"{method}/{arch}", self.dtype)

    def ant_settings(self, method: str = "ant-single", variant: str = "default") -> AntSettings:
        """The library's defaults, the size's overrides, then the variant's; ANT multi trains ``multi_steps`` per
        concept, set here from the size's ``steps`` for it."""
        v = self.variants.get(variant) if variant != "default" else None
        if variant != "default" and v is None:
            raise ValueError(f"unknown variant {variant!r} for size {self.name}")
        s = AntSettings().override(**self.ant).override(**(v.ant if v else {}))
        if method == "ant-multi":
            s = s.override(**self.ant_multi).override(**(v.ant_multi if v else {}))
            s = s.override(multi_steps=s.steps)
        return s

    def mace_settings(self) -> MaceSettings:
        # one round of lora_steps, as the reference trains (lora_target's extra rounds depend on the weights: on
        # random weights they measure nothing a user's model would do)
        return MaceSettings(lora_target=0.0).override(**self.mace)


def _cells(archs: dict[str, dict[str, tuple[int, ...]]]) -> tuple[tuple[str, str, int], ...]:
    return tuple((m, a, n) for a, per in archs.items() for m, ns in per.items() for n in ns)


#: The ANT rows measure the library's current defaults (``AntSettings()``): a size overrides only what sets its
#: cost (training steps, trajectories, preservation prompts), so a change of default flows into the next run.
#: A second configuration is run as a variant, for comparison with the reference at equal sampling: cached
#: trajectories refreshed on-policy every ``refresh_every`` steps, saliency-masked sparse deltas and lr 1e-4 for one
#: concept; the same sampling with K/V LoRAs for many.
PINNED_ANT = dict(sampling="cached", scope="saliency", lr=1e-4)
PINNED_ANT_MULTI = dict(scope="lora")
#: the reference's cost-setting parameters as published: 50-step DDIM trajectories, the first 4 the early stage
PUBLISHED = dict(trajectory_steps=50, early_steps=4)
_SMOKE_ANT = dict(steps=2, trajectory_steps=4, early_steps=1, trajectories=2, saliency_maps=2, refresh_every=1,
                  preserve_prompts=4)
#: the cached configuration at the settings of the measured tables (docs/benchmarks.md), pinned (the "counts"
#: size; ``run.default_counts`` replays them)
MEASURED_DEFAULTS = dict(steps=250, trajectory_steps=50, early_steps=4, trajectories=16, saliency_maps=8,
                         refresh_every=25, preserve=5.0, preserve_prompts=64, **PINNED_ANT)
_SMOKE_MACE = dict(images_per_concept=2, sample_steps=2, lora_steps=1)


@dataclass(frozen=True)
class Variant:
    """ANT settings besides the defaults, run for some methods and implementations (on top of the size's)."""

    methods: tuple[str, ...]
    impls: tuple[str, ...]
    ant: dict = field(default_factory=dict)
    ant_multi: dict = field(default_factory=dict)
    note: str = ""


def _variants(old_sizes: dict) -> dict[str, Variant]:
    """The extra ANT rows of a size: the reference as published (50-step trajectories, ratio (b)) and the
    cached configuration at the size's settings for it (``old_sizes``)."""
    return {
        "published": Variant(("ant-single",), ("reference",), dict(PUBLISHED),
                             note="the reference with its published 50-step trajectories (early stage: 4)"),
        "cached-saliency": Variant(("ant-single",), ("ours", "reference"), {**old_sizes, **PINNED_ANT},
                                   note="the cached configuration (cached trajectories, saliency-masked sparse "
                                        "deltas, lr 1e-4)"),
        "cached-lora": Variant(("ant-multi",), ("ours", "reference"), {**old_sizes, **PINNED_ANT},
                               dict(PINNED_ANT_MULTI),
                               note="ANT multi in the cached configuration (cached trajectories, K/V LoRA)"),
    }


SIZES: dict[str, Size] = {
    "smoke": Size(
        "smoke", "tiny", "cpu", "float32",
        latent={"ant-single/sd15": 8, "ant-multi/sd15": 8, "mace/sd15": 8, "fusion/sd15": 8,
                "ant-single/sdxl": 8, "ant-multi/sdxl": 8, "mace/sdxl": 8, "fusion/sdxl": 8},
        ant=_SMOKE_ANT, mace=_SMOKE_MACE,
        prior_prompts=8,
        cells=_cells({"sd15": {"ant-single": (1,), "ant-multi": (2,), "mace": (1, 3), "fusion": (2, 4)},
                      "sdxl": {"ant-single": (1,), "mace": (1,)}}),
        variants=_variants({})),
    # 2 CPU cores shared with other work, 24 GiB: 64 px; the real SD1.5 except ANT single's comparison (SD1.5's
    # layout at half width, see ``scales``: the reference's full-UNet Adam beside a frozen copy needs about as much
    # memory as this machine has); ours at the defaults also on the real SD1.5 (``also``); SDXL only where it fits
    # (see ``skipped``). The library's trajectory_steps (10) and early_steps (1) as they are; 4 training steps
    # (2 per concept for ANT multi), 2 trajectories (= saliency maps), 16 preservation prompts
    "cpu": Size(
        "cpu", "full", "cpu", "float32",
        latent={"ant-single/sd15": 8, "ant-multi/sd15": 8, "mace/sd15": 8, "fusion/sd15": 8, "mace/sdxl": 8,
                "fusion/sdxl": 8},
        ant=dict(steps=4, trajectories=2, saliency_maps=2, preserve_prompts=16),
        ant_multi=dict(steps=2),
        mace=dict(images_per_concept=1, sample_steps=2, lora_steps=1),
        prior_prompts=64,
        cells=_cells({"sd15": {"ant-single": (1,), "ant-multi": (2,), "mace": (1, 10, 50), "fusion": (10, 100)},
                      "sdxl": {"mace": (1,), "fusion": (10,)}}),
        # measured: the cached-saliency configuration on the real SD1.5 was killed for memory in the saliency step
        # (full-UNet gradients plus the float32 copy and kthvalue of all 860 M of them on the host); the reference
        # (two float32 UNets, full gradients, Adam's moments, the same threshold) needs more still
        scales={"ant-single/sd15": "half"},
        # the cached configuration's settings at this size
        variants=_variants(dict(trajectory_steps=6, early_steps=2, refresh_every=2)),
        also=(("ant-single", "ours", "sd15", 1, "default", "full"),),
        # SDXL's float32 weights and text encoders (13 GiB) do not fit beside other work here: bf16 for both impls
        dtypes={"mace/sdxl": "bfloat16", "fusion/sdxl": "bfloat16"},
        skipped=(("ant-single", "sdxl", "full-UNet gradients of a 2.6 G-parameter UNet (the reference's Adam) need "
                  "more than the 24 GiB of this machine; run --size gpu"),
                 ("ant-multi", "sdxl", "too slow on 2 CPU cores (float64 closed form over 140 K/V matrices of "
                  "width 2048, and the 695 M-parameter text encoder); run --size gpu"),
                 ("mace", "sdxl", "10 and 50 concepts too slow on 2 CPU cores; run --size gpu"),
                 ("fusion", "sdxl", "100 LoRAs too slow on 2 CPU cores (the reference's per-layer float32 "
                  "inverses; encoding 1,000 prompts with both text encoders); run --size gpu"))),
    # one H200-class GPU; gpu.sh runs it. Sized by estimate for the 8-minute budget (not yet run): the library's ANT
    # defaults with 16 trajectories and 8 saliency maps (the reference's), fewer training steps; the cached
    # configuration at its gpu settings (50-step trajectories, refresh every 10). SDXL at 512 px: its ANT
    # rows compare algorithms, the 1024 px memory is measured separately (projection.measure_peak)
    "gpu": Size(
        "gpu", "full", "cuda", "float32",
        latent={"ant-single/sd15": 64, "ant-multi/sd15": 64, "mace/sd15": 64, "fusion/sd15": 64,
                "ant-single/sdxl": 64, "mace/sdxl": 64, "fusion/sdxl": 64},
        ant=dict(steps=20, trajectories=16, saliency_maps=8),
        ant_multi=dict(steps=10),
        mace=dict(images_per_concept=2, sample_steps=10, lora_steps=10),
        prior_prompts=1200,
        cells=_cells({"sd15": {"ant-single": (1,), "ant-multi": (2,), "mace": (1, 10, 50), "fusion": (10, 100)},
                      "sdxl": {"ant-single": (1,), "mace": (1, 10), "fusion": (10,)}}),
        variants=_variants(dict(trajectory_steps=50, early_steps=4, refresh_every=10)),
        skipped=(("ant-multi", "sdxl", "left out of the 8-minute budget"),
                 ("mace", "sdxl", "50 concepts left out of the 8-minute budget"),
                 ("fusion", "sdxl", "100 LoRAs left out of the 8-minute budget"))),
    # ANT single in the cached configuration (250 steps, 16 cached trajectories of 50 steps, 8 saliency maps,
    # refresh every 25), on the tiny layout: UNet evaluations do not depend on the model's width, so this counts
    # exactly what those settings cost on a real model; its times are not the real model's
    "counts": Size(
        "counts", "tiny", "cpu", "float32", latent={"ant-single/sd15": 8}, ant=dict(MEASURED_DEFAULTS), mace={},
        prior_prompts=64, cells=(("ant-single", "sd15", 1),)),
}


#: the settings that set ANT's cost, written with each ANT row (``ant_settings``). A reference row records the
#: settings it was given; it reads only steps, trajectory_steps, early_steps, trajectories, saliency_maps, lr and
#: batch_size of them (sampling, reuse, scope, refresh_every and the preservation term are ours alone)
COST_KEYS = ("steps", "multi_steps", "trajectory_steps", "early_steps", "trajectories", "saliency_maps",
             "refresh_every", "reuse", "sampling", "scope", "lr", "preserve", "preserve_prompts", "batch_size")


def size_settings(size: Size) -> dict:
    """The settings to write beside the rows: ``ant`` the ANT single default rows' (the library's defaults with
    the size's overrides), ``ant_variants`` each variant's, resolved."""
    variants = {}
    for name, v in size.variants.items():
        method = v.methods[0]
        variants[name] = {"methods": list(v.methods), "impls": list(v.impls), "note": v.note,
                          "settings": asdict(size.ant_settings(method, name))}
    return {"scale": size.scale, "scales": size.scales, "dtypes": size.dtypes, "device": size.device,
            "dtype": size.dtype,
            "latent": size.latent, "pixels": {k: 8 * v for k, v in size.latent.items()},
            "ant": asdict(size.ant_settings()),
            "ant_multi": asdict(size.ant_settings("ant-multi")),
            "ant_variants": variants, "also": [list(a) for a in size.also],
            "mace": asdict(size.mace_settings()), "prior_prompts": size.prior_prompts}


class TextEncodingTimer:
    """Seconds spent in ``backbone.encode_text`` while active (a wrapper on the instance, removed on exit).

    The fusion's cost on a CPU is mostly this (both implementations encode every concept's prompts), so it is
    reported beside the wall time: what is left is the closed-form part the two implementations do differently."""

    def __init__(self, backbone) -> None:
        self.backbone, self.seconds, self.calls = backbone, 0.0, 0

    def __enter__(self) -> TextEncodingTimer:
        inner = self.backbone.encode_text

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1

        self.backbone.encode_text = timed
        return self

    def __exit__(self, *exc) -> None:
        del self.backbone.encode_text


def random_loras(bb, n: int, seed: int = 0) -> list[ErasureWeights]:
    """``n`` rank-1 K/V LoRAs with small random factors (what MACE's stage 3 produces, in shape)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        deltas = {name: Delta(up=torch.randn(m.weight.shape[0], 1, generator=g) * 1e-3,
                              down=torch.randn(1, m.weight.shape[1], generator=g) * 1e-3)
                  for name, m in bb.cross_attention_kv().items()}
        out.append(ErasureWeights(deltas, {}))
    return out


def run_cell(size: Size, method: str, impl: str, arch: str, concepts: int, variant: str = "default",
             scale: str | None = None) -> dict:
    """Build the model, prepare what is cached in practice (outside the timed part), run one method, measure.

    Prepared outside the timer and the counters, for both implementations alike: the model, the prior (ours: one
    D x D Gram matrix; the reference: its per-layer caches), the reference's frozen UNet copy. Their memory is
    resident, so the peak includes it; their time is reported as ``setup_s``.
    """
    if method not in METHODS or impl not in IMPLS:
        raise ValueError(f"unknown cell {method}/{impl}")
    latent = size.latent[f"{method}/{arch}"]
    dtype_name = size.dtype_of(method, arch)
    dtype = getattr(torch, dtype_name)
    device = torch.device(size.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t0 = time.perf_counter()
    scale = scale or size.scale_of(method, arch)
    bb = build_backbone(arch, scale, latent, dtype, size.device)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    names = concept_names(concepts)
    s_ant = size.ant_settings(method, variant) if method.startswith("ant") else size.ant_settings()
    s_mace = size.mace_settings()
    prior_list = prior_prompts(n=size.prior_prompts, exclude=names)
    prior = caches = frozen = None
    if method in ("ant-multi", "mace", "fusion"):
        if impl == "ours":
            prior = gram(bb, prior_list)
        else:
            caches = prior_caches(bb, prior_list)
    if method == "ant-single" and impl == "reference":
        frozen = frozen_copy(bb)
    loras = random_loras(bb, concepts) if method == "fusion" else None
    items = [Concept(c, "background") for c in names]
    setup_s = time.perf_counter() - t0
    extra: dict = {}
    with Meter(bb.unet(), device) as meter, TextEncodingTimer(bb) as text_timer:
        if frozen is not None:
            meter.watch(frozen.unet())
        if method == "ant-single" and impl == "ours":
            r = ant(bb, names[0], s_ant, preserve_prompts=prior_list)
            extra = {"selected_fraction": r.selected_fraction, "library_unet_forwards": r.unet_forwards}
        elif method == "ant-single":
            n_pres = min(s_ant.preserve_prompts, len(prior_list)) if s_ant.preserve > 0 else 0
            extra = reference_ant_single(bb, frozen, names[0], s_ant, n_preserve=n_pres)
        elif method == "ant-multi" and impl == "ours":
            rm = ant_multi(bb, names, s_ant, prior, preserve_prompts=prior_list)
            extra = {"library_unet_forwards": rm.unet_forwards}
            # what ant_multi trained with (it chooses the scope: K/V, dense or LoRA), from the result's metadata
            used = json.loads(rm.weights.metadata[META_PREFIX + "settings"])
            s_ant = s_ant.override(**{k: used[k] for k in COST_KEYS})
        elif method == "ant-multi":
            reference_ant_multi(bb, names, s_ant, caches)
        elif method == "mace" and impl == "ours":
            mace(bb, items, s_mace, prior)
        elif method == "mace":
            reference_mace(bb, items, s_mace, caches)
        elif impl == "ours":
            fuse(bb, list(zip(items, loras, strict=True)), None, prior, s_mace.lam, s_mace.fuse_preserve)
        else:
            reference_fuse(bb, items, loras, None, caches, s_mace.lam, s_mace.fuse_preserve)
    row = {"method": method, "impl": impl, "concepts": concepts, "arch": arch, **meter.figures(),
           "time_per_concept_s": round(meter.wall_s / concepts, 3), "variant": variant,
           "text_encoding_s": round(text_timer.seconds, 2),
           "pixels": 8 * latent, "latent": latent, "scale": scale, "dtype": dtype_name, "device": str(device),
           "unet_params": param_count(bb.unet()), "model_build_s": round(build_s, 2), "setup_s": round(setup_s, 2)}
    if method.startswith("ant"):
        row["ant_settings"] = {k: getattr(s_ant, k) for k in COST_KEYS}
    row.update(extra)
    return row
