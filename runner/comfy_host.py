"""Find and boot the user's ComfyUI in-process, load this pack as ComfyUI loads custom nodes, run prompts.

Used by the command-line runner and by the host test tier. Booting follows ComfyUI's own ``main.py``:
CPU mode is chosen before ``comfy.model_management`` is imported, ``utils.extra_config`` is imported before
``nodes``, and a ``server.PromptServer`` exists before nodes load.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("preprint.runner")

PACK_DIR = Path(__file__).resolve().parent.parent


class HostError(RuntimeError):
    """A failure of the host (ComfyUI) set-up or of a prompt, with a one-line message for users."""


class PromptInvalid(HostError):
    """ComfyUI's validator rejected the prompt (unknown node, bad input, missing link...)."""


def find_comfyui(explicit: str | os.PathLike | None = None) -> Path | None:
    """ComfyUI checkout: ``explicit``, else ``$COMFYUI_PATH``, else the ComfyUI enclosing this pack when it sits
    in ``custom_nodes/``, else ``.comfyui`` inside this pack (where ``scripts/get_comfyui.sh`` clones the tested
    release), else ``~/ComfyUI``. Returns None when none is found."""
    candidates: list[Path] = []
    if explicit:
        candidates.append(Path(explicit))
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(os.environ["COMFYUI_PATH"]))
    if PACK_DIR.parent.name == "custom_nodes":
        candidates.append(PACK_DIR.parent.parent)
    # Before ~/ComfyUI: the set-up cloned it for this pack, at the version the pack is tested against.
    candidates.append(PACK_DIR / ".comfyui")
    candidates.append(Path.home() / "ComfyUI")
    for c in candidates:
        if (c / "comfy" / "samplers.py").is_file() and (c / "nodes.py").is_file():
            return c.resolve()
    return None


def why_not_found() -> str:
    return ("no ComfyUI checkout found (looked at $COMFYUI_PATH, an enclosing ComfyUI when this pack sits in "
            "custom_nodes/, .comfyui in this pack, and ~/ComfyUI)")


@dataclass
class Host:
    """A booted in-process ComfyUI."""

    path: Path
    loop: asyncio.AbstractEventLoop
    server: object
    pack_module: object | None = None
    pack_node_ids: list[str] = field(default_factory=list)
    asset_manager: object | None = None  # newer ComfyUI only
    _executor: object | None = None

    def executor(self):
        import execution

        if self._executor is None:
            self._executor = execution.PromptExecutor(self.server, **executor_options(execution.PromptExecutor,
                                                                                      self.asset_manager))
        return self._executor

    def validate(self, prompt: dict) -> list[str]:
        """Validate an API prompt with ComfyUI's own validator; returns the output node ids or raises."""
        import execution

        valid = asyncio.run(execution.validate_prompt(str(uuid.uuid4()), prompt, None))
        if not valid[0]:
            raise PromptInvalid(describe_validation_error(valid[1], valid[3]))
        return valid[2]

    def execute(self, prompt: dict, extra_data: dict | None = None) -> dict:
        """Validate then execute an API prompt; returns ``{node_id: ui outputs}`` or raises HostError."""
        outputs = self.validate(prompt)
        e = self.executor()
        e.execute(prompt, str(uuid.uuid4()), extra_data or {}, outputs)
        if not e.success:
            raise HostError(describe_execution_error(e.status_messages))
        return {k: v.get("outputs", v) if isinstance(v, dict) else v for k, v in e.history_result["outputs"].items()}


def describe_validation_error(error: dict, node_errors: dict) -> str:
    parts = [error.get("message", "invalid prompt")]
    if error.get("details"):
        parts.append(str(error["details"]).strip().replace("\n", "; "))
    for node_id, info in (node_errors or {}).items():
        for reason in info.get("errors", []):
            parts.append(f"node {node_id} ({info.get('class_type')}): {reason.get('message')}: {reason.get('details')}")
    return " | ".join(p for p in parts if p)


def describe_execution_error(status_messages: list) -> str:
    for event, data in status_messages:
        if event == "execution_error":
            return (f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                    f"{data.get('exception_type')}: {str(data.get('exception_message', '')).strip()}")
        if event == "execution_interrupted":
            return f"execution interrupted at node {data.get('node_id')}"
    return "execution failed without an error message"


_HOST: Host | None = None


def import_comfy(comfy_path: Path, *, cpu: bool = True):
    """Put ComfyUI on ``sys.path`` with its argument parsing off and, when ``cpu``, CPU mode chosen before
    ``comfy.model_management`` is first imported; returns ComfyUI's ``args``. Enough to build and run
    models without a server (training, benchmarks)."""
    comfy_path = Path(comfy_path).resolve()
    if str(comfy_path) not in sys.path:
        sys.path.insert(0, str(comfy_path))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    if cpu:
        args.cpu = True  # must precede the first import of comfy.model_management
    return args


def boot(comfy_path: Path, *, cpu: bool = True, user_custom_nodes: bool = False,
         pack_dir: Path = PACK_DIR, output_dir: Path | None = None, models_dir: Path | None = None) -> Host:
    """Boot ComfyUI in this process once and load this pack from ``pack_dir`` as a custom-node folder.

    ``models_dir`` replaces ComfyUI/models as the root of every model folder (checkpoints, vae, loras ...)."""
    global _HOST
    if _HOST is not None:
        return _HOST
    comfy_path = Path(comfy_path).resolve()
    os.chdir(comfy_path)  # ComfyUI resolves some resources relative to its working directory
    args = import_comfy(comfy_path, cpu=cpu)
    import folder_paths
    import utils.extra_config  # noqa: F401  (ComfyUI's own utils: must precede `nodes`)

    if output_dir is not None:
        folder_paths.set_output_directory(str(output_dir))
    if models_dir is not None:
        _use_models_dir(folder_paths, Path(models_dir))
    import server

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    asset_manager = _asset_manager(server.PromptServer, args)
    prompt_server = server.PromptServer(loop) if asset_manager is None else server.PromptServer(loop, asset_manager)
    import nodes

    loop.run_until_complete(nodes.init_extra_nodes(init_custom_nodes=user_custom_nodes, init_api_nodes=False))
    host = Host(comfy_path, loop, prompt_server, asset_manager=asset_manager)
    host.pack_module, host.pack_node_ids = load_pack(pack_dir, loop)
    _HOST = host
    return host


def server_flags(comfy_path: Path) -> list[str]:
    """Flags for a ComfyUI server process started by the tests or the command line on this checkout: newer
    releases turn the assets system on by default, which needs its database packages; switch it off there."""
    cli_args = (Path(comfy_path) / "comfy" / "cli_args.py").read_text(encoding="utf-8")
    return ["--disable-assets"] if "--disable-assets" in cli_args else []


def _asset_manager(prompt_server_class, args) -> object | None:
    """The asset manager newer ComfyUI's ``PromptServer(loop, asset_manager)`` requires (``app/assets/manager.py``);
    None where ``PromptServer`` takes only the loop (0.3.64).

    The in-process host runs with assets off, as ``main.py --disable-assets`` does: assets are on by default there
    and need a database and packages a test run has no use for. Releases differ in which flag
    ``default_asset_manager()`` reads (``disable_assets``, or the older, now deprecated ``enable_assets``), so both
    are set where they exist; should a release still hand back an enabled manager, its ``NoAssets`` is used.
    Newer-only path: it cannot run against the 0.3.64 checkout here."""
    if "asset_manager" not in inspect.signature(prompt_server_class.__init__).parameters:
        return None
    for flag, value in (("disable_assets", True), ("enable_assets", False)):
        if hasattr(args, flag):
            setattr(args, flag, value)
    from app.assets import manager

    asset_manager = manager.default_asset_manager()
    if getattr(asset_manager, "enabled", False) and hasattr(manager, "NoAssets"):
        asset_manager = manager.NoAssets(args)
    return asset_manager


def executor_options(executor_class, asset_manager: object | None) -> dict:
    """Keyword arguments for ``execution.PromptExecutor`` on this ComfyUI: a classic cache everywhere; newer
    releases read ``cache_args["ram"]`` / ``["ram_inactive"]`` unguarded and take the asset manager."""
    import execution

    params = inspect.signature(executor_class.__init__).parameters
    options: dict = {"cache_type": execution.CacheType.CLASSIC}
    if "cache_args" in params:
        options["cache_args"] = {"lru": 0, "ram": 0, "ram_inactive": 0}
    if "asset_manager" in params and asset_manager is not None:
        options["asset_manager"] = asset_manager
    return options


def _use_models_dir(folder_paths, models_dir: Path) -> None:
    """Point every folder under ComfyUI's models directory at the same name under ``models_dir``."""
    old_root = Path(folder_paths.models_dir).resolve()
    for name, (paths, exts) in list(folder_paths.folder_names_and_paths.items()):
        moved = []
        for p in paths:
            try:
                rel = Path(p).resolve().relative_to(old_root)
            except ValueError:
                continue  # a folder outside ComfyUI/models (custom_nodes, extra paths): not a model folder
            moved.append(str(models_dir / rel))
        if moved:
            folder_paths.folder_names_and_paths[name] = (moved, exts)
    folder_paths.models_dir = str(models_dir)
    folder_paths.filename_list_cache.clear()


def load_pack(pack_dir: Path, loop: asyncio.AbstractEventLoop) -> tuple[object, list[str]]:
    """Load the pack folder with ComfyUI's ``load_custom_node`` unless ComfyUI already loaded it."""
    import nodes

    pack_dir = Path(pack_dir)
    for module_name, loaded_dir in nodes.LOADED_MODULE_DIRS.items():
        if Path(loaded_dir).resolve() == pack_dir.resolve():
            module = sys.modules.get(str(pack_dir).replace(".", "_x_"))
            return module, _pack_ids(module_name)
    before = set(nodes.NODE_CLASS_MAPPINGS)
    ok = loop.run_until_complete(nodes.load_custom_node(str(pack_dir), before, module_parent="custom_nodes"))
    if not ok:
        raise HostError(f"ComfyUI could not import the Preprint pack from {pack_dir} (see the log above)")
    module = sys.modules[str(pack_dir).replace(".", "_x_")]
    return module, sorted(set(nodes.NODE_CLASS_MAPPINGS) - before)


def _pack_ids(module_name: str) -> list[str]:
    import nodes

    return sorted(k for k, v in nodes.NODE_CLASS_MAPPINGS.items()
                  if getattr(v, "RELATIVE_PYTHON_MODULE", "").endswith("." + module_name))
