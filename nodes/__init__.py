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


class PreprintExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # ComfyUI calls this once when it loads the pack (it does not call on_load for custom nodes).
        nodes: list[type[io.ComfyNode]] = []
        for module in _families():
            hook = getattr(module, "on_load", None)
            if hook is not None:
                hook()
            nodes.extend(module.NODES)
        return nodes
