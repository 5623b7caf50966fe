"""The sampling core: the product-of-experts rule, noise levels, nulls, MCMC correctors, resampling
and reliability from variance. Pure torch: nothing here imports ComfyUI; the ComfyUI glue lives in
the ``comfy`` subpackage (see docs/architecture.md).
"""
