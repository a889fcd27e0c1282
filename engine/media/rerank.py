"""Rerank: how relevant each document is to a query, with the models openmlx already has.

Three kinds, chosen by the model:
- an embedding model: the cosine of the query's and each document's embedding (what vLLM's
  score API does for embedding models);
- a cross-encoder folder (BertForSequenceClassification): each (query, document) pair through
  the encoder and its classifier head (engine/media/embeddings.py `score_pairs`);
- an instruct LLM as a judge (Qwen3-Reranker's method): the probability that it answers "yes"
  rather than "no" to a fixed judging prompt holding the query and the document.

Work is cut into short jobs (a batch of documents, or one document for the judge), each its
own turn on the engine's worker, so a long list never holds up generation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

import numpy as np

from engine.media.embeddings import BATCH, BertEmbedder
from engine.request import ChatMessage

# Run a function on the engine's worker (Scheduler.call) and await its result.
OnWorker = Callable[[Callable[[], Any]], Awaitable[Any]]

JUDGE_SYSTEM = ('Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
                'Note that the answer can only be "yes" or "no".')
JUDGE_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
JUDGE_DOCUMENT_TOKENS = 1024  # a longer document is cut to its first tokens (the judge reads this much)


@dataclass(frozen=True)
class Ranking:
    """Each document's relevance (input order), the tokens read, and how it was scored."""

    scores: list[float]
    tokens: int
    method: str  # "cosine" | "cross-encoder" | "judge"


async def by_encoder(embedder: BertEmbedder, query: str, documents: Sequence[str], on_worker: OnWorker) -> Ranking:
    """Cosine of embeddings, or the cross-encoder's scores when the folder has a classifier head."""
    if embedder.classifier:
        scores: list[float] = []
        tokens = 0
        for i in range(0, len(documents), BATCH):
            pairs = [(query, d) for d in documents[i:i + BATCH]]
            out = await on_worker(lambda pairs=pairs: embedder.score_pairs(pairs))
            scores += [float(s) for s in out.vectors[:, 0]]
            tokens += sum(out.token_counts)
        return Ranking(scores, tokens, "cross-encoder")
    q = await on_worker(lambda: embedder.embed([query]))
    vectors, tokens = [], sum(q.token_counts)
    for i in range(0, len(documents), BATCH):
        chunk = list(documents[i:i + BATCH])
        out = await on_worker(lambda chunk=chunk: embedder.embed(chunk))
        vectors.append(out.vectors)
        tokens += sum(out.token_counts)
    cosine = np.concatenate(vectors) @ q.vectors[0]  # unit vectors: the dot product is the cosine
    return Ranking([float(s) for s in cosine], tokens, "cosine")


def judge_messages(query: str, document: str, instruction: str = JUDGE_INSTRUCTION) -> list[ChatMessage]:
    return [ChatMessage("system", JUDGE_SYSTEM),
            ChatMessage("user", f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}")]


def judge_one(runner: Any, query: str, document: str) -> tuple[float, int]:
    """P(yes) / (P(yes) + P(no)) for the next token after the judging prompt (each word in
    both cases, where the tokenizer has them as single tokens), and the prompt's length. Runs on
    the worker."""
    import mlx.core as mx

    tokenizer = runner.tokenizer
    ids = tokenizer.encode(document, add_special_tokens=False)
    if len(ids) > JUDGE_DOCUMENT_TOKENS:
        document = tokenizer.decode(ids[:JUDGE_DOCUMENT_TOKENS])
    prompt = runner.encode_chat(judge_messages(query, document), param="documents")
    yes, no = _word_ids(tokenizer, "yes"), _word_ids(tokenizer, "no")
    logits = runner.model(mx.array(prompt)[None])[0, -1].astype(mx.float32)
    probs = mx.softmax(logits[mx.array(yes + no)])
    return float(probs[:len(yes)].sum().item()), len(prompt)


def _word_ids(tokenizer: Any, word: str) -> list[int]:
    """The single-token ids of `word` and its capitalised form (first pieces where none is single)."""
    ids = {tuple(tokenizer.encode(w, add_special_tokens=False)) for w in (word, word.capitalize())}
    single = sorted(i[0] for i in ids if len(i) == 1)
    return single or sorted({i[0] for i in ids})


async def by_judge(runner: Any, query: str, documents: Sequence[str], on_worker: OnWorker) -> Ranking:
    """An instruct LLM's yes/no judgement of each document, one document per worker job."""
    scores, tokens = [], 0
    for document in documents:
        score, n = await on_worker(lambda document=document: judge_one(runner, query, document))
        scores.append(score)
        tokens += n
    return Ranking(scores, tokens, "judge")
