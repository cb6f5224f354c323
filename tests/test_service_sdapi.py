"""AUTOMATIC1111's API (/sdapi/v1) on the real server, through A1111's own Python client
(`webuiapi`, unchanged) and raw HTTP: the same images as /generate for the same seed and
settings, A1111's response and infotext layout, and a 400 naming the field for what these
models cannot do."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import webuiapi
from PIL import Image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def api(server) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(baseurl=f"{server.url}/sdapi/v1")


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _generate(client, **body) -> list[np.ndarray]:
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return [_pixels(Image.open(io.BytesIO(base64.b64decode(im["b64_json"])))) for im in r.json()["images"]]


def test_models_and_options_as_a1111_lists_them(api, client):
    names = api.util_get_model_names()
    served = {m["name"]: m["id"] for m in client.get("/models").json()["data"]}
    assert names == sorted([served["gan"], served["ar_image"]])  # image models only, by full tag
    assert api.util_get_current_model() == served["gan"]  # the default image model
    assert client.get("/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "ar_image"})
    assert r.status_code == 400 and "override_settings" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "sd_model_checkpoint"


def test_options_posted_back_unchanged_are_accepted_and_any_change_is_refused(client):
    """A client that GETs the options, sets the model and POSTs them back works when the model
    is the default (A1111 answers null); another model, or another setting, is a 400 naming it."""
    options = client.get("/sdapi/v1/options").json()
    tag = options["sd_model_checkpoint"]
    version = tag.split(":")[1]
    for same in (options, {"sd_model_checkpoint": "gan"}, {"sd_model_checkpoint": version}, {}):
        r = client.post("/sdapi/v1/options", json=same)
        assert r.status_code == 200 and r.json() is None, (same, r.text)
    for changed, param in [({"sd_model_checkpoint": None}, "sd_model_checkpoint"),
                           ({**options, "samples_format": "png"}, "samples_format")]:
        r = client.post("/sdapi/v1/options", json=changed)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (changed, r.text)


def test_progress_says_idle_as_a1111_does_and_webuiapi_stops_waiting(api, client):
    r = client.get("/sdapi/v1/progress", params={"skip_current_image": "true"})
    assert r.status_code == 200
    body = r.json()
    assert body["progress"] == 0 and body["eta_relative"] == 0 and body["current_image"] is None
    assert body["state"]["job_count"] == 0 and body["state"]["job"] == "" and body["state"]["interrupted"] is False
    assert api.util_wait_for_ready(check_interval=0.1) is None  # returned: nothing queued or running


def test_txt2img_with_the_a1111_client_matches_generate(api, client):
    # webuiapi sends every A1111 field (steps, sampler, hires-fix settings at off, ...).
    r = api.txt2img(prompt="a red circle", seed=7, width=32, height=32, batch_size=2, n_iter=2, steps=30)
    assert len(r.images) == 4 and all(im.size == (32, 32) for im in r.images)
    assert r.info["all_seeds"] == [7, 8, 9, 10] and r.info["seed"] == 7
    assert r.info["sd_model_name"] == "gan" and r.info["steps"] is None and r.info["cfg_scale"] is None
    assert r.info["all_subseeds"] == [7, 8, 9, 10] and r.info["clip_skip"] == 1  # A1111's keys, all there
    assert r.info["extra_generation_params"] == {} and r.info["restore_faces"] is False
    assert r.parameters["prompt"] == "a red circle" and r.parameters["steps"] == 30
    expected = _generate(client, prompt="a red circle", seed=7, n=4)
    assert all(np.array_equal(_pixels(a), b) for a, b in zip(r.images, expected))
    # Each PNG carries A1111's infotext, the text its PNG Info tab parses.
    text = r.images[1].info["parameters"]
    assert text.startswith("a red circle\n") and "Seed: 8, Size: 32x32" in text and "Model: gan" in text
    assert text == r.info["infotexts"][1]


def test_ar_model_cfg_scale_and_negative_prompt(api, client):
    common = dict(prompt="a red circle", seed=3, width=32, height=32)
    r = api.txt2img(**common, cfg_scale=2.0, negative_prompt="blue, large",
                    override_settings={"sd_model_checkpoint": "ar_image"})
    assert r.info["cfg_scale"] == 2.0 and r.info["sd_model_name"] == "ar_image"
    lines = r.images[0].info["parameters"].split("\n")
    assert lines[1] == "Negative prompt: blue, large" and lines[2].startswith("CFG scale: 2, Seed: 3")
    same = _generate(client, model="ar_image", prompt="a red circle", seed=3, guidance_scale=2.0,
                     negative_prompt="blue, large")
    assert np.array_equal(_pixels(r.image), same[0])
    # The negative prompt is the unconditional branch: it changes the image under guidance...
    plain = _generate(client, model="ar_image", prompt="a red circle", seed=3, guidance_scale=2.0)
    assert not np.array_equal(plain[0], same[0])
    # ...and nothing without it (scale 1 is the conditional logits alone).
    unguided = [_generate(client, model="ar_image", prompt="a red circle", seed=3, guidance_scale=1.0,
                          negative_prompt=neg)[0] for neg in ("", "blue, large")]
    assert np.array_equal(*unguided)
    # No cfg_scale: the model's own guidance, reported as the value used.
    default = client.get("/models").json()["data"]
    scale = next(m for m in default if m["name"] == "ar_image")["guidance_scale"]
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "seed": 3, "send_images": False,
                                                "override_settings": {"sd_model_checkpoint": "ar_image"}})
    assert r.status_code == 200 and r.json()["images"] == []
    assert json.loads(r.json()["info"])["cfg_scale"] == scale
    # parameters: the request with the defaults it ran with
    assert {k: r.json()["parameters"][k] for k in ("width", "height", "cfg_scale")} == \
        {"width": 32, "height": 32, "cfg_scale": scale}


def test_a_model_named_by_its_hash(api, client):
    """sd-models' hash (the store version) is what infotexts name, and picks the model too."""
    listed = {m["model_name"]: m for m in api.get_sd_models()}
    r = api.txt2img(prompt="a blue square", seed=1, width=32, height=32, cfg_scale=3.0,
                    override_settings={"sd_model_checkpoint": listed["ar_image"]["hash"]})
    assert r.info["sd_model_name"] == "ar_image" and r.info["sd_model_hash"] == listed["ar_image"]["hash"]
    assert f"Model hash: {listed['ar_image']['hash']}, Model: ar_image" in r.info["infotexts"][0]


@pytest.mark.parametrize("body, param", [
    ({"width": 512, "height": 512}, "width"),  # A1111's default size: the model makes 32x32
    ({"height": 64}, "height"),
    ({"negative_prompt": "blue"}, "negative_prompt"),  # the GAN has no guidance
    ({"styles": ["cinematic"]}, "styles"),
    ({"enable_hr": True}, "enable_hr"),
    ({"restore_faces": True}, "restore_faces"),
    ({"subseed_strength": 0.5}, "subseed_strength"),
    ({"save_images": True}, "save_images"),
    ({"alwayson_scripts": {"ADetailer": {"args": [True]}}}, "alwayson_scripts"),
    ({"stepz": 20}, "stepz"),  # not an A1111 field: a typo is refused, as everywhere here
    ({"batch_size": 8, "n_iter": 3}, "batch_size"),
    ({"override_settings": {"CLIP_stop_at_last_layers": 2}}, "override_settings"),
    ({"override_settings": {"sd_model_checkpoint": "gpt"}}, "override_settings"),  # a text model
    ({"cfg_scale": 31}, "cfg_scale"),  # past A1111's own slider
    ({"cfg_scale": 25, "override_settings": {"sd_model_checkpoint": "ar_image"}}, "cfg_scale"),  # past the AR's 20
    ({"seed": -2}, "seed"),
    ({"steps": "abc"}, "steps"),  # no effect, but typed as in A1111 (a 422 there)
    ({"steps": 20.5}, "steps"),
    ({"sampler_name": 5}, "sampler_name"),
    ({"do_not_save_grid": "yes"}, "do_not_save_grid"),
])
def test_what_these_models_cannot_do_is_a_400_naming_it(client, body, param):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_a1111_values_its_own_ui_sends_are_taken(client):
    """A1111's CFG slider goes to 30 (the GAN ignores cfg_scale; 20 was the cap), and a field
    without effect takes its A1111 type (null too)."""
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "cfg_scale": 30, "steps": 150,
                                                "sampler_name": "DPM++ 2M", "eta": None, "send_images": False})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("raw, param", [(b'{"prompt": "x", "steps": NaN}', "steps"),
                                        (b'{"prompt": "x", "comments": {"a": [Infinity]}}', "comments")])
def test_nan_in_a_field_without_effect_is_a_400(client, raw, param):
    """Python's JSON parser takes NaN; the typed fields refuse it, and so do the free-form ones
    (the answer echoes them, and JSON has no NaN)."""
    r = client.post("/sdapi/v1/txt2img", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_img2img_is_a_404_that_says_why(client):
    r = client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": []})
    assert r.status_code == 404 and "txt2img" in r.json()["error"]["message"]
    for route in ("/v1/images/edits", "/v1/images/variations"):  # OpenAI's, likewise (a bare "no route" before)
        r = client.post(route, files={"image": ("a.png", b"png")})
        assert r.status_code == 404 and "/v1/images/generations" in r.json()["error"]["message"], r.text
    for route in ("/sdapi/v1/interrupt", "/sdapi/v1/skip"):  # webuiapi's interrupt() and skip()
        r = client.post(route)
        assert r.status_code == 404 and "closes the connection" in r.json()["error"]["message"], r.text


def test_unknown_model_is_a_404(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a", "override_settings": {"sd_model_checkpoint": "sdxl"}})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
