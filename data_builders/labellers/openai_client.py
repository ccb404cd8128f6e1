"""``OpenAILabeller``: a cached, bounded-concurrency, retrying chat-completions client.

Both data builders word their ground truth through any OpenAI-compatible endpoint with this one
class; each brings its own prompts and its own acceptance check. It uses the official ``openai``
client (its own retries switched off, so backoff is ours and visible in tests) and adds:

* an on-disk cache keyed by a SHA-256 of the whole request (model, messages, parameters), written
  atomically, so re-runs and resumed runs cost nothing;
* retry with exponential backoff and jitter on 429, 5xx, timeouts, connection errors and malformed
  replies, honouring ``Retry-After`` when the server sends one;
* bounded concurrency through a thread pool (``map``).

Errors that retrying cannot fix (401, 400, 404) raise ``LabellerError`` at once with what to do.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

log = logging.getLogger(__name__)


class LabellerError(RuntimeError):
    """A request that failed for good (after retries, or on an error retrying cannot fix)."""


@dataclass
class LabellerStats:
    """Counters for the dataset card and the progress bar."""

    requests: int = 0
    cache_hits: int = 0
    retries: int = 0
    failures: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(requests=self.requests, cache_hits=self.cache_hits, retries=self.retries,
                    failures=self.failures)


def image_part(img: np.ndarray | bytes) -> dict[str, Any]:
    """A chat-completions ``image_url`` part holding ``img`` (uint8 RGB array or PNG bytes) as a data URL."""
    from ..sources import encode_png
    png = img if isinstance(img, bytes) else encode_png(img, compression=3)
    b64 = base64.b64encode(png).decode("ascii")
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}}


class OpenAILabeller:
    """Sends chat-completions requests to ``base_url`` for ``model``; see the module docstring.

    ``api_key`` defaults to the environment variable ``api_key_env``; a local server that needs
    no key gets a placeholder. ``cache_dir=None`` disables the cache.
    """

    def __init__(self, base_url: str | None, model: str, *, api_key: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", cache_dir: str | os.PathLike | None = None,
                 max_workers: int = 4, max_retries: int = 5, timeout: float = 60.0, backoff: float = 1.0,
                 max_backoff: float = 30.0, temperature: float = 0.7, max_tokens: int = 600,
                 seed: int = 0):
        import openai  # imported here so the template path never needs it

        key = api_key or os.environ.get(api_key_env)
        if not key:
            if base_url and ("127.0.0.1" in base_url or "localhost" in base_url):
                key = "local"
            else:
                raise LabellerError(f"no API key: set the environment variable {api_key_env} (or pass api_key)")
        self.model = model
        self.base_url = base_url
        self.max_workers = max(1, int(max_workers))
        self.max_retries = max(0, int(max_retries))
        self.backoff, self.max_backoff = backoff, max_backoff
        self.temperature, self.max_tokens = temperature, max_tokens
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.stats = LabellerStats()
        self._stats_lock = threading.Lock()
        self._rng = random.Random(seed)
        self._openai = openai
        self.client = openai.OpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=0)

    # ---- cache -----------------------------------------------------------------------------------
    def request_body(self, messages: Sequence[dict[str, Any]], **params: Any) -> dict[str, Any]:
        """The request exactly as sent (and hashed for the cache)."""
        body = {"model": self.model, "messages": list(messages), "temperature": self.temperature,
                "max_tokens": self.max_tokens}
        body.update(params)
        return body

    @staticmethod
    def cache_key(body: dict[str, Any], variant: int = 0) -> str:
        blob = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(f"{variant}\n{blob}".encode("utf-8")).hexdigest()

    def _cache_path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / key[:2] / f"{key}.json"

    def _cache_get(self, key: str) -> str | None:
        path = self._cache_path(key)
        if path is None or not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))["text"]
        except (json.JSONDecodeError, KeyError, OSError):
            log.warning("%s: unreadable cache entry, asking again", path)
            return None

    def _cache_put(self, key: str, text: str) -> None:
        path = self._cache_path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps({"model": self.model, "text": text}, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)

    def _count(self, **inc: int) -> None:
        with self._stats_lock:
            for k, v in inc.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)

    # ---- requests --------------------------------------------------------------------------------
    def _delay(self, attempt: int, exc: Exception | None) -> float:
        retry_after = None
        response = getattr(exc, "response", None)
        if response is not None:
            try:
                retry_after = float(response.headers.get("retry-after"))
            except (TypeError, ValueError):
                retry_after = None
        base = min(self.max_backoff, self.backoff * (2 ** attempt))
        with self._stats_lock:
            jitter = self._rng.uniform(0.5, 1.0)
        return min(self.max_backoff, retry_after) if retry_after is not None else base * jitter

    def complete(self, messages: Sequence[dict[str, Any]], *, variant: int = 0, **params: Any) -> str:
        """The reply text for one request, from the cache or the endpoint (with retries).

        ``variant`` changes only the cache key, to ask again for a reply that was rejected.
        """
        openai = self._openai
        body = self.request_body(messages, **params)
        key = self.cache_key(body, variant)
        cached = self._cache_get(key)
        if cached is not None:
            self._count(cache_hits=1)
            return cached
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count(retries=1)
                time.sleep(self._delay(attempt - 1, last))
            self._count(requests=1)
            try:
                resp = self.client.chat.completions.create(**body)
                text = resp.choices[0].message.content if resp.choices else None
                if not isinstance(text, str) or not text.strip():
                    raise ValueError("the reply has no message content")
            except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
                self._count(failures=1)
                raise LabellerError(f"{self.base_url}: the endpoint refused the API key ({exc.status_code}); "
                                    f"check OPENAI_API_KEY") from exc
            except (openai.BadRequestError, openai.NotFoundError, openai.UnprocessableEntityError) as exc:
                self._count(failures=1)
                raise LabellerError(f"{self.base_url}: request rejected ({exc.status_code}): {exc.message}; "
                                    f"check --model {self.model!r} and that the endpoint accepts images") from exc
            except (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError,
                    openai.APIConnectionError, openai.APIResponseValidationError, openai.APIStatusError,
                    json.JSONDecodeError, ValueError, AttributeError, TypeError, IndexError) as exc:
                last = exc
                log.debug("attempt %d failed: %s", attempt + 1, exc)
                continue
            self._cache_put(key, text)
            return text
        self._count(failures=1)
        raise LabellerError(f"{self.base_url}: no usable reply after {self.max_retries + 1} attempts; "
                            f"last error: {type(last).__name__}: {last}")

    def map(self, jobs: Iterable[Any], fn: Callable[[Any], Any]) -> list[Any]:
        """Run ``fn(job)`` for each job on at most ``max_workers`` threads; results in order.

        An exception raised by ``fn`` is returned in its slot (not raised), so one bad item does
        not stop a batch.
        """
        def safe(job: Any) -> Any:
            try:
                return fn(job)
            except Exception as exc:  # noqa: BLE001 - a batch keeps going; the caller counts errors
                return exc

        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            return list(pool.map(safe, jobs))
