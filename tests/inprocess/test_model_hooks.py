"""A hook-patched CONDITIONING (comfy.hooks) changes only its own binding's prediction.

ComfyUI's hooks attach weight patches to one CONDITIONING rather than to the MODEL; the stock
guider applies them per hook group inside calc_cond_batch. Two bindings of one tiny SD1.5 UNet,
one with a hooked prompt, share one batched forward in the product: the product's step must equal
the rule applied to the stock CFGGuider's predictions with the hook on the first prompt only.
"""
from __future__ import annotations

import comfy.hooks
import torch

from support.tiny_comfy_models import text_conditioning, tiny_sd15
from test_model_architectures import bind, product_step, stock_denoised


def hooked(cond, strength: float = 0.5):
    """The prompt with a weight hook that moves the UNet halfway to another seed's weights (the stock
    CreateHookModelAsLora node's patch)."""
    other = comfy.hooks.get_patch_weights_from_model(tiny_sd15(5))
    hooks = comfy.hooks.create_hook_model_as_lora(other, None, strength, 1.0)
    return comfy.hooks.set_hooks_for_conditioning(cond, hooks)


def test_a_hooked_prompt_changes_its_binding_and_not_the_other_binding_of_the_same_model():
    m = tiny_sd15(0)
    p1, p2, null = text_conditioning(1), text_conditioning(2), text_conditioning(3)
    p1_hooked = hooked(p1)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma, w, a = 3.0, (2.0, 1.5), (0.7, 0.3)
    before = stock_denoised(m, p1, x, sigma)

    got = product_step([bind(m, p1_hooked, null, w[0], a[0], "hooked"), bind(m, p2, null, w[1], a[1], "plain")],
                       x, sigma)

    c1_hooked, c1 = stock_denoised(m, p1_hooked, x, sigma), stock_denoised(m, p1, x, sigma)
    c2, c2_hooked = stock_denoised(m, p2, x, sigma), stock_denoised(m, hooked(p2), x, sigma)
    u = stock_denoised(m, null, x, sigma)
    assert (c1_hooked - c1).abs().max() > 1e-2          # the hook changes that prompt's prediction
    assert (c2_hooked - c2).abs().max() > 1e-2          # and would change the other's, were it applied there

    def rule(c_a, c_b):
        return w[0] * c_a + w[1] * c_b - (sum(w) - 1) * (a[0] * u + a[1] * u)

    torch.testing.assert_close(got, rule(c1_hooked, c2), atol=1e-4, rtol=1e-4)
    assert (got - rule(c1, c2)).abs().max() > 1e-2      # the hooked binding's prediction changed
    assert (got - rule(c1_hooked, c2_hooked)).abs().max() > 1e-2   # the plain binding's did not
    # The hook's weights are undone after sampling: the model predicts as before.
    torch.testing.assert_close(stock_denoised(m, p1, x, sigma), before, atol=0, rtol=0)


def test_a_hooked_binding_of_one_model_leaves_the_other_model_alone():
    m1, m2 = tiny_sd15(0), tiny_sd15(1)
    p1, p2, null = text_conditioning(1), text_conditioning(2), text_conditioning(3)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma, w, a = 2.0, (1.5, 1.0), (0.5, 0.5)
    got = product_step([bind(m1, hooked(p1), null, w[0], a[0], "a"), bind(m2, p2, null, w[1], a[1], "b")], x, sigma)
    c1, c2 = stock_denoised(m1, hooked(p1), x, sigma), stock_denoised(m2, p2, x, sigma)
    u1, u2 = stock_denoised(m1, null, x, sigma), stock_denoised(m2, null, x, sigma)
    want = w[0] * c1 + w[1] * c2 - (sum(w) - 1) * (a[0] * u1 + a[1] * u2)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
