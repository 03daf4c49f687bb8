"""The optional LLM judge: any OpenAI-compatible chat endpoint extracts final answers and judges them.

Off by default (``eval.judge.enabled`` in the parameters, or ``vift eval --judge``). Configured by
environment, so that no secret lands in a parameters file, a DVC lock or an MLflow run:

- ``VIFT_JUDGE_BASE_URL`` (required when the judge is on): the API root, e.g.
  ``https://api.openai.com/v1`` or ``http://localhost:8000/v1`` (vLLM, llama.cpp, Ollama...); the
  judge posts to ``{base}/chat/completions``.
- ``VIFT_JUDGE_API_KEY`` (optional): sent as ``Authorization: Bearer ...``; never logged or printed.
- ``VIFT_JUDGE_MODEL`` (optional): the model name; default ``eval.judge.model`` of the parameters.
- ``VIFT_JUDGE_TIMEOUT`` (seconds per request, default 60), ``VIFT_JUDGE_RETRIES`` (default 4),
  ``VIFT_JUDGE_WORKERS`` (parallel requests, default 4).

As in the reference protocol, the judge first extracts the final answer from the model's response
(``extract``); MathVista then scores that by exact match, MathVerse and MathVision ask the judge
whether it agrees with the gold answer (``agrees``). Requests are greedy (temperature 0). Timeouts,
connection failures, HTTP 429 and 5xx are retried with exponential backoff; an endpoint that stays
unreachable, or answers 4xx, ends in a :class:`~vift.errors.UserError` naming the URL and the
variable to check.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field

from vift.errors import UserError

log = logging.getLogger(__name__)

ENV_BASE_URL = "VIFT_JUDGE_BASE_URL"
ENV_API_KEY = "VIFT_JUDGE_API_KEY"
ENV_MODEL = "VIFT_JUDGE_MODEL"
ENV_TIMEOUT = "VIFT_JUDGE_TIMEOUT"
ENV_RETRIES = "VIFT_JUDGE_RETRIES"
ENV_WORKERS = "VIFT_JUDGE_WORKERS"

NO_ANSWER = "null"

EXTRACT_PROMPT = """You read a model's response to a math question and pull out its final answer.
Reply with the final answer only, nothing else: the option letter for a multiple-choice question, \
otherwise the final value, list or expression as the response states it. If the response gives no \
final answer, reply null.

Question: How many apples are on the table?
Model response: I count three red apples and two green ones, so there are 5 apples.
Extracted answer: 5

Question: Which angle is the largest?
Choices:
(A) 30°
(B) 60°
(C) 90°
Model response: Angle C is marked as a right angle, so the answer is (C) 90°.
Extracted answer: C

Question: What is the slope of the line? Give two decimal places.
Model response: It rises 1 unit over a run of 3 units, which gives a slope of about 0.33.
Extracted answer: 0.33

Question: Between which two years does the curve reach its peak?
Model response: The highest point lies between 2007 and 2008.
Extracted answer: [2007, 2008]

Question: How long is segment BC?
Model response: The figure does not give enough information to find BC.
Extracted answer: null

{question}
Model response: {response}
Extracted answer:"""

AGREE_PROMPT = """Decide whether a model's answer to a math question agrees with the reference answer.
They agree only if they give the same final answer: for a multiple-choice question the same option \
(as its letter or as its text); otherwise the same value or expression, where equivalent forms count \
as the same (0.5 and 1/2; 50 cm and 0.5 m). A missing answer (empty or null) never agrees.
Reply with 1 if they agree and 0 if they do not, and nothing else.

Question: {question}
Reference answer: {gold}
Model answer: {extracted}
Judgement:"""


@dataclass(frozen=True)
class JudgeConfig:
    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    timeout: float = 60.0
    retries: int = 4
    backoff: float = 1.0
    max_backoff: float = 30.0
    workers: int = 4

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    @classmethod
    def from_env(cls, default_model: str | None = None, environ: Mapping[str, str] | None = None) -> JudgeConfig:
        env = os.environ if environ is None else environ
        base = env.get(ENV_BASE_URL, "").strip()
        if not base:
            raise UserError(
                f"the LLM judge is enabled but {ENV_BASE_URL} is not set; set it to an OpenAI-compatible API root "
                f"(e.g. http://localhost:8000/v1), or turn the judge off (eval.judge.enabled: false, no --judge)"
            )
        if not re.match(r"^https?://[^/\s]+", base):
            raise UserError(f"{ENV_BASE_URL}={base!r} is not an http(s) URL (expected e.g. https://api.openai.com/v1)")
        model = env.get(ENV_MODEL, "").strip() or (default_model or "")
        if not model:
            raise UserError(f"no judge model: set {ENV_MODEL} or eval.judge.model")

        def number(name: str, default: float, kind=float):
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                value = kind(raw)
            except ValueError:
                raise UserError(f"{name}={raw!r} is not a number") from None
            if value < 0 or (kind is int and name == ENV_WORKERS and value < 1):
                raise UserError(f"{name}={raw!r} is out of range")
            return value

        return cls(
            base_url=base,
            model=model,
            api_key=env.get(ENV_API_KEY) or None,
            timeout=number(ENV_TIMEOUT, 60.0),
            retries=number(ENV_RETRIES, 4, int),
            workers=number(ENV_WORKERS, 4, int),
        )


class Judge:
    """Chat completions against one endpoint; ``extract`` and ``agrees`` are the two uses."""

    def __init__(self, config: JudgeConfig, sleep=time.sleep):
        self.config = config
        self._sleep = sleep

    def _scrub(self, text: str) -> str:
        key = self.config.api_key
        return text.replace(key, "***") if key else text

    def _post(self, payload: dict) -> dict:
        config = self.config
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if config.api_key:
            headers["Authorization"] = f"Bearer {config.api_key}"
        data = json.dumps(payload).encode("utf-8")
        last = ""
        attempts = config.retries + 1
        for attempt in range(attempts):
            delay = min(config.max_backoff, config.backoff * 2**attempt)
            request = urllib.request.Request(config.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=config.timeout) as response:
                    body = response.read().decode("utf-8", errors="replace")
                try:
                    return json.loads(body)
                except json.JSONDecodeError:
                    last = f"the reply is not JSON: {self._scrub(body[:200])!r}"
            except urllib.error.HTTPError as error:
                body = self._scrub(error.read().decode("utf-8", errors="replace")[:300])
                if error.code != 429 and error.code < 500:
                    hint = {
                        401: f"check {ENV_API_KEY}",
                        403: f"check {ENV_API_KEY}",
                        404: f"check {ENV_BASE_URL} (OpenAI-style roots usually end in /v1) and {ENV_MODEL}",
                    }.get(error.code, f"check {ENV_MODEL} and the endpoint's documentation")
                    raise UserError(f"judge endpoint {config.url} answered HTTP {error.code}: {body or error.reason}; {hint}") from None
                last = f"HTTP {error.code}: {body or error.reason}"
                retry_after = error.headers.get("Retry-After") if error.headers else None
                if retry_after and retry_after.strip().isdigit():
                    delay = min(config.max_backoff, max(delay, float(retry_after)))
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as error:
                reason = getattr(error, "reason", error)
                last = self._scrub(f"{type(reason).__name__}: {reason}")
            log.debug("judge request %d/%d to %s failed: %s", attempt + 1, attempts, config.url, last)
            if attempt + 1 < attempts:
                self._sleep(delay)
        raise UserError(
            f"judge endpoint {config.url} unreachable or failing after {attempts} attempt(s) ({last}); "
            f"check {ENV_BASE_URL} and that the server is up, raise {ENV_TIMEOUT}/{ENV_RETRIES}, "
            f"or turn the judge off (no --judge, eval.judge.enabled: false)"
        )

    def complete(self, prompt: str, max_tokens: int = 256) -> str:
        """The assistant message for one user prompt (greedy)."""
        payload = {
            "model": self.config.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": max_tokens,
        }
        reply = self._post(payload)
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise UserError(
                f"judge endpoint {self.config.url} did not return an OpenAI chat completion "
                f"(no choices[0].message.content in {self._scrub(json.dumps(reply)[:200])})"
            ) from None
        return (content or "").strip()

    def extract(self, question: str, response: str) -> str:
        """The final answer stated in ``response`` ("" when it states none)."""
        if not response.strip():
            return ""
        answer = self.complete(EXTRACT_PROMPT.format(question=question.strip(), response=response.strip()))
        answer = re.sub(r"^\s*extracted answer\s*:\s*", "", answer, flags=re.IGNORECASE).strip()
        return "" if answer.strip(" .\"'`").lower() in (NO_ANSWER, "none", "") else answer

    def agrees(self, question: str, gold: str, extracted: str) -> bool | None:
        """Whether ``extracted`` agrees with ``gold``; None if the judge's reply is neither 0 nor 1."""
        if not extracted.strip():
            return False
        prompt = AGREE_PROMPT.format(question=question.strip(), gold=gold.strip(), extracted=extracted.strip())
        for _ in range(2):
            verdict = parse_judgement(self.complete(prompt, max_tokens=8))
            if verdict is not None:
                return verdict
        return None


def parse_judgement(text: str) -> bool | None:
    text = re.sub(r"^\s*judge?ment\s*:\s*", "", text.strip(), flags=re.IGNORECASE)
    if text[:1] in ("0", "1"):
        return text[0] == "1"
    found = re.findall(r"\b([01])\b", text)
    return found[-1] == "1" if found else None
