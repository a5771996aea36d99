"""Tokenizers: a sentencepiece model file or a Hugging Face tokenizer folder.

Both wrappers expose the same small surface: encode (no BOS/EOS added), encode_batch,
decode, vocab_size, eod (appended at the end of a document), bos, pad (None when absent),
save(folder). transformers is imported only when a Hugging Face folder is loaded.
"""
import os
import shutil

# Megatron-LM's --tokenizer-type names that we accept, mapped to ours.
TOKENIZER_TYPES = {
    "auto": "auto",
    "sentencepiece": "sentencepiece",
    "SentencePieceTokenizer": "sentencepiece",
    "GPTSentencePieceTokenizer": "sentencepiece",
    "Llama2Tokenizer": "sentencepiece",
    "huggingface": "huggingface",
    "HuggingFaceTokenizer": "huggingface",
}

HF_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _id_or_none(i):
    return None if i is None or i < 0 else int(i)


class SentencePieceTokenizer:
    """A sentencepiece `.model` file. eod is the model's EOS id."""

    kind = "sentencepiece"

    def __init__(self, path):
        import sentencepiece as spm

        if not os.path.isfile(path):
            raise ValueError(f"{path}: sentencepiece model not found (expected a .model file)")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path}: not a sentencepiece model ({e})") from None
        self.path = os.path.abspath(path)
        self.vocab_size = self.sp.get_piece_size()
        self.bos = _id_or_none(self.sp.bos_id())
        self.eod = _id_or_none(self.sp.eos_id())
        self.pad = _id_or_none(self.sp.pad_id())

    def encode(self, text):
        return self.sp.encode(text)

    def encode_batch(self, texts):
        # One thread: parallelism comes from worker processes.
        return self.sp.encode(list(texts), num_threads=1)

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids])

    def save(self, folder):
        os.makedirs(folder, exist_ok=True)
        shutil.copyfile(self.path, os.path.join(folder, "tokenizer.model"))


class HFTokenizer:
    """A Hugging Face tokenizer folder (tokenizer.json and its config), loaded offline."""

    kind = "huggingface"

    def __init__(self, path):
        if not os.path.isdir(path):
            raise ValueError(f"{path}: Hugging Face tokenizer folder not found")
        if not any(os.path.exists(os.path.join(path, f)) for f in HF_FILES):
            raise ValueError(f"{path}: not a Hugging Face tokenizer folder (none of "
                             f"{', '.join(HF_FILES)})")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{path}: not a Hugging Face tokenizer folder ({e})") from None
        self.path = os.path.abspath(path)
        self.vocab_size = len(self.tok)
        self.bos = _id_or_none(self.tok.bos_token_id)
        self.eod = _id_or_none(self.tok.eos_token_id)
        self.pad = _id_or_none(self.tok.pad_token_id)

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False)

    def encode_batch(self, texts):
        return self.tok(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids])

    def save(self, folder):
        self.tok.save_pretrained(folder)


def load_tokenizer(path, type="auto"):
    """Load from a path. type: 'auto' (file: sentencepiece, folder: Hugging Face), one of
    ours ('sentencepiece', 'huggingface') or a Megatron-LM --tokenizer-type name."""
    kind = TOKENIZER_TYPES.get(type)
    if kind is None:
        raise ValueError(f"unknown tokenizer type {type!r}; expected one of "
                         f"{', '.join(TOKENIZER_TYPES)}")
    if not path:
        raise ValueError("no tokenizer path given")
    if not os.path.exists(path):
        raise ValueError(f"{path}: tokenizer not found")
    if kind == "auto":
        kind = "huggingface" if os.path.isdir(path) else "sentencepiece"
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path)
    return HFTokenizer(path)


def build_tokenizer(tok_cfg):
    """TokenizerConfig (type, path) -> tokenizer."""
    return load_tokenizer(tok_cfg.path, tok_cfg.type)
