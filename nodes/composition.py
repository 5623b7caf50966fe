"""Composition nodes: weighted particles for a product, the pack's SDE sampler, and OR / AND groups."""
from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..samplers import superposition
from ..samplers.comfy import particles as comfy_particles
from ..samplers.comfy import sde as comfy_sde
from ..samplers.comfy.correctors import with_corrector
from ..samplers.particles import MOVES, OUTPUTS, ParticleConfig
from .common import CATEGORY, Experts, check_choice, check_number, node_input

Particles = io.Custom("POE_PARTICLES")
Corrector = io.Custom("POE_CORRECTOR")


def describe_particles(config: ParticleConfig) -> str:
    move = ""
    if config.corrector is not None:
        move = f"; move: corrector {'after each resampling' if config.move == 'resampled' else 'at every level'}"
    return (f"{config.particles} particle(s) per image, lambda = {config.temperature:g} "
            f"({'exact' if config.temperature == 1 else 'tempered: biased towards the plain sampler'}), resample "
            f"when ESS < {config.ess_threshold:g} x {config.particles}, output: {config.output}{move}")


class PoEParticles(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        d = ParticleConfig()  # the node's defaults are the library's
        return io.Schema(
            node_id="PoEParticles",
            display_name="Particles (PoE)",
            category=f"{CATEGORY}/sampling",
            description="Feynman-Kac weighted particles for the product (Skreta et al., ICML 2025): each output image "
                        "is drawn from a group of K particles whose weights correct the bias of summing the experts' "
                        "scores, and groups whose weights degenerate are resampled. Costs K product evaluations per "
                        "output image and step (no extra forward: the weights come from the predictions the step "
                        "makes). Connect it to PoEKSampler's 'particles' input or to PoEParticleSampler. Needs a "
                        "stochastic sampler: poe_euler_maruyama (exact for the weights) or an ancestral / SDE one.",
            inputs=[
                io.Int.Input("particles_per_image", default=d.particles, min=1, max=256,
                             tooltip="K: particles per output image (one group each). PoEKSampler runs "
                                     "batch_size x K images; K = 1 is the plain sampler."),
                io.Float.Input("temperature", default=d.temperature, min=0.0, max=1.0, step=0.01,
                               tooltip="lambda, the factor on each step's log-weight increment. 1 (the default) is "
                                       "exact: the weighted set targets the product. Below 1 the weights are tempered "
                                       "towards the plain sampler: they degenerate less, but the images are biased "
                                       "back towards the plain sampler's (0 is the plain sampler). The default is 1 "
                                       "because at 30 steps the weights kept a mean ESS / K above 0.5 with it on the "
                                       "digits and at an SD1.5 latent's size (BENCHMARKS.md); they degenerate mostly "
                                       "at the low noise levels."),
                io.Float.Input("ess_threshold", default=d.ess_threshold, min=0.0, max=1.0, step=0.01,
                               tooltip="A group is resampled (systematically) when its effective sample size falls to "
                                       "this fraction of K or below. 1: every step; 0: never. With a corrector at "
                                       "every level (move = levels), 1 measured best: the weights never spread and "
                                       "the moves separate each step's copies (BENCHMARKS.md)."),
                io.Combo.Input("output", options=list(OUTPUTS), default=d.output,
                               tooltip="all: every particle, after a final resampling (a draw from the target; "
                                       "copies are possible). draw: one per group, drawn by weight. best: the "
                                       "highest-weight particle of each group."),
                io.Combo.Input("move", options=list(MOVES), default=d.move, optional=True,
                               tooltip="When the corrector (if connected) runs: resampled = after each step whose "
                                       "particles were resampled (resample-move: separates the copies); levels = at "
                                       "every level of its window, as PoECorrector alone. On closed-form products "
                                       "levels with MALA and ess_threshold 1 brought 512 particles near the noise "
                                       "floor of exact samples, and kept the mode proportions that only the weights "
                                       "get right (BENCHMARKS.md)."),
                Corrector.Input("corrector", optional=True,
                                tooltip="Optional MCMC move step (PoECorrector). Each of its steps costs one product "
                                        "evaluation per particle and level it runs at."),
            ],
            outputs=[Particles.Output(display_name="particles")],
        )

    @classmethod
    def execute(cls, particles_per_image, temperature, ess_threshold, output, move=None, corrector=None) -> io.NodeOutput:
        node = "PoEParticles"
        move = ParticleConfig().move if move is None else move
        check_choice(node, "output", output, OUTPUTS, "output")
        check_choice(node, "move", move, MOVES, "move")
        for name, value in (("temperature", temperature), ("ess_threshold", ess_threshold)):
            check_number(node, name, value)
        with node_input(node, "temperature"):
            config = ParticleConfig(particles_per_image, temperature, ess_threshold, output, move, corrector)
        return io.NodeOutput(config, ui={"text": (describe_particles(config),)})


class PoEParticleSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoEParticleSampler",
            display_name="Particle Sampler (PoE)",
            category=f"{CATEGORY}/sampling",
            description="Weighted particles (PoEParticles) as a SAMPLER for SamplerCustomAdvanced with PoEGuider. The "
                        "latent's batch is the particles: each group of K consecutive images is one output. Without "
                        "a sampler it steps with poe_euler_maruyama; ComfyUI's ancestral and SDE samplers also work "
                        "(their weights hold to first order); deterministic and CFG++ samplers are refused.",
            inputs=[Particles.Input("particles", tooltip="The particle settings (PoEParticles)."),
                    io.Sampler.Input("sampler", optional=True,
                                     tooltip="A stochastic sampler from KSamplerSelect (euler_ancestral, dpmpp_2m_sde, "
                                             "...) or PoESDESampler; empty: poe_euler_maruyama.")],
            outputs=[io.Sampler.Output(display_name="SAMPLER")],
        )

    @classmethod
    def execute(cls, particles, sampler=None) -> io.NodeOutput:
        with node_input("PoEParticleSampler", "sampler"):
            return io.NodeOutput(comfy_particles.with_particles(sampler, particles))


class PoESDESampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoESDESampler",
            display_name="Euler-Maruyama SDE Sampler (PoE)",
            category=f"{CATEGORY}/sampling",
            description="The pack's Euler-Maruyama step of the reverse diffusion SDE (poe_euler_maruyama), as a "
                        "SAMPLER for SamplerCustomAdvanced. Its noise is the diffusion's own, so it is the sampler "
                        "that runs OR / AND groups (they track each member's log-density along the path) and the one "
                        "the particle weights are derived for. One product evaluation per step.",
            inputs=[],
            outputs=[io.Sampler.Output(display_name="SAMPLER")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(comfy_sde.SDEKSampler())


def _members_input() -> io.Input:
    return io.Int.Input("members", default=2, min=2, max=64,
                        tooltip="How many bindings, counted from the end of the chain, form the group. Bind the "
                                "members last, group them, then chain further bindings (a class expert, ...).")


def _weight_input() -> io.Input:
    return io.Float.Input("weight", default=1.0, min=-100.0, max=100.0, step=0.05, round=0.0001,
                          tooltip="w_G, the group's weight in the product: it replaces the members' own weights. 1 "
                                  "with nothing else chained is the group itself; 1 + s guides it against the pooled "
                                  "null (classifier-free guidance at scale 1 + s).")


def _group(node: str, experts, members: int, kind: str, weight: float, priors=None, clip=None) -> list:
    bindings = list(experts or [])
    if not bindings:
        raise ValueError(f"{node}: input 'experts' is empty: connect a PoEBind* chain")
    if members > len(bindings):
        raise ValueError(f"{node}: input 'members' is {members} but the chain has {len(bindings)} binding(s); bind the "
                         "members first, or lower 'members'")
    check_number(node, "weight", weight)
    indices = list(range(len(bindings) - members, len(bindings)))
    with node_input(node, "priors" if priors is not None else ("clip_min" if clip is not None else "members")):
        kwargs = {"clip": clip} if clip is not None else {}
        return superposition.make_group(bindings, indices, kind, weight, priors, **kwargs)


class PoEOrGroup(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PoEOrGroup",
            display_name="OR Group (PoE)",
            category=f"{CATEGORY}/bindings",
            description="Makes the last bindings of the chain an OR: a mixture of the members with prior weights (one "
                        "image shows one member or another, in those proportions), by each member's log-density "
                        "tracked along the sampling path (SuperDiff, Skreta et al., ICLR 2025). The group joins the "
                        "product as one binding, so (style A OR style B) x class expert works. Needs sampler "
                        "poe_euler_maruyama (PoEKSampler) or PoESDESampler; not with particles or a corrector.",
            inputs=[
                Experts.Input("experts", tooltip="The chain whose last bindings form the group."),
                _members_input(),
                io.String.Input("priors", default="", multiline=False,
                                tooltip="Prior weights, one per member in chain order, comma-separated (normalised); "
                                        "empty = equal. Exact when each member is a plain conditional (no guidance "
                                        "inside the group)."),
                _weight_input(),
            ],
            outputs=[Experts.Output(display_name="experts")],
        )

    @classmethod
    def execute(cls, experts, members, priors, weight) -> io.NodeOutput:
        node = "PoEOrGroup"
        try:
            values = [float(p) for p in priors.replace(";", ",").split(",") if p.strip()]
        except ValueError:
            raise ValueError(f"{node}: input 'priors' is {priors[:80]!r}; give numbers separated by commas, such as "
                             "'0.8, 0.2', or leave it empty") from None
        bindings = _group(node, experts, members, "or", weight, values or None)
        return io.NodeOutput(bindings, ui={"text": (superposition.describe_groups(bindings),)})


class PoEAndGroup(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        lo, hi = superposition.AND_CLIP
        return io.Schema(
            node_id="PoEAndGroup",
            display_name="AND Group (PoE)",
            category=f"{CATEGORY}/bindings",
            description="Makes the last bindings of the chain an AND: at every step the members are mixed with the "
                        "coefficients that keep their log-densities changing equally, so the image stays where every "
                        "member finds it equally likely (SuperDiff, Skreta et al., ICLR 2025), instead of a fixed "
                        "average. The coefficients are clipped; the sampler's rule output reports their range. "
                        "Needs sampler poe_euler_maruyama (PoEKSampler) or PoESDESampler; not with particles or a "
                        "corrector. Scheduler kl_optimal tracked the log-densities best on closed-form pairs "
                        "(BENCHMARKS.md).",
            inputs=[
                Experts.Input("experts", tooltip="The chain whose last bindings form the group."),
                _members_input(),
                _weight_input(),
                io.Float.Input("clip_min", default=lo, min=-1000.0, max=1.0, step=0.5,
                               tooltip="Lowest coefficient a member may get (then the coefficients are renormalised)."),
                io.Float.Input("clip_max", default=hi, min=0.0, max=1000.0, step=0.5,
                               tooltip="Highest coefficient a member may get. The solved coefficients are large "
                                       "where the members nearly agree (high noise); clipping them there lets the "
                                       "tracked densities drift apart."),
            ],
            outputs=[Experts.Output(display_name="experts")],
        )

    @classmethod
    def execute(cls, experts, members, weight, clip_min, clip_max) -> io.NodeOutput:
        node = "PoEAndGroup"
        for name, value in (("clip_min", clip_min), ("clip_max", clip_max)):
            check_number(node, name, value)
        bindings = _group(node, experts, members, "and", weight, clip=(clip_min, clip_max))
        return io.NodeOutput(bindings, ui={"text": (superposition.describe_groups(bindings),)})


def sampler_for(node: str, sampler_name: str, bindings, corrector, particles, resample_count: int):
    """PoEKSampler's checks of groups and particles against its other inputs, and the plain SAMPLER
    for ``sampler_name`` (the pack's own included)."""
    if superposition.groups_of(bindings):
        with node_input(node, "experts"):
            superposition.check_groups(bindings)
        if sampler_name != comfy_sde.SAMPLER_NAME:
            raise ValueError(f"{node}: input 'sampler_name' is {sampler_name!r}, but the chain has an OR / AND group, "
                             "whose members' log-densities only the pack's SDE step tracks: choose "
                             f"{comfy_sde.SAMPLER_NAME}")
        for name, present in (("corrector", corrector is not None and corrector.method != "none"),
                              ("particles", particles is not None), ("resample_count", resample_count > 1)):
            if present:
                raise ValueError(f"{node}: input '{name}' cannot be used with an OR / AND group (it splits or moves the "
                                 "path along which the members' log-densities are tracked); disconnect it or remove "
                                 "the group")
    if particles is not None and resample_count > 1:
        raise ValueError(f"{node}: input 'resample_count' (RePaint resampling) cannot be used with particles; set it "
                         "to 1")
    return comfy_sde.sampler_object(sampler_name)


def with_particles(node: str, sampler, particles: ParticleConfig, corrector):
    """PoEKSampler's sampler with particles; its ``corrector`` input becomes their move step."""
    if corrector is not None and corrector.method != "none":
        with node_input(node, "corrector"):
            if particles.corrector is not None:
                raise ValueError("the particles have their own corrector (PoEParticles' input); connect one corrector")
            sampler = with_corrector(sampler, corrector)
    with node_input(node, "sampler_name"):
        return comfy_particles.with_particles(sampler, particles)


def report_lines(sampler) -> str:
    """What the particles or groups did, for the rule text ('' for other samplers)."""
    if isinstance(sampler, comfy_particles.ParticleKSampler):
        return "\nparticles did: " + sampler.summary()
    report = getattr(sampler, "last_report", None)
    if isinstance(report, superposition.CompositionReport) and report.groups:
        return "\ngroups did: " + report.summary()
    return ""




def particle_chain(node: str, experts, particles: ParticleConfig) -> list:
    """PoEKSampler's chain for particles: refused where the weights have no target, and each image's
    conditions repeated for its K particles."""
    with node_input(node, "particles"):
        from ..samplers import particles as core_particles

        core_particles.check_bindings(list(experts or []))
    return comfy_particles.repeat_conditions(list(experts or []), particles.particles)


def particle_latent(node: str, latent, noise_mask, particles: ParticleConfig):
    """Each image's latent repeated for its K particles (consecutive rows: one group)."""
    if noise_mask is not None:
        raise ValueError(f"{node}: input 'particles' cannot be used with a noise mask (known regions); disconnect "
                         "SetLatentNoiseMask or the particles")
    return latent.repeat_interleave(particles.particles, 0)


def describe_chain(bindings) -> str:
    """The chain's OR / AND groups for the rule text ('' without groups)."""
    text = superposition.describe_groups(bindings)
    return f"\n{text}" if text else ""
