"""The model registry: a flow registers itself where it is defined.

A module of ``flowbench.flows`` that defines an architecture decorates its builder::

    @register_model("glow", paper="Kingma & Dhariwal, Glow (NeurIPS 2018)", year=2018,
                    code="https://github.com/openai/glow", tiny={"depth": 2, "levels": 2, "hidden_channels": 8})
    def build_glow(image_shape, depth=8, ...) -> FlowModel: ...

The registry finds the built-in flows by importing every module of the ``flowbench.flows``
package (a new module there is found with no list to edit), then every module named in
``$FLOWBENCH_PLUGINS`` (comma-separated module names or ``.py`` paths): a flow defined outside
the package registers itself the same way, and a sweep passes the variable to its Ray workers
so the flow exists there too. Models are listed in the order they were published (``year``;
Table 2's rows follow it), plugins without a year last. A model's card is
``models/<name>.yaml`` in the package, or ``<name>.yaml`` beside the module that registers it.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import pkgutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from flowbench.errors import FlowbenchError, unknown_name

PLUGINS_ENV = "FLOWBENCH_PLUGINS"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    paper: str  # the publication the architecture follows
    code: str  # the authors' released code it follows
    builder: Callable  # builder(image_shape, **hparams) -> FlowModel
    year: int | None = None  # of the publication: the order models are listed in
    tiny: dict = field(default_factory=dict)  # smallest sensible hparams: what the shared harness checks

    def hparams(self) -> dict:
        """Accepted hyperparameters and their defaults."""
        params = list(inspect.signature(self.builder).parameters.values())[1:]
        return {p.name: p.default for p in params}

    @property
    def module_dir(self) -> Path:
        """The folder of the module that registered the model (where a plugin keeps its card)."""
        return Path(inspect.getfile(self.builder)).parent


# registered entries in registration order, and the plugin specs already imported; module-level
# state so that a test can save and restore both
_entries: dict[str, ModelEntry] = {}
_imported_plugins: set[str] = set()


def register_model(name: str, *, paper: str, code: str, year: int | None = None, tiny: dict | None = None):
    """Decorator: register ``builder(image_shape, **hparams)`` under ``name``."""

    def decorate(builder: Callable) -> Callable:
        existing = _entries.get(name)
        if existing is not None and existing.builder.__module__ != builder.__module__:
            raise FlowbenchError(
                f"model {name!r} is registered by both {existing.builder.__module__} and "
                f"{builder.__module__}: rename one of them"
            )
        _entries[name] = ModelEntry(name, paper, code, builder, year, dict(tiny or {}))
        return builder

    return decorate


def plugin_specs() -> list[str]:
    """``$FLOWBENCH_PLUGINS`` split: module names or paths of .py files."""
    return [s.strip() for s in os.environ.get(PLUGINS_ENV, "").split(",") if s.strip()]


def plugin_env_vars() -> dict[str, str]:
    """The environment a Ray worker needs to see the same plugins (.py paths made absolute)."""
    specs = [str(Path(s).resolve()) if s.endswith(".py") else s for s in plugin_specs()]
    return {PLUGINS_ENV: ",".join(specs)} if specs else {}


def _import_plugin(spec: str) -> None:
    try:
        if spec.endswith(".py"):
            path = Path(spec).resolve()
            module_name = f"flowbench_plugin_{path.stem}"
            loader_spec = importlib.util.spec_from_file_location(module_name, path)
            if loader_spec is None or loader_spec.loader is None or not path.is_file():
                raise FileNotFoundError(f"no file {path}")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[module_name] = module
            loader_spec.loader.exec_module(module)
        else:
            importlib.import_module(spec)
    except (ImportError, FileNotFoundError) as err:
        raise FlowbenchError(
            f"{PLUGINS_ENV}: cannot import {spec!r} ({err}); give importable module names or "
            ".py file paths, separated by commas"
        ) from None


def _load() -> None:
    import flowbench.flows as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")  # a no-op once imported
    for spec in plugin_specs():
        if spec not in _imported_plugins:
            _imported_plugins.add(spec)  # before importing: a plugin may read the registry itself
            try:
                _import_plugin(spec)
            except BaseException:
                _imported_plugins.discard(spec)  # a failed plugin fails again on the next read, not silently
                raise


def _ordered() -> dict[str, ModelEntry]:
    """By year of publication, then name (what no import order can change); no year: last."""
    _load()
    entries = sorted(_entries.values(), key=lambda e: (e.year is None, e.year or 0, e.name))
    return {e.name: e for e in entries}


class _Models(Mapping):
    """Read-only view of the registry, loading the flow modules and plugins when first read."""

    def __getitem__(self, name: str) -> ModelEntry:
        return _ordered()[name]

    def __iter__(self):
        return iter(_ordered())

    def __len__(self) -> int:
        return len(_ordered())


MODELS: Mapping[str, ModelEntry] = _Models()


def list_models() -> list[str]:
    return list(MODELS)


def model_entry(name: str) -> ModelEntry:
    models = _ordered()
    if name not in models:
        raise FlowbenchError(unknown_name("model", name, models))
    return models[name]


def build_model(name: str, image_shape, **hparams):
    """Build a registered flow for images of shape (C, H, W)."""
    entry = model_entry(name)
    accepted = entry.hparams()
    unknown = sorted(set(hparams) - set(accepted))
    if unknown:
        raise FlowbenchError(
            f"model {name!r} has no hyperparameter {', '.join(map(repr, unknown))}: it accepts {', '.join(accepted)}"
        )
    try:
        return entry.builder(tuple(image_shape), **hparams)
    except ValueError as err:
        raise FlowbenchError(f"cannot build {name!r} for images {tuple(image_shape)}: {err}") from None
