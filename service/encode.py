"""Turning engine output into bytes: PNG files that remember how they were made, and SSE.

A PNG carries its generation parameters as JSON in a tEXt chunk named `parameters`
(the key image tools already look for), so a saved file is enough to reproduce it; images
made through AUTOMATIC1111's route carry its text layout there instead, which its tools read.
Server-Sent Events: one `data: <json>` line plus a blank line per event, `data: [DONE]` last.
"""
from __future__ import annotations

import base64
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

PNG_PARAMETERS_KEY = "parameters"


def encode_png(image: np.ndarray, parameters: dict[str, Any] | str) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes with `parameters` in a tEXt chunk: a dict as JSON, a
    string (AUTOMATIC1111's text layout) as it is."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got {image.dtype} {image.shape}")
    info = PngInfo()
    text = parameters if isinstance(parameters, str) else json.dumps(parameters, sort_keys=True)
    info.add_text(PNG_PARAMETERS_KEY, text)
    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def png_parameters(png: bytes) -> dict[str, Any]:
    """Read back what `encode_png` stored (used by tests and by anyone reproducing an image)."""
    with Image.open(io.BytesIO(png)) as im:
        return json.loads(im.text[PNG_PARAMETERS_KEY])


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def sse_event(payload: dict[str, Any] | str) -> bytes:
    """One event. JSON never contains a raw newline, so a single `data:` line is enough."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


SSE_DONE = sse_event("[DONE]")


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's usage object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def openai_finish_reason(reason: str | None) -> str | None:
    """OpenAI knows "stop" and "length": reaching end-of-text ("eos" here) is a natural stop there."""
    return "stop" if reason == "eos" else reason


class SSEResponse(StreamingResponse):
    """text/event-stream that always closes its generator, so a disconnect releases the work.

    Starlette stops iterating when the client goes away; closing the generator here runs
    its `finally` at once (rather than whenever it is garbage-collected), which is where
    the service tells the engine to stop.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], headers: dict[str, str] | None = None):
        # no-cache and X-Accel-Buffering keep proxies (nginx) from holding events back.
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                           **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
