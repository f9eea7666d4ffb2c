"""Secrets out of what tbr-ray writes or prints: the one redaction function (pure).

    redact("http://ada:s3cret@mlflow.lab:5000")      # -> "http://***@mlflow.lab:5000"
    redact("Error code: 401 - {'error': 'Bearer sk-abc...'}")   # tokens -> ***
    redact_values({"config": {...}, "error": "..."})  # every string inside, same shape

What it hides: the user:password part of any URL (`reflection.endpoint`,
`tracking.mlflow_uri` as http://user:secret@host); the value of a URL query parameter named
like a secret (key, api_key, token, secret, password, signature, ...); the credential after
`Bearer` / `Basic` and after a name like `api_key=` or `"token": `; the shapes of common API
keys (OpenAI `sk-...`, Hugging Face `hf_...`, GitHub `ghp_...`, AWS `AKIA...`) wherever they
appear, e.g. in an API's error body.
Everything else is kept, so an error still says which host refused and why.

Applied where things persist or reach the terminal: run.json and each cell's status.json and
error.txt (`tbr_ray.results`), every one-line error of the command line (`tbr_ray.cli._fail`),
and the endpoint errors of `tbr_ray.reflect`. A value that holds a secret in some other shape
is not recognised: keep secrets in the variables `reflection.api_key_env` names, not in URLs.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
# up to the authority's last "@" (a password may hold one); the authority ends at / ? # or space
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s?#'\"]*@")
_SECRET_PARAM = re.compile(
    r"(?i)([?&;](?:api[_-]?key|apikey|key|token|access[_-]?token|auth|secret|password|passwd|"
    r"pwd|sig|signature|x-amz-signature|x-amz-credential)=)[^&;#\s'\"]+"
)
_CREDENTIAL = r"[A-Za-z0-9._~+/=-]{8,}"
_AUTH_HEADER = re.compile(rf"(?i)\b(bearer|basic)(\s+){_CREDENTIAL}")
_NAMED_SECRET = re.compile(  # api_key=..., "token": "...", password: ...
    rf"(?i)\b((?:api[_-]?key|access[_-]?token|token|secret|password)[\"']?\s*[:=]\s*[\"']?)"
    rf"{_CREDENTIAL}"
)
_KEY_SHAPES = re.compile(
    r"\b(?:sk-[A-Za-z0-9_-]{16,}|hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|"
    r"AKIA[0-9A-Z]{16})"
)


def redact(text: str) -> str:
    """`text` with URL credentials, secret query values, auth headers and API keys masked."""
    text = _URL_USERINFO.sub(rf"\g<1>{MASK}@", text)
    text = _SECRET_PARAM.sub(rf"\g<1>{MASK}", text)
    text = _AUTH_HEADER.sub(rf"\g<1>\g<2>{MASK}", text)
    text = _NAMED_SECRET.sub(rf"\g<1>{MASK}", text)
    return _KEY_SHAPES.sub(MASK, text)


def redact_values(value: Any) -> Any:
    """Every string in a JSON-like value (dicts, lists, tuples) through `redact`; keys kept."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_values(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_values(v) for v in value]
    return value
