"""A storm of mixed requests against `vllm-chimera serve` (SmolLM2 and its shipped draft) on
127.0.0.1, a plain vLLM server as the reference: no 5xx, no dropped connection, greedy
outputs identical to plain's, malformed requests 4xx with a message, /health after the
storm, and no growth of resident memory over a second identical storm. The full version
is scripts/serving_storm.py (results/serving/)."""
from __future__ import annotations

import pytest

from vllm_chimera.prepare.targets import prepare_target
from vllm_chimera.harness import storm

pytestmark = pytest.mark.slow
MAX_MODEL_LEN = 1024
ENGINE = ["--dtype", "float32", "--enforce-eager", "--kv-cache-memory-bytes", str(512 << 20),
          "--max-model-len", str(MAX_MODEL_LEN)]
CHIMERA = ["--speculative-config", '{"method": "chimera", "num_speculative_tokens": 2}']
MEMORY_GROWTH_MIB = 150  # allowed growth of the server's resident memory from storm 1 to 2


@pytest.fixture(scope="module")
def target():
    return prepare_target("smollm2")  # also links the shipped draft as TARGET/chimera


def test_request_storm(target, tmp_path):
    with storm.Server(target, ENGINE + CHIMERA, tmp_path / "chimera.log") as server:
        model = server.model()
        requests = storm.build_requests(model, 64, MAX_MODEL_LEN, seed=0)
        first = storm.storm(server.base, requests, concurrency=64)
        assert server.healthy()
        memory_first = storm.resident_mib(server.process.pid)
        second = storm.storm(server.base, requests, concurrency=64)
        memory_second = storm.resident_mib(server.process.pid)
        assert server.healthy() and server.process.poll() is None
    with storm.Server(target, ENGINE, tmp_path / "plain.log") as plain_server:
        plain = storm.storm(plain_server.base, requests, concurrency=64)
    assert storm.problems(requests, plain) == [], "the plain server failed the storm itself"
    assert storm.problems(requests, first, plain) == []
    assert storm.problems(requests, second, plain) == []
    assert memory_second - memory_first < MEMORY_GROWTH_MIB, (memory_first, memory_second)
    assert {r.kind for r in requests} >= set(storm.COMPARED) | set(storm.MALFORMED)
