"""/v1/embeddings on the real all-MiniLM-L6-v2, offline, against stored sentence-transformers vectors."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import MODEL

EMB = "all-MiniLM-L6-v2"
REFERENCE = json.loads((Path(__file__).parent / "data" / "minilm_reference.json").read_text())


def post(server, **body):
    return httpx.post(server.url + "/v1/embeddings", json=body, timeout=120)


def test_listed_with_type_dimensions_and_max_input(client):
    m = {x.id: x for x in client.models.list().data}[EMB]
    assert m.model_extra["type"] == "embedding" and m.model_extra["dimensions"] == 384
    assert m.model_extra["context_length"] == 256


def test_parity_with_sentence_transformers(client):
    r = client.embeddings.create(model=EMB, input=REFERENCE["sentences"], encoding_format="float")
    got = np.array([d.embedding for d in r.data])
    ref = np.array(REFERENCE["embeddings"])
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.999, cos
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-4)
    assert [d.index for d in r.data] == list(range(len(REFERENCE["sentences"])))


def test_similar_sentences_score_higher(client):
    r = client.embeddings.create(model=EMB, input=["A cat sits on the mat.", "A kitten rests on a rug.",
                                                   "Stock markets fell sharply today."])
    a, b, c = (np.array(d.embedding) for d in r.data)
    assert a @ b > a @ c + 0.3


def test_official_client_default_is_base64_and_agrees_with_float(client, server):
    # The official client asks for base64 by default and decodes it itself.
    default = client.embeddings.create(model=EMB, input="hello").data[0].embedding
    raw = post(server, model=EMB, input="hello", encoding_format="base64").json()["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(raw), dtype="<f4")
    floats = post(server, model=EMB, input="hello", encoding_format="float").json()["data"][0]["embedding"]
    assert len(raw) == 2048 and np.allclose(decoded, floats, atol=1e-6) and np.allclose(default, floats, atol=1e-6)


def test_usage_counts_real_tokens(server):
    r = post(server, model=EMB, input=["A cat sits on the mat.", "hello"]).json()
    assert r["usage"] == {"prompt_tokens": 9 + 3, "total_tokens": 12}


def test_batch_of_64_and_long_input_truncated(server):
    r = post(server, model=EMB, input=[f"sentence number {i}" for i in range(64)])
    assert r.status_code == 200 and len(r.json()["data"]) == 64
    long = " ".join(["word"] * 2000)
    r = post(server, model=EMB, input=long).json()
    assert r["usage"]["prompt_tokens"] == 256  # truncated to the model's limit


BAD = [
    ("empty list", {"model": EMB, "input": []}, 400, "input"),
    ("empty string", {"model": EMB, "input": ""}, 400, "input"),
    ("empty string in list", {"model": EMB, "input": ["a", ""]}, 400, "input"),
    ("non-string items", {"model": EMB, "input": ["a", 3]}, 400, "input"),
    ("token ids", {"model": EMB, "input": [1, 2, 3]}, 400, "input"),
    ("too many inputs", {"model": EMB, "input": ["a"] * 2049}, 400, "input"),
    ("unknown encoding_format", {"model": EMB, "input": "a", "encoding_format": "hex"}, 400, "encoding_format"),
    ("unsupported dimensions", {"model": EMB, "input": "a", "dimensions": 128}, 400, "dimensions"),
    ("chat model for embeddings", {"model": MODEL, "input": "a"}, 400, "model"),
    ("unknown model", {"model": "nope", "input": "a"}, 404, "model"),
    ("missing input", {"model": EMB}, 400, "input"),
]


@pytest.mark.parametrize("body,status,param", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input(server, body, status, param):
    r = post(server, **body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_chat_with_embedding_model_is_400(server):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": EMB, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    assert "/v1/embeddings" in r.json()["error"]["message"]


def test_embeddings_do_not_wait_behind_a_long_generation(server):
    import time

    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 400,
            "stream": True, "logit_bias": {"2": -100}}
    with httpx.Client(timeout=120) as h:
        with h.stream("POST", server.url + "/v1/chat/completions", json=body) as resp:
            lines = resp.iter_lines()
            next(lines), next(lines)
            start = time.monotonic()
            r = post(server, model=EMB, input="quick")
            took = time.monotonic() - start
            assert r.status_code == 200
            assert h.get(server.url + "/health").json()["queued"] == 1  # the stream is still going
    assert took < 10


def test_langchain_openai_embeddings(server):
    from langchain_openai import OpenAIEmbeddings

    # check_embedding_ctx_length=False: LangChain otherwise pre-tokenizes with OpenAI's tiktoken
    # (downloaded from the internet) and sends token ids, which a non-OpenAI model can't use.
    lc = OpenAIEmbeddings(model=EMB, base_url=server.url + "/v1", api_key="unused",
                          check_embedding_ctx_length=False, max_retries=0)
    docs = lc.embed_documents(["A cat sits on the mat.", "Paris is the capital of France."])
    query = lc.embed_query("A kitten rests on a rug.")
    assert len(docs) == 2 and len(query) == 384
    assert np.dot(query, docs[0]) > np.dot(query, docs[1])
