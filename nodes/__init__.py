"""ComfyUI glue: the only package that imports ``comfy`` / ``comfy_api``.

Every public module here is one family and exposes ``NODES`` (its node classes) and optionally
``on_load()`` for the single, documented global change this pack makes: adding its sampler and scheduler
names to ComfyUI's lists.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil

from comfy_api.latest import ComfyExtension, io

log = logging.getLogger("preprint")


def family_module_names() -> list[str]:
    """Every public module of this package is a node family (``_``-prefixed ones are shared helpers)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def _families():
    return [importlib.import_module(f".{name}", __name__) for name in family_module_names()]


def register_names() -> None:
    """Run every family's ``on_load`` (adding the pack's sampler and scheduler names to ComfyUI's lists).
    Each hook is idempotent, so a second call changes nothing."""
    for module in _families():
        hook = getattr(module, "on_load", None)
        if hook is not None:
            hook()


class PreprintExtension(ComfyExtension):
    def __init__(self) -> None:
        super().__init__()
        self.loaded = False

    async def on_load(self) -> None:
        # Newer ComfyUI (nodes.load_custom_node) awaits on_load() before get_node_list(), the place it gives for
        # an extension's global set-up.
        register_names()
        self.loaded = True

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        if not self.loaded:  # 0.3.64 calls only get_node_list for a custom-node pack, never on_load
            await self.on_load()
        return [node for module in _families() for node in module.NODES]
