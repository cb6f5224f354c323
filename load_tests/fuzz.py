"""Fuzz the running service against its own OpenAPI document with schemathesis.

    python -m load_tests.fuzz --host http://127.0.0.1:3000 --cases 2000

Fetches <host>/openapi.json, then, for every operation, lets schemathesis generate valid
and invalid requests (hypothesis strategies from the schema: positive and negative modes).
A case fails when the service answers 5xx, or a 4xx whose body is not the JSON error
shape `{"error": {"message": ..., "type": ...}}` (or, for text-generation-inference's
requests, TGI's `{"error": ..., "error_type": ...}`). Prints a summary and exits non-zero on
any failure (each failing case is printed with a curl-like reproduction). Starts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode


@dataclass
class Outcome:
    cases: int = 0
    statuses: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)


TGI_ROUTES = ("/generate_stream", "/", "/info")  # and /generate, /tokenize with TGI's body (`inputs`)


def is_tgi_request(path: str, body: object) -> bool:
    """Whether the service answers this request as text-generation-inference (its error shape)."""
    return path in TGI_ROUTES or (path in ("/generate", "/tokenize") and isinstance(body, dict)
                                  and "inputs" in body and "prompt" not in body)


def check_response(status: int, content_type: str, content: bytes, tgi: bool = False) -> str | None:
    """Why a response is wrong, or None. `tgi`: a TGI request, whose errors come in TGI's shape
    (but a missing API key's 401 and a 429 answered before the body is read, in the service's)."""
    if status >= 500:
        return f"server error {status}"
    if 400 <= status < 500:
        if not content_type.startswith("application/json"):
            return f"{status} with content-type {content_type!r}"
        try:
            body = json.loads(content)
        except ValueError as e:
            return f"{status} body is not JSON ({e}): {content[:200]!r}"
        if tgi and _tgi_error(body):
            return None
        if tgi and status not in (401, 429):
            return f"{status} body is not TGI's error shape: {content[:200]!r}"
        if not _service_error(body):
            return f"{status} body is not the JSON error shape: {content[:200]!r}"
    return None


def _service_error(body: object) -> bool:
    """`{"error": {"message": str, "type": str, ...}}`"""
    err = body.get("error") if isinstance(body, dict) else None
    return isinstance(err, dict) and isinstance(err.get("message"), str) and isinstance(err.get("type"), str)


def _tgi_error(body: object) -> bool:
    """`{"error": str, "error_type": str, ...}`"""
    return isinstance(body, dict) and isinstance(body.get("error"), str) and isinstance(body.get("error_type"), str)


def fuzz(host: str, cases: int, headers: dict[str, str] | None = None, seed: int | None = None,
         timeout_s: float = 120.0) -> Outcome:
    """About `cases` requests in all, spread over the operations, half valid, half invalid."""
    host = host.rstrip("/")
    session = requests.Session()
    session.headers.update(headers or {})
    raw = session.get(f"{host}/openapi.json", timeout=30)
    raw.raise_for_status()
    schema = schemathesis.openapi.from_dict(raw.json())
    operations = [r.ok() for r in schema.get_all_operations()]
    # A GET without parameters has one possible request: a few each; the rest for the bodies.
    posts = [op for op in operations if op.method.lower() == "post"]
    per_op = max(1, -(-(cases - 5 * (len(operations) - len(posts))) // (2 * max(1, len(posts)))))
    out = Outcome()
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            drawn = []

            @settings(max_examples=per_op if op in posts else 5, deadline=None, database=None, derandomize=seed is not None,
                      suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate],
                      verbosity=Verbosity.quiet)  # no "@seed(...)" lines for the Unsatisfiable caught below
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case) -> None:
                drawn.append(1)
                out.cases += 1
                try:
                    resp = case.call(base_url=host, session=session, timeout=timeout_s)
                except requests.RequestException as e:
                    out.failures.append(f"{op.method.upper()} {op.path} [{mode.value}]: no answer ({e}) "
                                        f"body={_show(case)}")
                    return
                out.statuses[resp.status_code] += 1
                ctype = resp.headers.get("content-type") or [""]  # schemathesis: name -> list of values
                why = check_response(resp.status_code, ctype if isinstance(ctype, str) else ctype[0],
                                     resp.content, is_tgi_request(op.path, case.body))
                if why is not None:
                    out.failures.append(f"{op.method.upper()} {op.path} [{mode.value}]: {why}; body={_show(case)}")

            try:
                run()
            except Unsatisfiable:  # nothing to make invalid (a GET without parameters)
                pass
    return out


def _show(case) -> str:
    try:
        return json.dumps(case.body)[:300]
    except (TypeError, ValueError):
        return repr(case.body)[:300]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", required=True, help="base URL of a running service")
    ap.add_argument("--cases", type=int, default=2000,
                    help="about this many requests in all, spread over the operations (fewer where a body has "
                         "fewer distinct cases)")
    ap.add_argument("--api-key", default=os.environ.get("CONDGEN_API_KEY", "").strip() or None,
                    help="sent as 'Authorization: Bearer <key>' (default: CONDGEN_API_KEY, as the load test reads it)")
    ap.add_argument("--seed", type=int, default=None, help="derandomize hypothesis (reproducible runs)")
    args = ap.parse_args(argv)
    if args.cases < 1:
        ap.error(f"--cases must be at least 1, got {args.cases}")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        out = fuzz(args.host, args.cases, headers, args.seed)
    except requests.RequestException as e:  # no server there, or no API description
        print(f"cannot read {args.host.rstrip('/')}/openapi.json: {e}", file=sys.stderr)
        return 2
    print(f"{out.cases} cases; statuses: {dict(sorted(out.statuses.items()))}")
    for f in out.failures[:50]:
        print(f"FAIL: {f}", file=sys.stderr)
    print(f"{len(out.failures)} failures")
    if 401 in out.statuses and set(out.statuses) <= {401, 429}:  # all stopped at the key check (or the limit)
        print("FAIL: every answer was a 401: give the server's key (--api-key or CONDGEN_API_KEY)", file=sys.stderr)
        return 1
    return 1 if out.failures or out.cases == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
