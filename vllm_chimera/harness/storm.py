"""A bounded storm of mixed requests against `vllm-chimera serve`, with a plain server as the
reference: nothing plain vLLM serves may be refused or kill the server with Chimera on.

Used by tests/test_serving_load.py (a short storm in CI) and scripts/serving_storm.py (the
full one, results in results/serving/). Loopback only; every loop is bounded in count and
time. The client is this process: a thread pool of `concurrency` workers over urllib.

Each request has a kind; greedy kinds are sent to both servers and their texts must be
identical; sampled kinds must be served (200, text); malformed ones must get a 4xx with a
message; aborted streams are closed after a few events and must not hurt anything else.
"""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

PROMPTS = (
    "Write a short poem about the sea.", "What is the capital of France?",
    "Explain photosynthesis in two sentences.", "List three prime numbers.",
    "Give me a recipe for pancakes.", "def fibonacci(n):", "Translate 'good morning' to Spanish.",
    "Why is the sky blue?", "Summarise the plot of Hamlet.", "1, 2, 3, 4, 5,",
)
CHAT_KINDS = ("chat_greedy",)
# kind -> whether its output must equal the reference server's (greedy, no sampling)
COMPARED = {"greedy": True, "stream": True, "chat_greedy": True, "logprobs": True,
            "prompt_logprobs": True, "echo": True, "stop": True, "stop_token_ids": True,
            "include_stop_str": True, "min_tokens": True, "ignore_eos": True,
            "penalties": True, "logit_bias": True, "bad_words": True, "allowed_token_ids": True,
            "truncate_prompt_tokens": True, "choice": True, "regex": True, "json_schema": True,
            "long_prompt": True, "seeded": True, "sampled_n2": False, "top_k_top_p": False,
            "min_p": False, "abort": False}
# (seeded: Chimera serves seeded sampled requests without drafts, so as plain vLLM does)
MALFORMED = ("bad_json", "no_prompt", "negative_temperature", "negative_max_tokens",
             "unknown_model", "n_zero", "too_long_prompt")


@dataclass
class StormRequest:
    kind: str
    path: str  # "/v1/completions" or "/v1/chat/completions"
    body: dict | bytes
    stream: bool = False
    abort_after: int | None = None  # stream events to read before hanging up

    @property
    def malformed(self) -> bool:
        return self.kind in MALFORMED


@dataclass
class StormResult:
    kind: str
    status: int  # HTTP status; 0: the connection failed
    texts: list[str] = field(default_factory=list)
    message: str = ""  # the error's message (4xx/5xx) or the connection error
    seconds: float = 0.0


def build_requests(model: str, num_requests: int, max_model_len: int, seed: int = 0,
                   chat: bool = True) -> list[StormRequest]:
    """`num_requests` requests cycling through every kind (MALFORMED ones included)."""
    rng = random.Random(seed)
    kinds = [k for k in COMPARED if chat or k not in CHAT_KINDS] + list(MALFORMED)
    requests = []
    for i in range(num_requests):
        kind = kinds[i % len(kinds)]
        prompt = PROMPTS[rng.randrange(len(PROMPTS))]
        requests.append(_request(kind, model, prompt, max_model_len, seed=1000 + i))
    return requests


def _request(kind: str, model: str, prompt: str, max_model_len: int, seed: int) -> StormRequest:
    body = {"model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0.0}
    completions = "/v1/completions"
    extra = {
        "stream": {"stream": True}, "logprobs": {"logprobs": 3}, "stop": {"stop": [".", "\n"]},
        "prompt_logprobs": {"prompt_logprobs": 2}, "echo": {"echo": True},
        "stop_token_ids": {"stop_token_ids": [13, 28, 30]},
        "include_stop_str": {"stop": [" the"], "include_stop_str_in_output": True},
        "min_tokens": {"min_tokens": 20, "max_tokens": 28}, "ignore_eos": {"ignore_eos": True},
        "bad_words": {"bad_words": ["the", "a"]},
        "allowed_token_ids": {"allowed_token_ids": list(range(100, 600))},
        "truncate_prompt_tokens": {"truncate_prompt_tokens": 4},
        "top_k_top_p": {"temperature": 0.9, "top_k": 20, "top_p": 0.8},
        "penalties": {"presence_penalty": 0.5, "frequency_penalty": 0.3,
                      "repetition_penalty": 1.2},
        "logit_bias": {"logit_bias": {"13": 5.0, "28": -100.0}},
        "choice": {"structured_outputs": {"choice": ["yes", "no", "maybe"]}},
        "regex": {"structured_outputs": {"regex": "[0-9]{1,4}( [0-9]{1,4}){2}"}},
        "json_schema": {"structured_outputs": {"json": {
            "type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                             "age": {"type": "integer"}},
            "required": ["name", "age"]}}},
        "seeded": {"temperature": 0.8, "seed": seed},
        "sampled_n2": {"temperature": 0.9, "n": 2},
        "min_p": {"temperature": 0.8, "min_p": 0.1},
        "abort": {"stream": True, "max_tokens": 64},
        "long_prompt": {"prompt": [(1000 + 7 * j) % 20000 + 100 for j in range(max_model_len - 40)],
                        "max_tokens": 16},
        "negative_temperature": {"temperature": -1.0}, "negative_max_tokens": {"max_tokens": -5},
        "unknown_model": {"model": "no-such-model"}, "n_zero": {"n": 0},
        "too_long_prompt": {"prompt": [100 + j % 5000 for j in range(max_model_len + 50)]},
    }.get(kind, {})
    body.update(extra)
    if kind == "no_prompt":
        del body["prompt"]
    if kind == "bad_json":
        return StormRequest(kind, completions, b'{"model": "x", "prompt": ')
    if kind == "chat_greedy":
        body = {"model": model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 24, "temperature": 0.0}
        return StormRequest(kind, "/v1/chat/completions", body)
    return StormRequest(kind, completions, body, stream=bool(body.get("stream")),
                        abort_after=3 if kind == "abort" else None)


def send(base: str, request: StormRequest, timeout: float = 120.0) -> StormResult:
    data = request.body if isinstance(request.body, bytes) else json.dumps(request.body).encode()
    http = urllib.request.Request(base + request.path, data,
                                  {"Content-Type": "application/json"})
    start = time.perf_counter()
    result = StormResult(request.kind, 0)
    try:
        with urllib.request.urlopen(http, timeout=timeout) as response:
            result.status = response.status
            if request.stream:
                result.texts = [_read_stream(response, request.abort_after)]
            else:
                payload = json.loads(response.read())
                result.texts = [c.get("text") if "text" in c else c["message"]["content"]
                                for c in payload["choices"]]
    except urllib.error.HTTPError as error:
        result.status = error.code
        result.message = _error_message(error.read())
    except (OSError, ValueError) as error:  # connection refused/reset, timeout, bad payload
        result.message = f"{type(error).__name__}: {error}"
    result.seconds = time.perf_counter() - start
    return result


def _read_stream(response, abort_after: int | None) -> str:
    """The streamed text; with `abort_after`, hang up after that many events."""
    text, events = [], 0
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            break
        events += 1
        text.append(json.loads(data)["choices"][0].get("text") or "")
        if abort_after is not None and events >= abort_after:
            response.close()  # the client goes away mid-stream
            break
    return "".join(text)


def _error_message(body: bytes) -> str:
    try:
        payload = json.loads(body)
    except ValueError:
        return body.decode(errors="replace")[:200]
    error = payload.get("error", payload)
    return str(error.get("message") if isinstance(error, dict) else error)[:300]


def storm(base: str, requests: list[StormRequest], concurrency: int = 64,
          timeout: float = 120.0) -> list[StormResult]:
    """Every request once, `concurrency` at a time; results in request order."""
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(lambda r: send(base, r, timeout), requests))


def problems(requests: list[StormRequest], results: list[StormResult],
             reference: list[StormResult] | None = None) -> list[str]:
    """What went wrong, one line each (empty: the storm passed)."""
    found = []
    for i, (request, result) in enumerate(zip(requests, results)):
        label = f"#{i} {request.kind}"
        if result.status == 0:
            found.append(f"{label}: no response ({result.message})")
        elif request.malformed:
            if not 400 <= result.status < 500 or not result.message:
                found.append(f"{label}: expected a 4xx with a message, got {result.status} "
                             f"{result.message!r}")
        elif result.status != 200:
            found.append(f"{label}: {result.status} {result.message}")
        elif request.kind != "abort" and not all(isinstance(t, str) for t in result.texts):
            found.append(f"{label}: no text")
        elif reference is not None and COMPARED.get(request.kind):
            if result.texts != reference[i].texts:
                found.append(f"{label}: differs from the reference server: "
                             f"{result.texts!r} vs {reference[i].texts!r}")
    return found


def summary(requests: list[StormRequest], results: list[StormResult]) -> dict[str, dict]:
    """Per kind: how many, their statuses, mean seconds."""
    table: dict[str, dict] = {}
    for request, result in zip(requests, results):
        row = table.setdefault(request.kind, {"count": 0, "statuses": {}, "seconds": 0.0})
        row["count"] += 1
        row["statuses"][str(result.status)] = row["statuses"].get(str(result.status), 0) + 1
        row["seconds"] += result.seconds
    for row in table.values():
        row["seconds"] = round(row["seconds"] / row["count"], 3)
    return table


# -- Servers ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resident_mib(pid: int) -> float:
    """Resident memory of a process and its children (the engine core may be one), MiB."""
    total = 0.0
    for p in [pid] + _children(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            continue
    return total


def _children(pid: int) -> list[int]:
    try:
        direct = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return direct + [g for c in direct for g in _children(c)]


class Server:
    """`vllm-chimera serve TARGET ...` on 127.0.0.1 (a context manager): waits for /health."""

    def __init__(self, target: str, extra_args: list[str], log_path: Path,
                 startup_timeout: float = 300.0, env: dict | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        serve = Path(sys.executable).with_name("vllm-chimera")
        self.command = [str(serve), "serve", str(target), "--host", "127.0.0.1",
                        "--port", str(self.port), *extra_args]
        self.log_path, self.startup_timeout = Path(log_path), startup_timeout
        self.env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **(env or {})}
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=self.env)
        deadline = time.time() + self.startup_timeout
        while not self.healthy():
            if self.process.poll() is not None or time.time() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"server did not start ({' '.join(self.command)}):\n"
                                   + self.log_path.read_text()[-3000:])
            time.sleep(1)
        return self

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.base + "/health", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def model(self) -> str:
        with urllib.request.urlopen(self.base + "/v1/models", timeout=10) as response:
            return json.loads(response.read())["data"][0]["id"]

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._log.close()


def parity_table(requests: list[StormRequest], results: list[StormResult],
                 reference: list[StormResult]) -> str:
    """Markdown: per request kind, what plain vLLM and Chimera answered. "identical": every
    greedy output equal to plain's; "served": 200 (sampled kinds: a sample, not plain's);
    "4xx as plain": a malformed request refused by both; anything else is listed as is."""
    rows: dict[str, list[tuple[StormResult, StormResult]]] = {}
    for request, result, plain in zip(requests, results, reference):
        rows.setdefault(request.kind, []).append((result, plain))
    lines = ["| request kind | count | plain vLLM | Chimera |", "|---|---|---|---|"]
    for kind, pairs in rows.items():
        plain_codes = sorted({str(p.status) for _, p in pairs})
        chimera_codes = sorted({str(r.status) for r, _ in pairs})
        if kind in MALFORMED:
            both = all(400 <= r.status < 500 and 400 <= p.status < 500 for r, p in pairs)
            verdict = "4xx as plain" if both else "chimera " + "/".join(chimera_codes)
        elif all(r.status == 200 for r, _ in pairs):
            same = all(r.texts == p.texts for r, p in pairs)
            verdict = ("identical" if same else "DIFFERENT") if COMPARED[kind] else "served"
        else:
            verdict = "REFUSED " + "/".join(chimera_codes)
        lines.append(f"| {kind} | {len(pairs)} | {'/'.join(plain_codes)} | {verdict} |")
    return "\n".join(lines) + "\n"
