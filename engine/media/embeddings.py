"""Sentence embeddings with a BERT encoder on plain MLX (sentence-transformers folder layout).

A small functional encoder: embeddings + LayerNorm, post-LN layers with exact (erf) GELU, then
the folder's pooling (mean over the attention mask, or CLS) and L2 normalisation (OpenAI's
embeddings are unit length). It matches
sentence-transformers (see tests/data) without torch. Runs on the engine's worker thread.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from engine.models.probe import sentence_config

BATCH = 32  # inputs per forward pass; bounds activation memory


@dataclass(frozen=True)
class Embeddings:
    vectors: np.ndarray  # (n, dim) float32, L2-normalised
    token_counts: list[int]  # per input, special tokens included, after truncation


class BertEmbedder:
    """A loaded BERT sentence-embedding model."""

    def __init__(self, model_id: str, folder: Path, gelu=nn.gelu, config: Optional[dict] = None) -> None:
        """`config`: the folder's config.json as the probe parsed it (read here when not given)."""
        from tokenizers import Tokenizer

        self.model_id = model_id
        self.gelu = gelu  # exact (erf); bench/embeddings.py compares the tanh approximation
        self.config = config or json.loads((folder / "config.json").read_text())
        st = sentence_config(folder)
        self.max_length = int(st["max_seq_length"] or self.config.get("max_position_embeddings", 512))
        self.pooling = st["pooling"]
        self.dim = int(self.config["hidden_size"])
        self.heads = int(self.config["num_attention_heads"])
        self.layers = int(self.config["num_hidden_layers"])
        self.eps = float(self.config.get("layer_norm_eps", 1e-12))
        weights = mx.load(str(folder / "model.safetensors"))
        # Some exports prefix everything with "bert."
        self.w = {k[5:] if k.startswith("bert.") else k: v.astype(mx.float32) for k, v in weights.items()}
        mx.eval(self.w)
        # A cross-encoder (BertForSequenceClassification, e.g. ms-marco-MiniLM, bge-reranker) has a
        # pooler and a classifier head: it scores a (query, document) pair (engine/media/rerank.py).
        self.classifier = "classifier.weight" in self.w and "pooler.dense.weight" in self.w
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        # tokenizer.json ships fixed padding/truncation at 128: replace both with ours.
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=self.max_length)

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.w.values())

    def _linear(self, x: mx.array, name: str) -> mx.array:
        return x @ self.w[f"{name}.weight"].T + self.w[f"{name}.bias"]

    def _norm(self, x: mx.array, name: str) -> mx.array:
        return mx.fast.layer_norm(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"], self.eps)

    def _hidden(self, ids: mx.array, mask: mx.array, types: Optional[mx.array] = None) -> mx.array:
        """The encoder's last hidden states; `types`: token type ids (a pair's second text is 1)."""
        b, n = ids.shape
        token_types = self.w["embeddings.token_type_embeddings.weight"]
        x = (self.w["embeddings.word_embeddings.weight"][ids]
             + self.w["embeddings.position_embeddings.weight"][:n]
             + (token_types[types] if types is not None else token_types[0]))
        x = self._norm(x, "embeddings.LayerNorm")
        head_dim = self.dim // self.heads
        additive = ((1.0 - mask[:, None, None, :]) * -1e9).astype(x.dtype)

        def split(t: mx.array) -> mx.array:
            return t.reshape(b, n, self.heads, head_dim).transpose(0, 2, 1, 3)

        for i in range(self.layers):
            p = f"encoder.layer.{i}"
            q = split(self._linear(x, f"{p}.attention.self.query"))
            k = split(self._linear(x, f"{p}.attention.self.key"))
            v = split(self._linear(x, f"{p}.attention.self.value"))
            a = mx.fast.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(head_dim), mask=additive)
            a = a.transpose(0, 2, 1, 3).reshape(b, n, self.dim)
            x = self._norm(x + self._linear(a, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
            h = self.gelu(self._linear(x, f"{p}.intermediate.dense"))
            x = self._norm(x + self._linear(h, f"{p}.output.dense"), f"{p}.output.LayerNorm")
        return x

    def _forward(self, ids: mx.array, mask: mx.array) -> mx.array:
        x = self._hidden(ids, mask)
        if self.pooling == "cls":
            pooled = x[:, 0]
        else:
            m = mask[:, :, None]
            pooled = (x * m).sum(axis=1) / mx.maximum(m.sum(axis=1), 1e-9)
        # Always unit length, as OpenAI's embeddings are (and as sentence-transformers' Normalize).
        return pooled / mx.maximum(mx.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)

    def embed(self, texts: Sequence[str]) -> Embeddings:
        """Embed up to BATCH texts (longer lists: call per chunk)."""
        encodings = self.tokenizer.encode_batch(list(texts))
        ids, mask, _ = _padded(encodings)
        out = self._forward(mx.array(ids), mx.array(mask))
        mx.eval(out)
        return Embeddings(np.array(out, dtype=np.float32), [len(e.ids) for e in encodings])

    def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> Embeddings:
        """A cross-encoder's relevance of up to BATCH (query, document) pairs: the pair through the
        encoder, the [CLS] state through the pooler (dense, tanh) and the classifier; one label is
        a logit (sigmoid, as sentence-transformers' CrossEncoder), several a softmax's last class.
        Pairs longer than the model's limit lose the document's end (truncation "longest first").
        Returned as (n, 1) `vectors` with the token counts."""
        encodings = self.tokenizer.encode_batch([list(p) for p in pairs])
        ids, mask, types = _padded(encodings)
        x = self._hidden(mx.array(ids), mx.array(mask), mx.array(types))
        pooled = mx.tanh(self._linear(x[:, 0], "pooler.dense"))
        logits = self._linear(pooled, "classifier")
        scores = mx.sigmoid(logits[:, 0]) if logits.shape[-1] == 1 else mx.softmax(logits, axis=-1)[:, -1]
        mx.eval(scores)
        return Embeddings(np.array(scores, dtype=np.float32)[:, None], [len(e.ids) for e in encodings])


def _padded(encodings: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids, attention mask and token type ids of a batch, padded to its longest."""
    n = max(len(e.ids) for e in encodings)
    ids = np.zeros((len(encodings), n), dtype=np.int32)
    mask = np.zeros((len(encodings), n), dtype=np.float32)
    types = np.zeros((len(encodings), n), dtype=np.int32)
    for row, e in enumerate(encodings):
        ids[row, : len(e.ids)] = e.ids
        mask[row, : len(e.ids)] = 1.0
        types[row, : len(e.ids)] = e.type_ids
    return ids, mask, types
