"""Rerank: how relevant each document is to a query, with the models openmlx already has.

Three kinds, chosen by the model:
- an embedding model: the cosine of the query's and each document's embedding (what vLLM's
  score API does for embedding models);
- a cross-encoder folder (BertForSequenceClassification): each (query, document) pair through
  the encoder and its classifier head (engine/media/embeddings.py `score_pairs`);
- an instruct LLM as a judge (Qwen3-Reranker's method): the probability that it answers "yes"
  rather than "no" to a fixed judging prompt holding the query and the document.

Work is cut into short jobs (a batch of documents, or one document for the judge), each its
own turn on the engine's worker, so a long list never holds up generation. The judge reads at
most a query's first JUDGE_QUERY_TOKENS and a document's first JUDGE_DOCUMENT_TOKENS tokens, less
where its context is shorter (the document is cut first), in passes like any long prompt.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Generator, Optional, Sequence

import numpy as np

from engine.errors import InvalidRequest
from engine.generation.batching import PREFILL_STEP
from engine.generation.tokens import SLACK, encode_prefix, guarded
from engine.media.embeddings import BATCH, BertEmbedder
from engine.request import PASS, ChatMessage, Pass

# Run a function on the engine's worker (Scheduler.call) and await its result.
OnWorker = Callable[[Callable[[], Any]], Awaitable[Any]]

JUDGE_SYSTEM = ('Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
                'Note that the answer can only be "yes" or "no".')
JUDGE_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
JUDGE_DOCUMENT_TOKENS = 1024  # a longer document is cut to its first tokens (the judge reads this much)
JUDGE_QUERY_TOKENS = 512  # and a longer query (a 20,000-character query read whole took 4.9 GB and the process)


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


@dataclass
class JudgeQuery:
    """The query as the judge reads it: its first JUDGE_QUERY_TOKENS tokens (tokenized once per
    request, no further than that), what the judging prompt costs around it, and the KV of the
    prompt's start that every document shares (the system prompt, instruction and query: read
    once per request, not once per document)."""

    ids: list[int]
    overhead: int  # the judging prompt's tokens with an empty query and document
    room: int  # tokens the query and a document may take together
    yes: list[int]
    no: list[int]
    shared: int = 0  # how many tokens every document's judging prompt starts with
    prefix: Optional[tuple[list[int], list[Any]]] = None  # those tokens and their KV cache, once read

    def start(self, prompt: list[int]) -> tuple[Optional[list[Any]], int]:
        """A copy of the shared start's KV cache and its length, when `prompt` begins with it."""
        if self.prefix is None or prompt[:len(self.prefix[0])] != self.prefix[0]:
            return None, 0
        return copy.deepcopy(self.prefix[1]), len(self.prefix[0])


def judge_query(runner: Any, query: str) -> JudgeQuery:
    """Runs on the worker."""
    tokenizer = runner.tokenizer
    ids, _cut = encode_prefix(tokenizer, query, JUDGE_QUERY_TOKENS)
    overhead = len(runner.encode_chat(judge_messages("", ""), param="documents"))
    # SLACK: a cut decoded and rendered again may take a few tokens more; 1: the answer's position
    room = runner.context_length - overhead - SLACK - 1
    if room < 2:
        raise InvalidRequest(f"The model '{runner.model_id}' has too short a context ({runner.context_length} tokens) "
                             "to judge documents.", param="model", code="model_not_reranker")
    text = guarded(lambda: tokenizer.decode(ids))
    a, b = (runner.encode_chat(judge_messages(text, d), param="documents") for d in ("a", "b"))
    shared = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return JudgeQuery(ids, overhead, room, _word_ids(tokenizer, "yes"), _word_ids(tokenizer, "no"), shared)


def _cut(query: JudgeQuery, document: list[int]) -> tuple[int, int]:
    """How many of the query's and the document's tokens the judge reads: the document is cut to
    JUDGE_DOCUMENT_TOKENS (the caller has), then both to the judge's context, the document first
    but never the query below half of it."""
    q = min(len(query.ids), max(query.room - len(document), query.room // 2))
    return q, min(len(document), query.room - q)


def document_tokens(runner: Any, query: JudgeQuery, documents: Sequence[str]) -> list[int]:
    """The judging prompt's length for each document, before any is judged (the request's budget
    is checked up front). Runs on the worker."""
    lengths = []
    for document in documents:
        ids, _ = encode_prefix(runner.tokenizer, document, JUDGE_DOCUMENT_TOKENS)
        q, d = _cut(query, ids)
        lengths.append(query.overhead + q + d)
    return lengths


def judge_one(runner: Any, query: JudgeQuery, document: str) -> Generator[Pass, None, tuple[float, int]]:
    """P(yes) / (P(yes) + P(no)) for the next token after the judging prompt (each word in
    both cases, where the tokenizer has them as single tokens), and the prompt's length. The
    prompt is read in PREFILL_STEP passes like any long prompt, yielding PASS between them (the
    worker runs other streams meanwhile). Runs on the worker."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    tokenizer = runner.tokenizer
    ids, _ = encode_prefix(tokenizer, document, JUDGE_DOCUMENT_TOKENS)
    q, d = _cut(query, ids)
    text = lambda part: guarded(lambda: tokenizer.decode(part))  # noqa: E731
    prompt = runner.encode_chat(judge_messages(text(query.ids[:q]), text(ids[:d])), param="documents")
    cache, done = query.start(prompt)
    if cache is None:
        cache = make_prompt_cache(runner.model)
    # passes end at the shared start once (its KV is kept for the other documents), then every PREFILL_STEP
    keep = query.shared if query.prefix is None and 0 < query.shared < len(prompt) else None
    ends = sorted({*range(done + PREFILL_STEP, len(prompt), PREFILL_STEP), *([keep] if keep else []), len(prompt)})
    logits = None
    for end in ends:
        logits = runner.model(mx.array(prompt[done:end])[None], cache=cache)
        done = end
        if end < len(prompt):
            mx.eval([c.state for c in cache])  # only the cache: the logits of a middle pass are never made
            if end == keep:
                query.prefix = (prompt[:end], copy.deepcopy(cache))
            yield PASS
    last = logits[0, -1].astype(mx.float32)
    probs = mx.softmax(last[mx.array(query.yes + query.no)])
    return float(probs[:len(query.yes)].sum().item()), len(prompt)


def _word_ids(tokenizer: Any, word: str) -> list[int]:
    """The single-token ids of `word` and its capitalised form (first pieces where none is single)."""
    ids = {tuple(tokenizer.encode(w, add_special_tokens=False)) for w in (word, word.capitalize())}
    single = sorted(i[0] for i in ids if len(i) == 1)
    return single or sorted({i[0] for i in ids})


async def by_judge(runner: Any, query: str, documents: Sequence[str], on_worker: OnWorker,
                   in_passes: OnWorker, max_tokens: Optional[int] = None) -> Ranking:
    """An instruct LLM's yes/no judgement of each document, one document per worker job, each
    read in passes. The query and each document are cut to what the judge reads (JudgeQuery,
    `_cut`); with `max_tokens` (--max-batch-tokens) the request's judging prompts together must
    fit it (400 before any is read)."""
    judged = await on_worker(lambda: judge_query(runner, query))
    if max_tokens is not None:
        total = 0
        for i in range(0, len(documents), BATCH):  # short jobs: a long list doesn't hold the worker
            chunk = list(documents[i:i + BATCH])
            total += sum(await on_worker(lambda chunk=chunk: document_tokens(runner, judged, chunk)))
        if total > max_tokens:
            raise InvalidRequest(f"Judging these documents takes {total} tokens (each document's judging prompt, "
                                 f"the query and document cut to what the judge reads); this server takes at most "
                                 f"{max_tokens} per request (--max-batch-tokens). Send fewer or shorter documents.",
                                 param="documents", code="batch_too_large")
    scores, tokens = [], 0
    for document in documents:
        score, n = await in_passes(lambda document=document: judge_one(runner, judged, document))
        scores.append(score)
        tokens += n
    return Ranking(scores, tokens, "judge")
