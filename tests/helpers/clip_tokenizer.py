"""A tiny CLIP tokenizer written locally (nothing downloads), for the import tests."""
import transformers

from unclip_jax.models import clip_import


def write_tiny_tokenizer(d, **kw):
    """Byte-level CLIP vocabulary (every byte alone and word-final) with "red" as one token,
    saved in `d`; kw goes to from_pretrained (e.g. model_max_length, pad_token)."""
    clip_import._write_bpe_vocab(d, ["red"])
    tok = transformers.CLIPTokenizer.from_pretrained(d, **kw)
    assert len(tok) == 2 * 256 + 2 + 2  # guards against transformers' 2-token-vocabulary trap
    return tok
