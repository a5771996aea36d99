"""Perplexity over JSONL documents or a Megatron indexed dataset, with a sliding window.

Each document is scored on its own, preceded by the end-of-document token (as in the
training stream), every token predicted once; long documents are split into windows of
max_length tokens that advance by `stride` (smaller strides give each prediction more
context). Reports total negative log-likelihood, tokens, mean loss, perplexity and, for
text input, bits per UTF-8 byte.
"""
import json
import math
import os

from .scoring import Scorer, rolling_windows


def jsonl_documents(path, key="text", limit=None):
    """Texts from a JSON-lines file; errors name the file and line."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: JSONL file not found")
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: invalid JSON ({e})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get(key), str):
                raise ValueError(f"{path}:{n}: no string field {key!r}")
            docs.append(rec[key])
            if limit and len(docs) >= limit:
                break
    return docs


def indexed_documents(prefix, limit=None):
    """Token id lists, one per document, of a Megatron indexed dataset (.bin/.idx)."""
    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            raise ValueError(f"{prefix}{ext}: indexed dataset file not found")
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    ds = IndexedDataset(prefix)
    bounds = ds.document_indices
    n = len(bounds) - 1 if limit is None else min(limit, len(bounds) - 1)
    docs = []
    for d in range(n):
        toks = []
        for s in range(int(bounds[d]), int(bounds[d + 1])):
            toks.extend(int(t) for t in ds[s])
        docs.append(toks)
    return docs


def perplexity(model, token_docs, prefix, max_length, stride=None, batch_size=8, nbytes=None):
    """Sliding-window perplexity of token documents (lists of ids)."""
    reqs = []
    for doc in token_docs:
        reqs.extend(rolling_windows(doc, prefix, max_length, stride))
    scores = Scorer(model, max_length, batch_size).score(reqs)
    nll = -sum(s for s, _, _ in scores)
    tokens = sum(len(t) for _, t in reqs)
    res = {"documents": len(token_docs), "tokens": tokens, "nll": nll,
           "loss": nll / max(tokens, 1), "perplexity": math.exp(nll / max(tokens, 1)),
           "max_length": max_length, "stride": stride or max_length}
    if nbytes is not None:
        res["bytes"] = nbytes
        if nbytes:
            res["bits_per_byte"] = nll / (math.log(2) * nbytes)
    return res


def jsonl_perplexity(model, tokenizer, path, max_length, stride=None, batch_size=8, key="text",
                     append_eod=False, limit=None):
    texts = jsonl_documents(path, key, limit)
    docs = [tokenizer.encode(t) + ([tokenizer.eod] if append_eod else []) for t in texts]
    return perplexity(model, docs, doc_prefix(tokenizer), max_length, stride, batch_size,
                      nbytes=sum(len(t.encode("utf-8")) for t in texts))


def indexed_perplexity(model, tokenizer, prefix, max_length, stride=None, batch_size=8,
                       limit=None):
    docs = indexed_documents(prefix, limit)
    return perplexity(model, docs, doc_prefix(tokenizer), max_length, stride, batch_size)


def doc_prefix(tokenizer) -> int:
    tok = tokenizer.eod if tokenizer.eod is not None else tokenizer.bos
    if tok is None:
        raise ValueError("the tokenizer has neither an end-of-document nor a BOS token to "
                         "start documents with")
    return tok
