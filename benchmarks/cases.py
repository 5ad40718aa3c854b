"""The benchmark's sizes and one measured run (a "cell": method x implementation x architecture x concepts).

Every size keeps ours and the reference on the same settings (training steps, trajectory steps, trajectories,
saliency maps, images, sampling steps, LoRA steps, resolution, dtype); only what the two algorithms do differently
differs. The settings of each size are written into the JSON with its rows.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from erasure.ant import AntSettings, ant, ant_multi
from erasure.mace import Concept, MaceSettings, fuse, mace
from erasure.prior import gram
from erasure.prompts import prior_prompts
from erasure.weights import Delta, ErasureWeights

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

    def scale_of(self, method: str, arch: str) -> str:
        return self.scales.get(f"{method}/{arch}", self.scale)

    def dtype_of(self, method: str, arch: str) -> str:
        return self.dtypes.get(f"{method}/{arch}", self.dtype)

    def ant_settings(self) -> AntSettings:
        return AntSettings().override(**self.ant)

    def mace_settings(self) -> MaceSettings:
        return MaceSettings().override(**self.mace)


def _cells(archs: dict[str, dict[str, tuple[int, ...]]]) -> tuple[tuple[str, str, int], ...]:
    return tuple((m, a, n) for a, per in archs.items() for m, ns in per.items() for n in ns)


#: ANT as measured here: cached trajectories (refreshed on-policy every ``refresh_every`` steps) and saliency-masked
#: sparse deltas for one concept, K/V LoRAs for many: the optimisations this benchmark weighs. (The library's
#: defaults have since become on-policy sampling, the reference's own loop, with dense cross-attention deltas.)
PINNED_ANT = dict(sampling="cached", scope="saliency")
PINNED_ANT_MULTI = dict(scope="lora")
_SMOKE_ANT = dict(steps=2, trajectory_steps=4, early_steps=1, trajectories=2, saliency_maps=2, refresh_every=1,
                  preserve_prompts=4, lr=1e-4, **PINNED_ANT)
#: the library's ANT defaults when this benchmark was measured (README, Benchmarks), in the pinned configuration
MEASURED_DEFAULTS = dict(steps=250, lr=1e-4, trajectory_steps=50, early_steps=4, trajectories=16, saliency_maps=8,
                         refresh_every=25, preserve=5.0, preserve_prompts=64, **PINNED_ANT)
_SMOKE_MACE = dict(images_per_concept=2, sample_steps=2, lora_steps=1)

SIZES: dict[str, Size] = {
    "smoke": Size(
        "smoke", "tiny", "cpu", "float32",
        latent={"ant-single/sd15": 8, "ant-multi/sd15": 8, "mace/sd15": 8, "fusion/sd15": 8,
                "ant-single/sdxl": 8, "ant-multi/sdxl": 8, "mace/sdxl": 8, "fusion/sdxl": 8},
        ant=_SMOKE_ANT, mace=_SMOKE_MACE,
        prior_prompts=8,
        cells=_cells({"sd15": {"ant-single": (1,), "ant-multi": (2,), "mace": (1, 3), "fusion": (2, 4)},
                      "sdxl": {"ant-single": (1,), "mace": (1,)}})),
    # 2 CPU cores shared with other work, 24 GiB: 64 px; the real SD1.5 except ANT single (SD1.5's layout at half
    # width, see ``scales``); SDXL only where it fits (see ``skipped``)
    "cpu": Size(
        "cpu", "full", "cpu", "float32",
        latent={"ant-single/sd15": 8, "ant-multi/sd15": 8, "mace/sd15": 8, "fusion/sd15": 8, "mace/sdxl": 8},
        ant=dict(steps=4, trajectory_steps=6, early_steps=2, trajectories=2, saliency_maps=2, refresh_every=2,
                 preserve_prompts=16, lr=1e-4, **PINNED_ANT),
        ant_multi=dict(steps=2, **PINNED_ANT_MULTI),
        mace=dict(images_per_concept=1, sample_steps=2, lora_steps=1),
        prior_prompts=64,
        cells=_cells({"sd15": {"ant-single": (1,), "ant-multi": (2,), "mace": (1, 10, 50), "fusion": (10, 100)},
                      "sdxl": {"mace": (1,)}}),
        # measured: ours on the real SD1.5 was killed for memory in the saliency step (full-UNet gradients plus the
        # float32 copy and kthvalue of all 860 M of them on the host); the reference needs more still
        scales={"ant-single/sd15": "half"},
        # SDXL's float32 weights and text encoders (13 GiB) do not fit beside other work here: bf16 for both impls
        dtypes={"mace/sdxl": "bfloat16"},
        skipped=(("ant-single", "sdxl", "full-UNet gradients of a 2.6 G-parameter UNet (ours: saliency; reference: "
                  "Adam) need more than the 24 GiB of this machine; run --size gpu"),
                 ("ant-multi", "sdxl", "too slow on 2 CPU cores (float64 closed form over 140 K/V matrices of "
                  "width 2048, and the 695 M-parameter text encoder); run --size gpu"),
                 ("mace", "sdxl", "10 and 50 concepts too slow on 2 CPU cores; run --size gpu"),
                 ("fusion", "sdxl", "too slow on 2 CPU cores (see ant-multi); run --size gpu"))),
    # one H200-class GPU; gpu.sh runs it. Sized by estimate for the 8-minute budget (not yet run): full trajectory
    # length (50 steps), 16 trajectories and 8 saliency maps as the defaults; fewer training steps, images and
    # sampling steps than the defaults. SDXL at 512 px: its ANT rows compare algorithms, the 1024 px memory is
    # measured separately (projection.measure_peak)
    "gpu": Size(
        "gpu", "full", "cuda", "float32",
        latent={"ant-single/sd15": 64, "ant-multi/sd15": 64, "mace/sd15": 64, "fusion/sd15": 64,
                "ant-single/sdxl": 64, "mace/sdxl": 64, "fusion/sdxl": 64},
        ant=dict(steps=20, trajectory_steps=50, early_steps=4, trajectories=16, saliency_maps=8, refresh_every=10,
                 lr=1e-4, **PINNED_ANT),
        ant_multi=dict(steps=10, **PINNED_ANT_MULTI),
        mace=dict(images_per_concept=2, sample_steps=10, lora_steps=10),
        prior_prompts=1200,
        cells=_cells({"sd15": {"ant-single": (1,), "ant-multi": (2,), "mace": (1, 10, 50), "fusion": (10, 100)},
                      "sdxl": {"ant-single": (1,), "mace": (1, 10), "fusion": (10,)}}),
        skipped=(("ant-multi", "sdxl", "left out of the 8-minute budget"),
                 ("mace", "sdxl", "50 concepts left out of the 8-minute budget"),
                 ("fusion", "sdxl", "100 LoRAs left out of the 8-minute budget"))),
    # ANT single at the measured defaults (250 steps, 16 trajectories of 50 steps, 8 saliency maps, refresh every
    # 25), on the tiny layout: UNet evaluations do not depend on the model's width, so this counts
    # exactly what the defaults cost on a real model; its times are not the real model's
    "counts": Size(
        "counts", "tiny", "cpu", "float32", latent={"ant-single/sd15": 8}, ant=dict(MEASURED_DEFAULTS), mace={},
        prior_prompts=64, cells=(("ant-single", "sd15", 1),)),
}


def size_settings(size: Size) -> dict:
    """The settings to write beside the rows."""
    return {"scale": size.scale, "scales": size.scales, "dtypes": size.dtypes, "device": size.device,
            "dtype": size.dtype,
            "latent": size.latent, "pixels": {k: 8 * v for k, v in size.latent.items()},
            "ant": asdict(size.ant_settings()),
            "ant_multi": size.ant_multi,
            "mace": asdict(size.mace_settings()), "prior_prompts": size.prior_prompts}


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


def run_cell(size: Size, method: str, impl: str, arch: str, concepts: int, variant: str = "default") -> dict:
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
    scale = size.scale_of(method, arch)
    bb = build_backbone(arch, scale, latent, dtype, size.device)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    names = concept_names(concepts)
    s_ant = size.ant_settings()
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
    if method == "ant-multi":
        s_ant = s_ant.override(**size.ant_multi)
        s_ant = s_ant.override(multi_steps=s_ant.steps)  # ant_multi trains multi_steps per concept
    if variant == "no-refresh":
        s_ant = s_ant.override(refresh_every=0)
    setup_s = time.perf_counter() - t0
    extra: dict = {}
    with Meter(bb.unet(), device) as meter:
        if frozen is not None:
            meter.watch(frozen.unet())
        if method == "ant-single" and impl == "ours":
            r = ant(bb, names[0], s_ant, preserve_prompts=prior_list)
            extra = {"selected_fraction": r.selected_fraction, "library_unet_forwards": r.unet_forwards}
        elif method == "ant-single":
            n_pres = min(s_ant.preserve_prompts, len(prior_list)) if s_ant.preserve > 0 else 0
            extra = reference_ant_single(bb, frozen, names[0], s_ant, n_preserve=n_pres)
        elif method == "ant-multi" and impl == "ours":
            ant_multi(bb, names, s_ant, prior, preserve_prompts=prior_list)
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
           "pixels": 8 * latent, "latent": latent, "scale": scale, "dtype": dtype_name, "device": str(device),
           "unet_params": param_count(bb.unet()), "model_build_s": round(build_s, 2), "setup_s": round(setup_s, 2)}
    row.update(extra)
    return row
