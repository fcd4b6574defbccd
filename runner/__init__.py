"""Headless runner: boots the user's ComfyUI in-process and executes workflows (`python -m preprint`)."""
