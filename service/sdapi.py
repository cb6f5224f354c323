"""AUTOMATIC1111's web UI API on the image models: what its scripts, bots and its `webuiapi`
client call (POST /sdapi/v1/txt2img, GET /sdapi/v1/sd-models, GET /sdapi/v1/options,
GET /sdapi/v1/progress).

txt2img answers as A1111 does: `images` (base64 PNGs), `parameters` (the request) and `info`
(a JSON string: prompts, seeds, the infotext of each image). Each PNG carries its infotext,
A1111's text layout, in its `parameters` chunk, where A1111's PNG Info tab and image sites
read it. The request's fields: `service.schemas.Txt2ImgBody`.
"""
from __future__ import annotations

import json
import time
from typing import Any

from models.image_engine import ImageRequest

VERSION = "condgen"  # A1111 writes its own version here; tools show it as the generator


def split_tag(tag: str) -> tuple[str, str]:
    """A store tag's name and version (A1111's model name and hash)."""
    name, version = tag.split(":", 1)
    return name, version


def _quote(value: Any) -> str:
    """A1111's quoting of an infotext value: JSON when it holds a separator."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:\n"') else text


def infotext(req: ImageRequest, i: int, tag: str, size: int) -> str:
    """Image i's A1111 infotext: the prompt, the negative prompt, then `Key: value, ...`.
    A request's `guidance_scale` is set (to the value used) only for a model that guides. A NUL
    of the prompts is U+FFFD here: the PNG text chunk that carries it may hold none."""
    name, version = split_tag(tag)
    lines = [req.prompt] + ([f"Negative prompt: {req.negative_prompt}"] if req.negative_prompt else [])
    fields = {"CFG scale": f"{req.guidance_scale:g}" if req.guidance_scale is not None else None,
              "Seed": req.seed + i, "Size": f"{size}x{size}", "Model hash": version, "Model": name,
              "Version": VERSION}
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields.items() if value is not None))
    return "\n".join(lines).replace("\0", "\ufffd")


def info(req: ImageRequest, tag: str, size: int, batch_size: int) -> dict[str, Any]:
    """txt2img's `info` (sent as a JSON string, as A1111 does), with every key A1111's has, so
    that a client indexing one finds it. Steps and sampler are null: these models have none; the
    subseeds are the seeds (A1111 picks them, and with subseed_strength 0 they change nothing)."""
    name, version = split_tag(tag)
    seeds = [req.seed + i for i in range(req.n)]
    return {
        "prompt": req.prompt, "all_prompts": [req.prompt] * req.n,
        "negative_prompt": req.negative_prompt, "all_negative_prompts": [req.negative_prompt] * req.n,
        "seed": req.seed, "all_seeds": seeds, "subseed": req.seed, "all_subseeds": seeds, "subseed_strength": 0,
        "width": size, "height": size, "cfg_scale": req.guidance_scale, "steps": None, "sampler_name": None,
        "batch_size": batch_size, "restore_faces": False, "face_restoration_model": None, "styles": [],
        "sd_model_name": name, "sd_model_hash": version, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": None, "clip_skip": 1,
        "extra_generation_params": {}, "is_using_inpainting_conditioning": False,
        "index_of_first_image": 0, "infotexts": [infotext(req, i, tag, size) for i in range(req.n)],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "version": VERSION,
    }


def sd_model(tag: str) -> dict[str, Any]:
    """An image model as /sdapi/v1/sd-models lists it; its `title` (the full tag), `model_name`
    or `hash` (the store version, as infotexts name it) goes into
    override_settings.sd_model_checkpoint."""
    name, version = split_tag(tag)
    return {"title": tag, "model_name": name, "hash": version, "sha256": None,
            "filename": f"{name}/{version}", "config": None}


def progress(images: int) -> dict[str, Any]:
    """/sdapi/v1/progress in A1111's layout, for `images` queued or running. These models
    draw in one pass (or one decode loop) with no sampling steps to count, so a busy server
    says only that it has begun: 0.01, A1111's own figure for a job with no step done yet."""
    state = {"skipped": False, "interrupted": False, "stopping_generation": False,
             "job": "txt2img" if images else "", "job_count": images, "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
             "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    return {"progress": 0.01 if images else 0.0, "eta_relative": 0.0, "state": state, "current_image": None,
            "textinfo": None}


def checkpoint_tag(requested: str, tags: list[str]) -> str:
    """The tag that an sd_model_checkpoint naming a model by its hash (version) means; any
    other name as it is."""
    return next((tag for tag in tags if split_tag(tag)[1] == requested), requested)
