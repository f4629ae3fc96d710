"""Where the embedded model's adherence is lost: split by caption kind, and whether the UNet binds
each shape to its place at all.

* ``by_kind``: adherence (``checker.adherence``'s measure: the share of stated attributes the
  checker finds) of one-shape and two-shape captions apart, and how many two-shape images have
  both shapes right, both swapped (each where the other should be), or something else.
* ``swap_sensitivity``: the UNet's x0 error on dataset latents noised to step t, conditioned on
  the true caption and on the caption with the two shapes' places swapped (same words, other
  binding). A UNet that uses the binding predicts the true layout better where the noise hides
  it: ratio > 1. A ratio of 1.000 at every t means it reads the caption as a bag of colours,
  kinds and places.

Run both with ``python scripts/adherence.py``.
"""
from __future__ import annotations

import torch

from .. import embedded
from ..training import shapes
from ..training.embedded import images_tensor, latent_means
from . import checker


def swapped(items) -> tuple:
    """The two shapes of a two-shape caption, each in the other's place."""
    a, b = items
    return (shapes.Item(b.shape, b.color, a.region), shapes.Item(a.shape, a.color, b.region))


def by_kind(net, images, items_per_image) -> dict:
    """{"all", "one", "two": adherence (None where no such caption), "correct", "swapped",
    "other": counts of two-shape images}."""
    found = checker.read(net, images)
    hits = {"one": [0, 0], "two": [0, 0]}
    out = {"correct": 0, "swapped": 0, "other": 0}
    for seen, items in zip(found, items_per_image):
        kind = "one" if len(items) == 1 else "two"
        got = [seen.get(i.region, (None, None)) for i in items]
        h = sum((c == i.color) + (k == i.shape) for (c, k), i in zip(got, items))
        hits[kind][0] += h
        hits[kind][1] += 2 * len(items)
        if kind == "two":
            if h == 4:
                out["correct"] += 1
            elif all(seen.get(i.region) == (i.color, i.shape) for i in swapped(items)):
                out["swapped"] += 1
            else:
                out["other"] += 1
    for kind, (h, n) in hits.items():
        out[kind] = h / n if n else None
    total = sum(n for _, n in hits.values())
    out["all"] = sum(h for h, _ in hits.values()) / total if total else None
    return out


@torch.no_grad()
def swap_sensitivity(base_model, text_encoder, token_ids, latents, scenes, steps=(100, 300, 500, 700, 900, 990),
                     seed: int = 0) -> dict[int, tuple[float, float]]:
    """{t: (x0 MSE with the true captions, with the swapped ones)} for two-shape ``scenes``.
    ``latents``: their VAE latent means (``training.embedded.latent_means``); ``token_ids(captions)``
    gives [N, 77] ids; ``text_encoder(ids)[0]`` the UNet's context (the host's CLIP transformer)."""
    if any(len(s.items) != 2 for s in scenes):
        raise ValueError("swap_sensitivity takes two-shape scenes only")
    unet = base_model.diffusion_model
    x0 = base_model.process_latent_in(latents.float())
    true = text_encoder(token_ids([s.caption for s in scenes]))[0].float()
    swap = text_encoder(token_ids([shapes.caption_of(swapped(s.items)) for s in scenes]))[0].float()
    sigmas = base_model.model_sampling.sigmas.float()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    out = {}
    for t in steps:
        alpha_bar = 1 / (1 + sigmas[t] ** 2)
        a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        x_t = a * x0 + s * noise
        tt = torch.full((len(scenes),), float(t))
        err = [(((x_t - s * unet(x_t, timesteps=tt, context=c).float()) / a - x0) ** 2).mean().item()
               for c in (true, swap)]
        out[t] = (err[0], err[1])
    return out


def loaded_swap_sensitivity(model, clip, vae, scenes, **kw) -> dict[int, tuple[float, float]]:
    """``swap_sensitivity`` of a loaded embedded model (``embedded.load()``'s ModelPatcher, CLIP
    and VAE): encodes the scenes' images with the VAE and reads the captions through the CLIP's
    text transformer, which is made float32 in place (the host builds it in fp16 on a CPU), so
    pass a copy of your own."""
    latents = latent_means(vae.first_stage_model.float(), images_tensor(scenes))
    with torch.inference_mode():
        return swap_sensitivity(model.model, embedded.text_transformer(clip).float(),
                                lambda captions: embedded.token_ids(clip, captions), latents, scenes, **kw)
