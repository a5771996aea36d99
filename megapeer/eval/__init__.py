"""Evaluation: sliding-window perplexity and an lm-evaluation-harness adapter.

    megapeer.eval.cli.main(argv)            `megapeer eval` (flags: docs/export_eval.md)
    megapeer.eval.perplexity                jsonl_perplexity, indexed_perplexity, perplexity
    megapeer.eval.lm_eval_adapter           MegapeerLM, registered in lm-eval as `megapeer`
    megapeer.eval.scoring                   Scorer (batched token log-probs), rolling_windows

Models come from megapeer.convert.loading.load_model: an export folder or a checkpoint.
"""
