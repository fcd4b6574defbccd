"""`python -m preprint`: run workflows headlessly with the user's ComfyUI, check the example workflows.

    python -m preprint run WORKFLOW.json [--output DIR] [--comfyui PATH]
    python -m preprint check [WORKFLOW.json ...]
    python -m preprint build-workflows
    python -m preprint train-proving-ground [--only sd15|flux] [--out DIR] [--vae-from DIR]

Errors are one line on stderr with a non-zero exit: 2 for a bad workflow, 3 for a missing host or model,
4 for a failed execution.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from .comfy_host import PACK_DIR, HostError, PromptInvalid, find_comfyui, why_not_found
from .tiny_substitution import missing_model_files, nothing_installed, substitute_tiny
from .workflow_format import (
    WorkflowError,
    check_api,
    check_editor,
    editor_to_api,
    is_api_format,
    is_editor_format,
    read_json,
)

log = logging.getLogger("preprint.runner")
WORKFLOWS_DIR = PACK_DIR / "workflows"
EXIT_BAD_WORKFLOW, EXIT_NO_HOST, EXIT_FAILED = 2, 3, 4
TINY_MAX_SIDE = 256
TINY_NOTICE = ("NOTE: no checkpoint is installed, so this run uses Preprint's tiny UNTRAINED test model at "
               f"{TINY_MAX_SIDE}x{TINY_MAX_SIDE} at most: the images show that the graph runs, not what the "
               "technique looks like. Put a checkpoint in ComfyUI/models/checkpoints to get real images.")

TOY_NOTICE = ("NOTE: no checkpoint is installed, so this run shows {workflow} instead: a small toy model trained "
              "by Preprint on generated pictures of coloured circles, squares and triangles (128x128), prompted "
              "in their words ('a red circle above a blue square on a white background'). It is a toy, not an "
              "image model: how closely it follows a caption is measured in benchmarks/results/proving_ground.md. "
              "Put a checkpoint in ComfyUI/models/checkpoints to run the workflow you asked for.")


class CliError(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def _boot(args, user_custom_nodes: bool):
    path = find_comfyui(args.comfyui)
    if path is None:
        raise CliError(f"{why_not_found()}; install ComfyUI and set COMFYUI_PATH (or pass --comfyui PATH)",
                       EXIT_NO_HOST)
    from . import comfy_host

    output = Path(args.output).resolve() if getattr(args, "output", None) else None
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
    models = Path(args.models).resolve() if getattr(args, "models", None) else None
    if models is not None and not models.is_dir():
        raise CliError(f"--models {args.models}: no such folder; pass a folder that holds checkpoints/, vae/ ...",
                       EXIT_NO_HOST)
    return comfy_host.boot(path, cpu=not args.gpu, user_custom_nodes=user_custom_nodes, output_dir=output,
                           models_dir=models)


def load_prompt(path: Path, defs) -> dict:
    data = read_json(path)
    if is_editor_format(data):
        return editor_to_api(data, defs)
    if is_api_format(data):
        return data
    raise WorkflowError(f"{path}: neither an editor workflow (with 'nodes' and 'links') nor an API prompt "
                        "(node ids mapping to objects with 'class_type'); export it again from ComfyUI")


def resolve_models(prompt: dict, allow_tiny: bool) -> tuple[dict, bool]:
    """Check that the loaders' model files are installed; with none installed at all, use the tiny model.

    A named file that is missing while others are installed is an error: the user most likely mistyped it
    or has not downloaded that one, and a noise image would hide the mistake.
    """
    import folder_paths

    missing = missing_model_files(prompt)
    if not missing:
        return prompt, False
    folders = {m[3] for m in missing} | {"checkpoints"}
    if allow_tiny and nothing_installed(folders):
        prompt, _ = substitute_tiny(prompt, max_side=TINY_MAX_SIDE)
        return prompt, True
    nid, loader, name, folder = missing[0]
    installed = folder_paths.get_filename_list(folder)
    shown = ", ".join(installed[:5]) + (" ..." if len(installed) > 5 else "") if installed else "none"
    raise CliError(f"node {nid} ({loader}): model file {name!r} is not in "
                   f"{folder_paths.get_folder_paths(folder)[0]} (installed: {shown}); download it or pick an "
                   "installed one", EXIT_NO_HOST)


def cmd_run(args) -> int:
    path = Path(args.workflow)
    data = read_json(path)  # fail fast on unreadable / malformed files, before the slow host boot
    if not (is_editor_format(data) or is_api_format(data)):
        raise WorkflowError(f"{path}: neither an editor workflow (with 'nodes' and 'links') nor an API prompt "
                            "(node ids mapping to objects with 'class_type'); export it again from ComfyUI")
    host = _boot(args, user_custom_nodes=not args.no_user_nodes)
    from .workflow_format import node_defs

    defs = node_defs()
    prompt = load_prompt(path, defs)
    unknown = sorted({n.get("class_type") for n in prompt.values() if n.get("class_type") not in defs})
    if unknown:
        raise WorkflowError(f"{path}: unknown node type(s) {', '.join(map(repr, unknown))}; install the pack(s) "
                            "that provide them (ComfyUI-Manager can find missing nodes)")
    toy = False
    if args.toy_workflow and missing_model_files(prompt) and nothing_installed({"checkpoints", "diffusion_models"}):
        prompt, toy = load_prompt(Path(args.toy_workflow), defs), True
        print(TOY_NOTICE.format(workflow=Path(args.toy_workflow).name), file=sys.stderr)
    prompt, tiny = resolve_models(prompt, allow_tiny=not args.no_tiny)
    if tiny:
        print(TINY_NOTICE, file=sys.stderr)
    start = time.perf_counter()
    outputs = _execute_quietly(host, prompt, verbose=args.verbose)
    images = [img for out in outputs.values() for img in (out.get("images", []) if isinstance(out, dict) else [])]
    import folder_paths

    out_dir = Path(folder_paths.get_output_directory())
    for img in images:
        print(out_dir / img.get("subfolder", "") / img["filename"])
    print(f"done: {len(images)} image(s) in {time.perf_counter() - start:.1f} s"
          + (" (tiny untrained model)" if tiny else "") + (" (proving-ground toy model)" if toy else ""),
          file=sys.stderr)
    return 0


def _execute_quietly(host, prompt: dict, verbose: bool) -> dict:
    """Execute; unless verbose, ComfyUI's own traceback of a failing node is held back (the one-line error
    says what failed, and -v shows the traceback)."""
    root = logging.getLogger()
    level = root.level
    if not verbose:
        root.setLevel(logging.CRITICAL)
    try:
        return host.execute(prompt)
    except PromptInvalid:
        raise
    except HostError as e:
        raise HostError(f"{e}{'' if verbose else ' (run with -v for the traceback)'}") from e
    finally:
        root.setLevel(level)


def workflow_files(paths: list[str]) -> list[Path]:
    if paths:
        return [Path(p) for p in paths]
    return sorted(WORKFLOWS_DIR.glob("*.json")) + sorted((WORKFLOWS_DIR / "api").glob("*.json"))


def cmd_check(args) -> int:
    _boot(args, user_custom_nodes=False)
    from .workflow_format import node_defs

    defs = node_defs()
    rows: list[tuple[str, str, str]] = []
    bad = 0
    for f in workflow_files(args.workflows):
        try:
            data = read_json(f)
            if is_editor_format(data):
                kind, problems = "editor", check_editor(data, defs)
            elif is_api_format(data):
                kind, problems = "api", check_api(data, defs)
            else:
                kind, problems = "?", ["neither editor nor API format"]
        except WorkflowError as e:
            kind, problems = "?", [str(e)]
        bad += bool(problems)
        rel = f.relative_to(PACK_DIR) if f.is_relative_to(PACK_DIR) else f
        rows.append((str(rel), kind, "ok" if not problems else "; ".join(problems)))
    width = max((len(r[0]) for r in rows), default=10)
    print(f"{'workflow':<{width}}  format  result")
    for name, kind, result in rows:
        print(f"{name:<{width}}  {kind:<6}  {result}")
    print(f"{len(rows) - bad} of {len(rows)} workflow(s) fit the live node schemas")
    return 0 if bad == 0 else EXIT_BAD_WORKFLOW


def cmd_build(args) -> int:
    _boot(args, user_custom_nodes=False)
    from .workflow_builder import build_all

    for path in build_all(WORKFLOWS_DIR):
        print(path.relative_to(PACK_DIR))
    return 0


def cmd_train(args) -> int:
    path = find_comfyui(args.comfyui)
    if path is None:
        raise CliError(f"{why_not_found()}; the toys are built from ComfyUI's own model classes: install ComfyUI "
                       "and set COMFYUI_PATH (or pass --comfyui PATH)", EXIT_NO_HOST)
    from . import comfy_host

    comfy_host.import_comfy(path, cpu=not args.gpu)
    import dataclasses

    from ..proving import models, train

    out = Path(args.out).resolve() if args.out else models.weights_dir()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    vae_from = Path(args.vae_from).resolve() if args.vae_from else None
    for arch in args.only or list(models.ARCHITECTURES):
        budget = train.BUDGETS[arch]
        if args.smoke:  # checks the pipeline end to end in about a minute; the weights are useless
            budget = dataclasses.replace(budget, vae_steps=2, vae_batch=2, scenes=8, model_steps=2, model_batch=2)
        try:
            train.train_toy(arch, out, seed=args.seed, budget=budget, vae_from=vae_from)
        except models.ProvingWeightsError as e:
            raise CliError(str(e), EXIT_NO_HOST) from e
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m preprint", description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", help="ComfyUI checkout (default: $COMFYUI_PATH, an enclosing ComfyUI, ~/ComfyUI)")
    p.add_argument("--gpu", action="store_true", help="let ComfyUI use the GPU (default: CPU)")
    p.add_argument("-v", "--verbose", action="store_true", help="show ComfyUI's log")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="execute a workflow (editor or API format) and save its images")
    r.add_argument("workflow")
    r.add_argument("--output", default="output", help="folder for the images (default: ./output)")
    r.add_argument("--no-tiny", action="store_true", help="never fall back to the tiny untrained model")
    r.add_argument("--toy-workflow", metavar="WORKFLOW",
                   help="when no checkpoint is installed at all, run this workflow (built on the trained "
                        "proving-ground toy) instead of the tiny untrained fallback")
    r.add_argument("--no-user-nodes", action="store_true", help="do not load the other packs in custom_nodes")
    r.add_argument("--models", metavar="DIR",
                   help="read model files from DIR (its checkpoints/, vae/, loras/ ...) instead of ComfyUI/models")
    r.set_defaults(func=cmd_run)
    c = sub.add_parser("check", help="validate workflows (default: every example) against the live schemas")
    c.add_argument("workflows", nargs="*")
    c.set_defaults(func=cmd_check)
    b = sub.add_parser("build-workflows", help="regenerate workflows/ and workflows/api/ from workflows/specs")
    b.set_defaults(func=cmd_build)
    t = sub.add_parser("train-proving-ground",
                       help="train the proving ground's toy models (seeded; about an hour on a 2-core CPU)")
    t.add_argument("--only", action="append", choices=["sd15", "flux"], help="train only this toy (repeatable)")
    t.add_argument("--out", metavar="DIR", help="write the weight files here (default: the pack's proving/weights)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    t.add_argument("--smoke", action="store_true", help="a few steps of each stage, to check the pipeline")
    t.add_argument("--vae-from", metavar="DIR",
                   help="reuse the VAE in DIR (e.g. proving/weights) if it was trained with this seed and recipe, "
                        "and train the diffusion model only")
    t.set_defaults(func=cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR, format="%(message)s")
    if args.command == "run":
        # before the host boot changes directory to ComfyUI's
        args.output = os.path.abspath(args.output)
        args.workflow = os.path.abspath(args.workflow)
        if args.models:
            args.models = os.path.abspath(args.models)
        if args.toy_workflow:
            args.toy_workflow = os.path.abspath(args.toy_workflow)
    if args.command == "train-proving-ground" and args.out:
        args.out = os.path.abspath(args.out)
    if args.command == "check":
        args.workflows = [os.path.abspath(w) for w in args.workflows]
    try:
        return args.func(args)
    except WorkflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_WORKFLOW
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except PromptInvalid as e:
        print(f"error: invalid workflow: {e}", file=sys.stderr)
        return EXIT_BAD_WORKFLOW
    except HostError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
