"""How a model is sampled and how good that is: the typed settings and quality that travel from the model
card through the manifest, the policy's candidates and the jobs to the replicas. Torch-free, so the
ingress can read them."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

DDIM = "ddim"              # Song et al. 2021, core/samplers/ddim.py
DPMPP_2M = "dpmpp_2m"      # Lu et al. 2022, core/samplers/dpm_solver.py
SAMPLER_NAMES = (DDIM, DPMPP_2M)   # the keys of core.samplers.SAMPLERS


@dataclass(frozen=True)
class SamplingSetting:
    """One way to sample a model; a field is None where the family has no such knob (or, in a request, where
    the model's default applies)."""

    sampler: str | None = None            # diffusion: one of SAMPLER_NAMES
    steps: int | None = None              # diffusion: denoiser forwards per image
    guidance_scale: float | None = None   # diffusion: classifier-free guidance s; 1 = plain conditional
    temperature: float | None = None      # flow / pixelcnn: latent or logit temperature

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SamplingSetting:
        d = d or {}
        if extra := sorted(set(d) - {f.name for f in fields(cls)}):
            raise ValueError(f"unknown sampling setting keys {extra}; known: {[f.name for f in fields(cls)]}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set: the manifest's and the API's JSON form."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @property
    def key(self) -> str:
        """The name `genserve evaluate` files this setting's metrics under (metrics.by_setting)."""
        return "-".join(f"{k}={v}" for k, v in sorted(self.to_dict().items())) or "default"

    def over(self, base: SamplingSetting) -> SamplingSetting:
        """This setting's fields, and base's where this one has none: a request's overrides over a default."""
        return replace(base, **self.to_dict())

    def guided(self, class_id: int, null_class: int) -> bool:
        """Whether an image takes a second, unconditional row: CFG is on and there is a class to guide to."""
        return self.guidance_scale not in (None, 1.0) and class_id != null_class


@dataclass(frozen=True)
class Quality:
    """What `genserve evaluate` measured for one setting (families/evaluate.py writes these keys)."""

    fd: float                  # Fréchet distance in the classifier's feature space, lower is better
    class_accuracy: float      # share of samples the classifier labels with the class asked for

    @classmethod
    def measured(cls, metrics: dict[str, Any], setting: SamplingSetting, *, is_default: bool) -> Quality | None:
        """The quality of exactly `setting` in a model card's metrics: metrics.by_setting[setting.key], or the
        top level when it is the default (evaluate copies the default's there; older cards have only that).
        None when never measured."""
        entry = (metrics.get("by_setting") or {}).get(setting.key)
        if entry is None and is_default:
            entry = metrics
        if not entry or "fd" not in entry or "class_accuracy" not in entry:
            return None
        return cls(float(entry["fd"]), float(entry["class_accuracy"]))
