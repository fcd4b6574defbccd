"""Preprint: recent diffusion research as ComfyUI nodes.

ComfyUI loads this folder as a custom-node package and calls :func:`comfy_entrypoint`. Importing the
package runs no host code: the node modules (the only code that imports ``comfy``) load inside the
entrypoint, so the pure-torch families can be imported and tested without ComfyUI.
"""

__version__ = "0.1.0"


async def comfy_entrypoint():
    from .nodes import PreprintExtension

    return PreprintExtension()
