"""Tokenizer files of an exported folder, and loading the tokenizer back.

A sentencepiece model is written twice: `tokenizer.model` (read by megapeer and
sentencepiece, exact) and `tokenizer.json` (a `tokenizers` BPE with byte fallback built
from the same pieces and merges, read by AutoTokenizer). tokenizer.json reproduces
sentencepiece's ids for BPE models trained by megapeer (identity normalisation,
whitespace kept); tests/test_hf_export.py compares the two.
"""
import json
import os

from ..data.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer
from .checkpoint_io import ConversionError

MARKER = "megapeer_tokenizer"


def tokenizer_for_checkpoint(cfg, override=None):
    """The tokenizer named by --tokenizer, else by the checkpoint's data.tokenizer."""
    path = override or cfg.data.tokenizer.path
    kind = "auto" if override else cfg.data.tokenizer.type
    if not path:
        raise ConversionError("the checkpoint's config names no tokenizer (data.tokenizer.path); "
                              "pass --tokenizer PATH or --no-tokenizer")
    try:
        return load_tokenizer(path, kind)
    except ValueError as e:
        src = "--tokenizer" if override else "data.tokenizer in the checkpoint's megapeer.yaml"
        raise ConversionError(f"tokenizer from {src}: {e}") from None


def special_ids(tok) -> dict:
    return {"bos_token_id": tok.bos, "eos_token_id": tok.eod, "pad_token_id": tok.pad}


def _spm_tokenizer_json(model_path, sp):
    """A `tokenizers` Tokenizer equivalent to a sentencepiece BPE model."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    try:
        from transformers.tokenization_utils_sentencepiece import SentencePieceExtractor
    except ImportError:  # transformers 4
        from transformers.convert_slow_tokenizer import SentencePieceExtractor

    extracted = SentencePieceExtractor(model_path).extract()
    vocab, merges = extracted[0], extracted[-1]
    unk = sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True,
                               fuse_unk=True))
    tok.normalizer = normalizers.Sequence(_normalizers(_proto(sp).normalizer_spec))
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    special = [sp.id_to_piece(i) for i in range(sp.get_piece_size())
               if sp.is_control(i) or sp.is_unknown(i)]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
    return tok


def save_tokenizer(tok, folder, max_length=None):
    """Write the tokenizer files into an export folder."""
    os.makedirs(folder, exist_ok=True)
    tok.save(folder)                       # sentencepiece: tokenizer.model
    if not isinstance(tok, SentencePieceTokenizer):
        return
    sp = tok.sp
    model_path = os.path.join(folder, "tokenizer.model")
    bpe = _is_bpe(sp)                      # unigram: AutoTokenizer converts tokenizer.model
    if bpe:
        _spm_tokenizer_json(model_path, sp).save(os.path.join(folder, "tokenizer.json"))

    def piece(i):
        return sp.id_to_piece(i) if i is not None and i >= 0 else None

    conf = {"tokenizer_class": "PreTrainedTokenizerFast" if bpe else "LlamaTokenizer",
            "bos_token": piece(tok.bos), "eos_token": piece(tok.eod),
            "unk_token": piece(sp.unk_id()), "pad_token": piece(tok.pad),
            "add_bos_token": False, "add_eos_token": False,
            "clean_up_tokenization_spaces": False, MARKER: "sentencepiece"}
    if max_length:
        conf["model_max_length"] = max_length
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({k: v for k, v in conf.items() if v is not None}, f, indent=2)


def _proto(sp):
    from sentencepiece import sentencepiece_model_pb2 as pb
    proto = pb.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    return proto


def _is_bpe(sp):
    from sentencepiece import sentencepiece_model_pb2 as pb
    return _proto(sp).trainer_spec.model_type == pb.TrainerSpec.BPE


def _normalizers(spec):
    """sentencepiece's normaliser settings as `tokenizers` normalisers (NFKC approximates
    sentencepiece's nmt_nfkc tables; megapeer trains with identity)."""
    from tokenizers import Regex, normalizers
    out = []
    if "nfkc" in spec.name:
        out.append(normalizers.NFKC())
    if spec.remove_extra_whitespaces:
        out += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        out.append(normalizers.Prepend("\u2581"))
    out.append(normalizers.Replace(" ", "\u2581"))
    return out


def load_folder_tokenizer(folder):
    """megapeer's tokenizer for an exported folder (sentencepiece when it was one)."""
    conf_path = os.path.join(folder, "tokenizer_config.json")
    conf = {}
    if os.path.isfile(conf_path):
        with open(conf_path) as f:
            conf = json.load(f)
    spm_path = os.path.join(folder, "tokenizer.model")
    try:
        if conf.get(MARKER) == "sentencepiece" and os.path.isfile(spm_path):
            return SentencePieceTokenizer(spm_path)
        return HFTokenizer(folder)
    except ValueError as e:
        raise ConversionError(f"{folder}: no usable tokenizer ({e})") from None
