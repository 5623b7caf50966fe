"""The ComfyUI glue of the sampling core: the only modules under ``samplers`` that import ComfyUI.

One job per module:

- ``models``: each expert as a ComfyUI ``BaseModel`` in a ``ModelPatcher``, the product's
  weightless model, and the device and dtype policy of the loaders.
- ``loading``: native experts read by ComfyUI's checkpoint reader and built on its layers
  (``comfy.ops``), so ModelPatcher can cast, stream and partially load them.
- ``model_experts``: any ComfyUI MODEL as an expert (PoEBindModel): its conds prepared and evaluated
  the way ComfyUI's guider does, at its own noise level (``parameterization``).
- ``guider``: the product as a ``CFGGuider`` subclass (``ProductGuider``) that overrides
  ``predict_noise``, and ``sample`` to validate the product on the latent it was given
  (``samplers/validation.py``); the same check for a stock sampler on one binding's MODEL.
- ``sampling``: ComfyUI's sampler and scheduler lists, sigmas over the common range, and one
  call that runs a sampler.
- ``intervals``: what running a sampler one interval at a time needs (shared by the next two).
- ``correctors``: the MCMC corrector between intervals (``with_corrector``).
- ``resampling``: RePaint resampling along a jump schedule (``with_resampling``).
- ``sde``: the pack's Euler–Maruyama step as a ComfyUI sampler (``poe_euler_maruyama``), with OR / AND groups.
- ``particles``: Feynman–Kac weighted particles inside stochastic samplers (``with_particles``).

ComfyUI surface. Every ComfyUI name these modules use is listed here, so an upgrade of ComfyUI
is checked against this list (``tests/test_layers.py`` fails on a name used but not listed);
docs/comfyui_api.md compares each with the newest upstream ComfyUI:

- comfy.model_base.BaseModel (``_apply_model``, ``memory_required``, ``model_sampling``,
  ``diffusion_model``, ``apply_model``), comfy.model_base.ModelType (``EPS``)
- comfy.supported_models_base.BASE (``unet_config``, ``latent_format``, ``memory_usage_factor``)
- comfy.latent_formats.ChromaRadiance (pixel latents)
- comfy.model_sampling.ModelSamplingDiscrete (``set_sigmas``, ``timestep``, ``log_sigmas``,
  ``sigma_min``, ``sigma_max``, ``calculate_input``, ``calculate_denoised``, ``noise_scaling``,
  ``inverse_noise_scaling``), comfy.model_sampling.EPS, comfy.model_sampling.CONST
- comfy.model_patcher.ModelPatcher (``set_additional_models``, ``load_device``, ``model``, ``clone``,
  ``add_wrapper_with_key``), comfy.patcher_extension.WrappersMP (``OUTER_SAMPLE``: the wrapper gets
  the guider as ``executor.class_obj``, with its ``cfg``)
- comfy.model_management.get_torch_device, comfy.model_management.unet_offload_device,
  comfy.model_management.unet_dtype, comfy.model_management.intermediate_device,
  comfy.model_management.soft_empty_cache,
  comfy.model_management.throw_exception_if_processing_interrupted
- comfy.samplers.CFGGuider (``predict_noise``, ``inner_set_conds``, ``sample``, ``model_patcher``,
  ``inner_model``), comfy.samplers.KSampler (``sigmas``), comfy.samplers.KSAMPLER
  (``sampler_function``, ``extra_options``, ``inpaint_options``, ``max_denoise``),
  comfy.samplers.KSamplerX0Inpaint (``latent_image``, ``noise``), comfy.samplers.sampler_object,
  comfy.samplers.SAMPLER_NAMES, comfy.samplers.SCHEDULER_NAMES
- comfy.k_diffusion.sampling.BrownianTreeNoiseSampler
- MODEL experts: comfy.samplers.calc_cond_batch, comfy.samplers.process_conds,
  comfy.samplers.preprocess_conds_hooks, comfy.samplers.filter_registered_hooks_on_conds,
  comfy.sampler_helpers.convert_cond, comfy.sampler_helpers.prepare_model_patcher,
  comfy.sampler_helpers.get_additional_models, comfy.sampler_helpers.cleanup_models,
  comfy.model_patcher.create_model_options_clone (``ModelPatcher.pre_run``, ``cleanup``,
  ``restore_hook_patches``, ``get_model_object``, ``model_options``), comfy.conds.CONDRegular and
  ``BaseModel.extra_conds`` (native conditions in a CONDITIONING), ``BaseModel.process_latent_in``,
  ``BaseModel.latent_format`` (``latent_channels``)
- comfy.sample.prepare_noise, comfy.sampler_helpers.prepare_mask, comfy.utils.PROGRESS_BAR_ENABLED
- comfy.utils.load_torch_file (``safe_load``, ``return_metadata``), comfy.ops.pick_operations,
  comfy.ops.manual_cast (``GroupNorm``, ``LayerNorm``, ``Embedding``, ``comfy_cast_weights``),
  comfy.model_management.unet_manual_cast
- latent_preview.prepare_callback (progress bar and x0 previews)
- model_options keys: ``transformer_options`` (``sample_sigmas``), ``sampler_post_cfg_function``; the pack's own ``uac_terms``
  (``guider.TERMS_SINK``)
- k-diffusion sampler functions' contract (``particles``): ``(model, x, sigmas, extra_args, callback, disable,
  **options)``, a ``noise_sampler`` option, and one callback ``{"i", "x", "denoised"}`` per step right after its
  first model call; ``KSamplerX0Inpaint.sigmas`` and ``.inner_model`` (the guider)
"""
