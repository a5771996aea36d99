"""Text generation with the latent KV cache (MLA's compressed latent + shared rotary key).

    from megapeer.convert.generate import sample
    text = sample("exports/run1", None, "def main(", max_new_tokens=64, temperature=0.8,
                  top_k=50, seed=0)

`model` is a path (export folder or megapeer checkpoint) or a loaded model; `tokenizer`
None takes the folder's / checkpoint's own. temperature <= 0 is greedy decoding.
"""
import inspect

import torch


def new_cache(model):
    from transformers.cache_utils import DynamicCache
    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers
        return DynamicCache()


def _cache_kwarg(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def pick_token(logits, temperature=0.0, top_k=None, generator=None) -> int:
    """Next token from [vocab] logits: argmax, or a sample at `temperature` from the top_k."""
    logits = logits.float()
    if temperature is None or temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate_ids(model, prompt_ids, max_new_tokens, temperature=0.0, top_k=None, seed=0,
                 stop_ids=(), use_cache=True, stop_fn=None):
    """New token ids after `prompt_ids`. With use_cache the prompt is run once and each step
    feeds one token against the cached latents; without, the whole prefix is recomputed.
    stop_fn(new_ids) -> True ends generation (after that token)."""
    if not prompt_ids:
        raise ValueError("generate_ids needs at least one prompt token")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([list(prompt_ids)], device=device)
    cache = new_cache(model) if use_cache else None
    key = _cache_kwarg(model)
    step_input, out = ids, []
    for _ in range(max_new_tokens):
        if use_cache:
            logits = model(input_ids=step_input, use_cache=True, **{key: cache}).logits
        else:
            logits = model(input_ids=ids, use_cache=False).logits
        tok = pick_token(logits[0, -1], temperature, top_k, gen)
        out.append(tok)
        step_input = torch.tensor([[tok]], device=device)
        ids = torch.cat([ids, step_input], dim=1)
        if tok in stop_ids or (stop_fn is not None and stop_fn(out)):
            break
    return out


def sample(model, tokenizer, prompt, max_new_tokens=64, temperature=1.0, top_k=None, seed=0,
           device="cpu", use_cache=True):
    """Generated continuation text of `prompt` (stops at the tokenizer's end-of-document)."""
    if isinstance(model, str):
        from .loading import load_model
        model, own = load_model(model, device=device, tokenizer=tokenizer)
        tokenizer = tokenizer if (tokenizer and not isinstance(tokenizer, str)) else own
    if tokenizer is None or isinstance(tokenizer, str):
        raise ValueError("sample needs a tokenizer (none found with the model)")
    ids = tokenizer.encode(prompt)
    if not ids:
        ids = [tokenizer.eod if tokenizer.eod is not None else tokenizer.bos]
    stop = [tokenizer.eod] if tokenizer.eod is not None else []
    new = generate_ids(model, ids, max_new_tokens, temperature, top_k, seed, stop, use_cache)
    if new and new[-1] in stop:
        new = new[:-1]
    return tokenizer.decode(new)
