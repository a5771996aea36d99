"""torch.compile's on-disk caches keyed on megapeer's op sources (models/gpt.py:
compile_layers calls tag_compile_caches; tests/test_model.py)."""
import hashlib
import os

_OPS_DIR = os.path.dirname(os.path.abspath(__file__))


def ops_source_hash(ops_dir: str = _OPS_DIR) -> str:
    """16 hex digits of a hash over the Python sources in ops_dir (megapeer/ops: where the
    custom ops and their fake implementations are defined)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(ops_dir)):
        if name.endswith(".py"):
            h.update(name.encode() + b"\0")
            with open(os.path.join(ops_dir, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]


def tag_compile_caches(ops_dir: str = _OPS_DIR) -> str:
    """Add megapeer's op sources to the key of torch.compile's on-disk caches; returns the
    tag. Inductor's FX graph cache (on by default) keys on the graph's code, which names
    the custom ops but not their fake implementations, whose output shapes the compiled
    code bakes in: after an update changed them, a warm cache failed with "incorrect
    fake (aka meta) kernel" (reproduced on CPU, torch 2.13). A tag the user set
    (TORCH_COMPILE_CACHE_KEY_TAG) is kept in front of ours."""
    import torch.compiler.config as compiler_config
    ours = "megapeer-ops-" + ops_source_hash(ops_dir)
    tag = compiler_config.cache_key_tag
    if ours not in tag.split("|"):
        compiler_config.cache_key_tag = f"{tag}|{ours}" if tag else ours
    return compiler_config.cache_key_tag
