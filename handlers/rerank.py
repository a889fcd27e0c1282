"""POST /v1/rerank, /v2/rerank and /rerank: documents ordered by relevance to a query.

Jina's and vLLM's shape on /v1/rerank and /rerank (documents returned by default), Cohere's v2 on
/v2/rerank (documents only when asked). The engine scores; here the request is read and the
results sorted, cut to top_n and shaped.
"""
from __future__ import annotations

import uuid
from typing import Any

from connexion import request

from engine.errors import InvalidRequest


def _text(document: Any) -> str:
    return document if isinstance(document, str) else document["text"]


async def _rerank(body: dict[str, Any], documents_by_default: bool) -> dict[str, Any]:
    engine = request.state.engine
    model = body.get("model") or engine.default_rerank_id
    if not model:
        raise InvalidRequest("No model given and this server has no rerank model (--rerank-model).", param="model")
    documents = [_text(d) for d in body["documents"]]
    ranking = await engine.rerank(model, body["query"], documents, request.state.max_batch_tokens)
    order = sorted(range(len(documents)), key=lambda i: ranking.scores[i], reverse=True)
    if body.get("top_n"):
        order = order[:body["top_n"]]
    with_documents = body.get("return_documents")
    with_documents = documents_by_default if with_documents is None else with_documents
    results = [{"index": i, "relevance_score": ranking.scores[i],
                **({"document": {"text": documents[i]}} if with_documents else {})} for i in order]
    return {"id": f"rerank-{uuid.uuid4().hex}", "model": model, "results": results,
            "usage": {"total_tokens": ranking.tokens},
            "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}}}


async def create_v1(body: dict):
    return await _rerank(body, documents_by_default=True)


async def create(body: dict):
    return await _rerank(body, documents_by_default=True)


async def create_v2(body: dict):
    return await _rerank(body, documents_by_default=False)
