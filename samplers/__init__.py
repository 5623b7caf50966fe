"""Pure-torch sampling core: the product-of-experts rule, the schedule bridge, the correctors.

Nothing here imports ComfyUI, except the ``comfy_*`` bridge modules, which nodes import.
"""
