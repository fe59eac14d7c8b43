"""k-diffusion's samplers as the independent reference for train.generate's ComfyUI loop."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest


@functools.cache
def _load():
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or importlib.util.find_spec("torchsde") is None or importlib.util.find_spec("torchdiffeq") is None:
        return None
    package = types.ModuleType("kdiff_reference_pkg")
    package.__path__ = [str(Path(spec.origin).parent)]
    stubs = {}
    if importlib.util.find_spec("torchvision") is None:
        functional = types.ModuleType("torchvision.transforms.functional")
        transforms = types.ModuleType("torchvision.transforms")
        transforms.functional = functional
        stubs = {"torchvision": types.ModuleType("torchvision"), "torchvision.transforms": transforms,
                 "torchvision.transforms.functional": functional}
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    sys.modules["kdiff_reference_pkg"] = package
    try:
        sampling = importlib.import_module("kdiff_reference_pkg.sampling")
        external = importlib.import_module("kdiff_reference_pkg.external")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return types.SimpleNamespace(sampling=sampling, external=external)


def load_k_diffusion():
    """k-diffusion's `sampling` and `external` modules, loaded without the package's `__init__`.

    `pip install --no-deps k-diffusion==0.1.1.post1` (the Makefile's venv does): its declared
    dependencies would replace torch. The package `__init__` imports torchvision and more; only
    `utils.py`'s torchvision import is stubbed, for the time of the import, and the reference code
    itself runs unmodified. Skips the test when k-diffusion, torchsde or torchdiffeq is missing.
    """
    modules = _load()
    if modules is None:
        pytest.skip("k-diffusion (with torchsde, torchdiffeq) is not installed: see the Makefile's venv")
    return modules
