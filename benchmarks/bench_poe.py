"""Product-of-experts step time: ADM-64 (ImageNet class) x GLIDE base (text) at their published sizes.

    python3 benchmarks/bench_poe.py --device cuda                            # the table, into BENCHMARKS.md
    python3 benchmarks/bench_poe.py --device cuda --compile reduce-overhead  # plus a torch.compile row per batch
    .venv/bin/python benchmarks/bench_poe.py --small --device cpu --no-write # every column in seconds, on a CPU

Both networks are the pack's own modules (``model_loaders/adm.py``, ``model_loaders/glide.py``) built
from the published configurations (296M and 385M parameters) with random weights, so nothing is
downloaded; it needs torch and einops only (no ComfyUI, no tokenizer: the prompt is random token ids).
``--small`` shrinks the widths and the image to 32 px so that a CPU runs it in seconds.

One step of the product, for B images: ADM bound to a class (its null: class 0, the paper's choice),
GLIDE bound to a prompt (its null: the empty prompt), weights 3 and 3, reliabilities 0.5 and 0.5,
so each expert runs its condition and its null: 2B rows each.

- **Mode A, reference style**: the released code's way. Each expert eager in turn on its
  ``[cond; uncond]`` batch (conditions built on the device once), fp16 weights, the reference's
  explicit attention (``softmax(q k^T) v``, softmax in fp32), then the rule in plain out-of-place
  tensor ops.
- **Mode B, the pack's default path**: ``samplers.poe.product_prediction`` with its one batched
  forward per expert, conditions staged on the device once per run (the ``staged`` dict that
  ``ProductGuider`` keeps), the in-place combination, and each expert called as
  ``samplers.comfy.models.ExpertModel`` calls it (VP input scaling, continuous timestep interpolated on the
  device, ``Expert.eps``, denoised output) but without ComfyUI. Weights in the dtype the loader's
  ``auto`` gives on that device (ComfyUI's rule: fp16 on a CUDA GPU, fp32 on a CPU), SDPA attention.
- **Levers**, one at a time on top of B: bf16 (or fp16) weights, channels_last, the reference's
  attention instead of SDPA (how much SDPA brings), one mixed-precision kernel per norm instead of
  the fp32 round trip, no null forward for ADM (its reliability 0: ADM runs B rows), the levers
  together, and with ``--compile`` the loader's torch.compile option (its compile time reported).

Columns: the step's median time; each expert's own network forward alone at the same rows, dtype
and levers; the overhead, step / (sum of the forwards); the speed-up over mode A at that batch; peak
GPU memory over the step's runs (``torch.cuda.max_memory_allocated``, weights included); the compile
time (first call of each compiled network at that shape). Times are medians over ``--iters`` runs
after ``--warmup`` runs, timed with CUDA events on a GPU and ``time.perf_counter`` on a CPU.
A configuration that fails (out of memory, a kernel missing) gets a row saying so; ``--strict``
stops at the first instead.

What remains for a GPU session (none of it could be measured where this was written, which had
no GPU):

1. Run ``python3 benchmarks/bench_poe.py --device cuda`` and then with ``--compile
   reduce-overhead --batches 1 16 --no-write`` (the compile can take minutes per shape; keep each
   command inside the device's 10-minute limit), and
   ``python3 -m pytest -q tests/model_loaders/test_speed.py`` (its GPU tests skip on a CPU).
2. CUDA graphs in the default path (per expert, or the whole step, static buffers keyed by shape)
   are not implemented: the issue's batch-1 target (18 ms) cannot be met by eager launches of
   ~2000 kernels, so this is the next lever. ``samplers.poe.product_prediction`` now has one host
   sync per step (the finiteness check, after every forward is queued) besides the sampler's
   ``float(sigma)``; graphs would be captured per expert around ``Expert.eps``'s network call.
3. Check that the ``mixed`` norm (``unet_layers.set_norm``) runs on CUDA (half input with fp32
   affine parameters); if group_norm refuses it there, drop the lever or cast the parameters.
4. Choose the defaults from the table: ``auto`` dtype (ComfyUI picks fp16 first; bf16 may be as fast
   and never overflows), channels_last on by default on CUDA, the mixed norm.
5. Experts on different GPUs (a device option on the loader) when several are present.
6. GLIDE re-encodes the same prompt at every step (16 transformer layers); caching the text
   features per prompt would save those launches.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import statistics
import runpy
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if not __package__:  # run as a script: the pack's __init__.py registers the package unite_and_conquer
    runpy.run_path(str(REPO / "__init__.py"))

from unite_and_conquer.benchmarks.report import cpu_name, write_section  # noqa: E402
from unite_and_conquer.model_loaders import Expert, adm, glide, glide_tokenizer, speed  # noqa: E402
from unite_and_conquer.model_loaders.schedules import alphas_cumprod_for  # noqa: E402
from unite_and_conquer.samplers import noise_levels, poe  # noqa: E402

HEADING = "## Product step: ADM-64 x GLIDE base"
WEIGHTS = (3.0, 3.0)
RELIABILITIES = (0.5, 0.5)
CLASS, NULL_CLASS = 292, 0
PROMPT_TOKENS = 12
SIGMA = 2.5
COLUMNS = ("configuration", "batch", "rows (ADM, GLIDE)", "step (ms)", "ADM-64 forward (ms)", "GLIDE forward (ms)",
           "step / sum of forwards", "speed-up vs A", "peak GPU memory (MiB)", "compile (s)")


# --- the experts ----------------------------------------------------------------------------------

def adm64_config(small: bool) -> adm.ADMConfig:
    """ADM-64's configuration, read from ``adm.PUBLISHED`` (the table the loader recognises it by)."""
    key, pub = next((k, p) for k, p in adm.PUBLISHED.items() if p.name == "ADM-64")
    mc, nrb, mult, ds, cin, ncls, cout, scale_shift, updown = key
    config = adm.ADMConfig(
        resolution=pub.resolution, in_channels=cin, model_channels=mc, out_channels=cout, num_res_blocks=nrb,
        channel_mult=tuple(int(m) for m in mult), attention_ds=ds, num_classes=ncls, num_heads=pub.num_heads,
        num_head_channels=pub.num_head_channels, use_scale_shift_norm=scale_shift, resblock_updown=updown,
        attention_order=pub.attention_order)
    if small:
        config = replace(config, resolution=32, model_channels=32, num_res_blocks=1, num_head_channels=16)
    return config


def glide_base_config(small: bool) -> glide.GlideConfig:
    """GLIDE base (``model_creation.py`` defaults: 192 channels, 3 res blocks, attention at 32/16/8 px,
    a 16-layer 512-wide text transformer)."""
    config = glide.GlideConfig(
        image_size=64, super_res=False, inpaint=False, model_channels=192, out_channels=6, num_res_blocks=3,
        channel_mult=(1, 2, 3, 4), attention_ds=(2, 4, 8), num_head_channels=64, num_heads=1, num_heads_upsample=-1,
        use_scale_shift_norm=True, resblock_updown=True, text_ctx=128, xf_width=512, xf_layers=16, xf_heads=8,
        xf_final_ln=True, xf_padding=True)
    if small:
        config = replace(config, image_size=32, model_channels=32, num_res_blocks=1, num_head_channels=16,
                         xf_width=64, xf_layers=2, xf_heads=2)
    return config


def build_experts(small: bool, device: torch.device, dtype: torch.dtype, seed: int = 0) -> tuple[Expert, Expert]:
    """Both experts with random weights (the same for a given seed), on ``device`` in ``dtype``."""
    a_cfg, g_cfg = adm64_config(small), glide_base_config(small)
    torch.manual_seed(seed)
    with torch.device(device):
        a_net, g_net = adm.ADMUNet(a_cfg), glide.GlideUNet(g_cfg)
    experts = []
    for net, name, family, res, schedule in ((a_net, "ADM-64", "adm", a_cfg.resolution, "cosine"),
                                             (g_net, "GLIDE-base-64", "glide", g_cfg.image_size, "cosine")):
        net.to(dtype).eval().requires_grad_(False)
        experts.append(Expert(net, name, family, res, alphas_cumprod_for(schedule), prediction="eps_learned_sigma",
                              null_for=glide.blank_text if family == "glide" else None))
    return experts[0], experts[1]


def conditions(text_ctx: int) -> tuple[dict, dict, dict, dict]:
    """(ADM class, ADM null, GLIDE prompt, GLIDE null), batch 1, on the host as the binding nodes make them."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.full((1, text_ctx), glide_tokenizer.PAD_TOKEN, dtype=torch.long)
    tokens[0, :PROMPT_TOKENS] = torch.randint(0, glide_tokenizer.PAD_TOKEN, (PROMPT_TOKENS,), generator=g)
    mask = torch.zeros(1, text_ctx, dtype=torch.bool)
    mask[0, :PROMPT_TOKENS] = True
    text = {"tokens": tokens, "mask": mask}
    return {"y": torch.tensor([CLASS])}, {"y": torch.tensor([NULL_CLASS])}, text, glide.blank_text(text)


class Denoiser:
    """One expert as ``samplers.comfy.models.ExpertModel`` calls it, without ComfyUI: the VP input
    ``x / sqrt(1 + sigma^2)``, the expert's continuous timestep for ``sigma`` (interpolated in log
    sigma on the device, as ``ContinuousModelSampling.timestep``), its eps, the denoised image."""

    def __init__(self, expert: Expert, device: torch.device):
        self.expert = expert
        self.log_sigmas = noise_levels.sigmas_from_alphas_cumprod(expert.alphas_cumprod).log().float().to(device)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return noise_levels.timestep_from_log_sigmas(sigma, self.log_sigmas)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, condition: dict) -> torch.Tensor:
        s = sigma.reshape(-1, 1, 1, 1)
        eps = self.expert.eps(x / (s * s + 1).sqrt(), self.timestep(sigma), condition)
        return x - s * eps


# --- configurations -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    name: str
    dtype: torch.dtype
    attention: str = "sdpa"
    norm: str = "upcast"
    channels_last: bool = False
    compile: str = "off"
    reference: bool = False              # mode A
    adm_reliability: float = RELIABILITIES[0]


def configurations(device: torch.device, compile_mode: str | None) -> list[Config]:
    default = torch.float16 if device.type == "cuda" else torch.float32
    other = torch.bfloat16 if default != torch.bfloat16 else torch.float16
    b = Config(f"B: default path ({_dtype(default)}, SDPA)", default)
    rows = [
        Config("A: reference style (fp16, eager, explicit attention)", torch.float16, attention="math", reference=True),
        b,
        replace(b, name=f"B + {_dtype(other)} weights", dtype=other),
        replace(b, name="B + channels_last", channels_last=True),
        replace(b, name="B - SDPA (explicit attention)", attention="math"),
        replace(b, name="B + mixed-precision norm kernels", norm="mixed"),
        replace(b, name="B + no ADM null forward (its reliability 0)", adm_reliability=0.0),
        replace(b, name="B + bf16 + channels_last + mixed norm", dtype=torch.bfloat16, channels_last=True,
                norm="mixed"),
    ]
    if compile_mode:
        rows.append(replace(b, name=f"B + torch.compile {compile_mode}", compile=compile_mode))
    return rows


def _dtype(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


# --- timing ---------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, iters: int, warmup: int) -> float:
    """Median wall time of ``fn`` in ms: CUDA events around each call on a GPU, perf_counter on a CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        events = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(device)
        return statistics.median(s.elapsed_time(e) for s, e in events)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


# --- one configuration ----------------------------------------------------------------------------

@dataclass
class Row:
    config: Config
    batch: int
    rows: tuple[int, int] = (0, 0)
    step: float = float("nan")
    forwards: tuple[float, float] = (float("nan"), float("nan"))
    peak_mib: float | None = None
    compile_s: float | None = None
    error: str = ""


def reference_step(x, sigma, denoisers, staged, weights, reliabilities):
    """Mode A: each expert eager on its [cond; uncond] batch, then the rule in plain tensor ops."""
    conds, nulls = [], []
    for den, kwargs in zip(denoisers, staged):
        out = den(torch.cat([x, x]), torch.cat([sigma, sigma]), kwargs)
        c, u = out.chunk(2)
        conds.append(c)
        nulls.append(u)
    total = sum(reliabilities)
    u = sum(a / total * n for a, n in zip(reliabilities, nulls))
    return u + sum(w * (c - u) for w, c in zip(weights, conds))


def run_config(config: Config, batch: int, args, device: torch.device) -> Row:
    row = Row(config, batch)
    experts = build_experts(args.small, device, config.dtype)
    for e in experts:
        speed.configure(e, channels_last=config.channels_last, attention=config.attention, norm=config.norm)
        if config.compile != "off":
            speed.compile_expert(e, config.compile)
    denoisers = [Denoiser(e, device) for e in experts]
    cls, cls_null, text, text_null = conditions(experts[1].network.config.text_ctx)
    res = experts[0].resolution
    g = torch.Generator(device="cpu").manual_seed(2)
    x = torch.randn(batch, 3, res, res, generator=g).to(device)
    sigma = torch.full((batch,), SIGMA, device=device)
    reliabilities = (config.adm_reliability, RELIABILITIES[1])
    if config.reference:
        staged = [poe.stack_conditions([a, b], batch) for a, b in ((cls, cls_null), (text, text_null))]
        staged = [{k: v.to(device) for k, v in s.items()} for s in staged]
        rows = (2 * batch, 2 * batch)

        def step():
            return reference_step(x, sigma, denoisers, staged, WEIGHTS, reliabilities)
    else:
        bindings = [poe.Binding(experts[0], cls, WEIGHTS[0], reliabilities[0], (cls_null,), label="ADM-64 class"),
                    poe.Binding(experts[1], text, WEIGHTS[1], reliabilities[1], (text_null,), label="GLIDE prompt")]
        by_expert = {id(e): d for e, d in zip(experts, denoisers)}
        cache: dict = {}

        def eps_fn(expert, x_rows, sigma_rows, condition):
            return by_expert[id(expert)](x_rows, sigma_rows, condition)

        def step():
            return poe.product_prediction(x, sigma, bindings, eps_fn, cache)[0]

        plan = poe.plan_forwards(bindings)
        rows = tuple(len(call.rows) * batch for call in plan.calls)
        staged = [{k: v.to(device) for k, v in poe.stack_conditions(call.rows, batch).items()} for call in plan.calls]
    row.rows = rows
    with torch.inference_mode():
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        row.step = median_ms(step, device, args.iters, args.warmup)
        if device.type == "cuda":
            row.peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
        if config.compile != "off":
            row.compile_s = sum(sum(e.compiled.compile_seconds.values()) for e in experts)
        forwards = []
        for e, den, n, cond in zip(experts, denoisers, rows, staged):
            param = next(e.network.parameters())
            xr = torch.randn(n, 3, res, res, device=device).to(param.dtype)
            if config.channels_last:
                xr = xr.contiguous(memory_format=torch.channels_last)
            t = den.timestep(torch.full((n,), SIGMA, device=device))
            net = e.compiled if e.compiled is not None else e.network
            forwards.append(median_ms(lambda: net(xr, t, **cond), device, args.iters, args.warmup))
        row.forwards = tuple(forwards)
    return row


# --- report ---------------------------------------------------------------------------------------

def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None or v != v else f"{v:.{digits}f}"


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1)]
    mode_a = {r.batch: r.step for r in rows if r.config.reference and not r.error}
    for r in rows:
        if r.error:
            lines.append(f"| {r.config.name} | {r.batch} | failed: {r.error} |" + " |" * (len(COLUMNS) - 3))
            continue
        total = sum(r.forwards)
        rows_text = ", ".join(f"{n // r.batch}B" for n in r.rows)
        a = mode_a.get(r.batch)
        lines.append("| " + " | ".join([
            r.config.name, str(r.batch), rows_text, _fmt(r.step, 2), _fmt(r.forwards[0], 2), _fmt(r.forwards[1], 2),
            _fmt(r.step / total, 3), _fmt(a / r.step if a else None, 2) + ("x" if a else ""),
            _fmt(r.peak_mib, 0), _fmt(r.compile_s, 1)]) + " |")
    return "\n".join(lines)


def header(args, device: torch.device, command: str) -> str:
    a_cfg, g_cfg = adm64_config(args.small), glide_base_config(args.small)
    with torch.device("meta"):
        n_adm = sum(p.numel() for p in adm.ADMUNet(a_cfg).parameters())
        n_glide = sum(p.numel() for p in glide.GlideUNet(g_cfg).parameters())
    if device.type == "cuda":
        gpu = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, "
    else:
        gpu = "no GPU, "
    size = "reduced widths (--small), 32 px" if args.small else f"published sizes, {a_cfg.resolution} px"
    return "\n".join([
        f"Machine: {gpu}{cpu_name()} ({torch.get_num_threads()} torch threads). torch {torch.__version__}. "
        f"Date: {datetime.date.today().isoformat()}.",
        f"Command: `{command}`",
        "",
        f"ADM-64 ({n_adm / 1e6:.0f}M parameters) and GLIDE base ({n_glide / 1e6:.0f}M), {size}, random weights, "
        f"the pack's modules. One step: ADM bound to a class (null: class 0), GLIDE to a {PROMPT_TOKENS}-token "
        f"prompt (null: the empty prompt), weights {WEIGHTS}, reliabilities {RELIABILITIES}, sigma {SIGMA}. "
        f"Median of {args.iters} runs after {args.warmup} warm-up runs "
        f"({'CUDA events' if device.type == 'cuda' else 'perf_counter'}). Modes and levers: the docstring of "
        "`benchmarks/bench_poe.py`. Rows: each expert's forward batch, in images B. Step / sum of forwards: the "
        "product's overhead over its experts' own forwards at the same rows and settings.",
    ])


def main(argv: list[str] | None = None) -> list[Row]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--small", action="store_true", help="reduced widths and 32 px images (a CPU runs it in seconds)")
    ap.add_argument("--iters", type=int, default=None, help="timed runs (default 20 on a GPU, 3 on a CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 5 on a GPU, 1 on a CPU)")
    ap.add_argument("--compile", choices=speed.COMPILE_MODES[1:], help="add a torch.compile row per batch")
    ap.add_argument("--only", nargs="+", help="run only the configurations whose name starts with one of these")
    ap.add_argument("--strict", action="store_true", help="stop at the first configuration that fails")
    ap.add_argument("--no-write", action="store_true", help="print the table but leave BENCHMARKS.md alone")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.iters = args.iters or (20 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    if args.compile:
        why = speed.compile_unavailable(device)
        if why:
            ap.error(f"--compile: torch.compile cannot build kernels here: {why}")
    configs = [c for c in configurations(device, args.compile)
               if not args.only or any(c.name.startswith(p) for p in args.only)]
    rows = []
    for batch in args.batches:
        for config in configs:
            t0 = time.time()
            try:
                row = run_config(config, batch, args, device)
            except Exception as err:  # one failed lever (a kernel missing, out of memory) must not hide the rest
                if args.strict:
                    raise
                traceback.print_exc()
                row = Row(config, batch, error=f"{type(err).__name__}: {str(err).splitlines()[0][:120]}")
            rows.append(row)
            print(f"batch {batch:>3} | {config.name}: step {_fmt(row.step, 2)} ms ({time.time() - t0:.0f} s)"
                  + (f" FAILED {row.error}" if row.error else ""), flush=True)
            gc.collect()
            if gpu:
                torch.cuda.empty_cache()
    command = "python3 benchmarks/bench_poe.py " + " ".join(argv if argv is not None else sys.argv[1:])
    body = header(args, device, command.strip()) + "\n\n" + table(rows) + "\n"
    print()
    print(body)
    if not args.no_write:
        kind = device.type + (", reduced widths" if args.small else "")
        write_section(f"{HEADING} ({kind})", body)
    return rows


if __name__ == "__main__":
    main()
