"""Image operators that turn ComfyUI inputs into expert conditions: maps, masks, edges.

Pure torch and kornia; nothing here imports ComfyUI, so tests use it alone.
"""
