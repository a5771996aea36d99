"""Token log-probabilities from a causal LM, batched.

A request is (input ids, number of scored positions n): the model reads the inputs and
the last n positions are scored against the inputs shifted by one plus the target that
follows. Batches are right-padded: with causal attention the real positions never see
the padding, so padded and unpadded results agree.
"""
import torch
import torch.nn.functional as F


class Scorer:
    def __init__(self, model, max_length, batch_size=8):
        self.model = model
        self.max_length = max_length
        self.batch_size = batch_size
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def score(self, requests):
        """requests: [(context ids, target ids)] with len(context) >= 1 and
        len(context) + len(target) - 1 <= max_length; the model reads
        (context + target)[:-1]. Returns [(sum logprob of target, greedy: bool,
        per-token logprobs list)] in request order."""
        order = sorted(range(len(requests)),
                       key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
        out = [None] * len(requests)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            seqs = [list(requests[i][0]) + list(requests[i][1]) for i in idx]
            inputs = [s[:-1] for s in seqs]
            width = max(len(s) for s in inputs)
            if width > self.max_length:
                raise ValueError(f"request of {width} tokens exceeds max_length "
                                 f"{self.max_length}")
            batch = torch.zeros(len(idx), width, dtype=torch.long)
            for r, s in enumerate(inputs):
                batch[r, :len(s)] = torch.tensor(s)
            logits = self.model(input_ids=batch.to(self.device), use_cache=False).logits
            for r, i in enumerate(idx):
                target = list(requests[i][1])
                n, end = len(target), len(inputs[r])
                lp = F.log_softmax(logits[r, end - n:end].float(), dim=-1)  # scored rows only
                tgt = torch.tensor(target, device=lp.device)
                tok_lp = lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
                greedy = bool((lp.argmax(-1) == tgt).all())
                out[i] = (float(tok_lp.double().sum()), greedy, tok_lp.tolist())
        return out


def rolling_windows(tokens, prefix, max_length, stride=None):
    """Sliding windows over a document: [(context, targets)] such that every token is
    predicted once. The first window starts from `prefix` (the document separator);
    each later one moves by `stride` tokens (default: max_length, no overlap beyond one
    token) and keeps up to max_length - 1 earlier tokens as context."""
    stride = stride or max_length
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride {stride} must be in [1, max_length={max_length}]")
    seq = [prefix] + list(tokens)
    out, done = [], 0                     # done: targets already predicted (seq[1:done+1])
    while done < len(tokens):
        n = min(max_length if done == 0 else stride, len(tokens) - done)
        end = done + n                    # targets seq[done+1 : end+1]
        start = max(0, end - max_length)  # model reads seq[start:end]
        out.append((seq[start:done + 1], seq[done + 1:end + 1]))
        done = end
    return out
