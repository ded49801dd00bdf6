"""Family name -> module, imported on demand so `genserve train vae` never imports the other families."""
from __future__ import annotations

import importlib
from types import ModuleType

# Each module defines Config, build(config), make_trainer(model, config); generative ones also
# sample(model, y, generator, **settings) and DEFAULT_SAMPLING.
FAMILIES = ("vae", "gan", "flow", "pixelcnn", "diffusion")
TRAINABLE = FAMILIES + ("classifier",)


def get_family(name: str) -> ModuleType:
    if name not in TRAINABLE:
        raise ValueError(f"unknown family {name!r}; choose one of {', '.join(TRAINABLE)}")
    return importlib.import_module(f"families.{name}")
