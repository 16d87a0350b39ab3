"""`vllm-chimera serve` (vLLM's own server) with Chimera on 127.0.0.1."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import build_permutation_pair
from vllm_chimera.checkpoint import save_draft
from vllm_chimera.reference import ChimeraDrafter, SpeculativeDecoder
from vllm_chimera.tree import TokenTree

pytestmark = pytest.mark.slow
SERVE = Path(sys.executable).with_name("vllm-chimera")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    target, draft, _ = build_permutation_pair(folder, num_heads=4, num_wrong=32)
    save_draft(draft, folder / "target" / "chimera")  # found by --speculative-model chimera
    port = _free_port()
    log = open(folder / "server.log", "w")
    process = subprocess.Popen(
        [str(SERVE), "serve", str(folder / "target"), "--speculative-model", "chimera",
         "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
         "--kv-cache-memory-bytes", str(64 << 20), "--max-model-len", "512"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            if process.poll() is not None:
                pytest.fail("server exited:\n" + (folder / "server.log").read_text()[-3000:])
            try:
                if _get(f"{base}/health") is not None:
                    break
            except OSError:
                if time.time() > deadline:
                    pytest.fail("server did not start in 240 s:\n"
                                + (folder / "server.log").read_text()[-3000:])
                time.sleep(1)
        yield base, target, draft
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def test_completions_equal_the_reference_decoder_and_metrics_move(server):
    base, target, draft = server
    decoder = SpeculativeDecoder(target, ChimeraDrafter(draft), TokenTree.chain(4))
    for prompt_ids in ([5, 9, 17], [100, 3, 44, 8, 61, 2, 90]):
        prompt = " ".join(f"t{i}" for i in prompt_ids)
        response = _post(f"{base}/v1/completions", {
            "model": response_model(base), "prompt": prompt, "max_tokens": 24,
            "temperature": 0.0, "ignore_eos": True})
        expected = decoder.generate(torch.tensor(prompt_ids), 24).token_ids
        assert response["choices"][0]["text"].split() == [f"t{i}" for i in expected]
    metrics = _get(f"{base}/metrics")
    drafts = re.search(r"^vllm:spec_decode_num_drafts_total\{[^}]*\} (\S+)", metrics, re.M)
    accepted = re.search(r"^vllm:spec_decode_num_accepted_tokens_total\{[^}]*\} (\S+)", metrics, re.M)
    assert drafts and float(drafts.group(1)) > 0
    assert accepted and float(accepted.group(1)) > 0


def response_model(base: str) -> str:
    return json.loads(_get(f"{base}/v1/models"))["data"][0]["id"]
