"""lm-evaluation-harness model adapter (registered as `megapeer`).

    megapeer eval --model exports/run1 --tasks hellaswag,mmlu
or from Python:
    import lm_eval, megapeer.eval.lm_eval_adapter     # the import registers `megapeer`
    lm_eval.simple_evaluate(model="megapeer", model_args="path=exports/run1,device=cuda",
                            tasks=["hellaswag"])

`path` is an export folder or a megapeer checkpoint (any layout). Contexts are scored as
in training: documents start after the end-of-document token (prefix_token_id), no BOS
is added. generate_until decodes greedily (or samples with temperature > 0) with the
latent KV cache and stops at the first `until` string or the end-of-document token.
Under torchrun/SLURM (world size > 1) each rank evaluates its share of the documents
and lm-eval gathers the results over torch.distributed.
"""
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from ..convert.generate import generate_ids
from .scoring import Scorer


@register_model("megapeer")
class MegapeerLM(TemplateLM):
    def __init__(self, path=None, model=None, tokenizer=None, device="cpu", dtype=None,
                 batch_size=8, max_length=None, max_gen_toks=256, **kwargs):
        super().__init__()
        if model is None:
            if path is None:
                raise ValueError("MegapeerLM needs path= (export folder or checkpoint)")
            from ..convert.loading import load_model
            model, own = load_model(path, device=device, dtype=dtype,
                                    tokenizer=tokenizer if isinstance(tokenizer, str) else None)
            tokenizer = own if tokenizer is None or isinstance(tokenizer, str) else tokenizer
        if tokenizer is None:
            raise ValueError("MegapeerLM needs a tokenizer (none found with the model)")
        self.model, self.tok = model, tokenizer
        self._device = next(model.parameters()).device
        self._max_length = int(max_length or model.config.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 8
        self.scorer = Scorer(model, self._max_length, self.batch_size)
        self.path = path
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self._rank = torch.distributed.get_rank()
            self._world_size = torch.distributed.get_world_size()

    # ------------------------------------------------------------ tokenisation
    @property
    def eot_token_id(self):
        return self.tok.eod if self.tok.eod is not None else self.tok.bos

    @property
    def prefix_token_id(self):
        return self.eot_token_id

    @property
    def max_length(self):
        return self._max_length

    @property
    def tokenizer_name(self):
        return str(getattr(self.tok, "path", "megapeer"))

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return self.tok.encode(string)

    def tok_decode(self, tokens, **kwargs):
        return self.tok.decode(tokens)

    def get_model_info(self):
        return {"model_path": str(self.path), "max_length": self._max_length}

    # ------------------------------------------------------------------ scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        reqs = []
        for _, ctx, cont in requests:
            if not cont:
                raise ValueError("empty continuation")
            whole = (list(ctx) + list(cont))[-(self._max_length + 1):]
            n = min(len(cont), len(whole) - 1)
            reqs.append((whole[:len(whole) - n], whole[len(whole) - n:]))
        out = []
        for start in tqdm(range(0, len(reqs), 64), disable=disable_tqdm or self.rank != 0,
                          desc="loglikelihood"):
            out += [(s, g) for s, g, _ in self.scorer.score(reqs[start:start + 64])]
        for (key, _, _), res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        results = []
        for req in tqdm(requests, disable=disable_tqdm or self.rank != 0,
                        desc="loglikelihood_rolling"):
            (text,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text), self.prefix_token_id, self._max_length, 1)]
            scores = self.scorer.score(windows)
            total = sum(s for s, _, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            results.append(total)
        return results

    # --------------------------------------------------------------- generation
    def generate_until(self, requests, disable_tqdm=False):
        out = []
        for req in tqdm(requests, disable=disable_tqdm or self.rank != 0,
                        desc="generate_until"):
            context, kw = req.args
            kw = dict(kw or {})
            until = kw.pop("until", None) or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kw.pop("temperature", 0.0) or 0.0)
            if not kw.pop("do_sample", temperature > 0):
                temperature = 0.0
            keep = max(1, self._max_length - max_new)   # prompt + new tokens fit the window
            ids = self.tok_encode(context)[-keep:] or [self.prefix_token_id]

            def hit(new):
                text = self.tok_decode(new)
                return any(u and u in text for u in until)

            new = generate_ids(self.model, ids, max_new, temperature, kw.pop("top_k", None),
                               int(kw.pop("seed", 0)), [self.eot_token_id], True, hit)
            if new and new[-1] == self.eot_token_id:
                new = new[:-1]
            text = self.tok_decode(new)
            for u in until:
                if u:
                    text = text.split(u)[0]
            self.cache_hook.add_partial("generate_until", (context, req.args[1]), text)
            out.append(text)
        return out

    # ------------------------------------------------- data parallel (torchrun)
    def all_gather(self, tensor):
        if self.world_size == 1:
            return tensor
        t = tensor.reshape(1) if tensor.dim() == 0 else tensor
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def gather_object(self, obj, dst=0):
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj, out, dst=dst)
        return out

    def barrier(self):
        if self.world_size > 1:
            torch.distributed.barrier()
