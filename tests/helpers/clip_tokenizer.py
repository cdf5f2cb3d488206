"""A tiny CLIP tokenizer written locally (nothing downloads), for the import tests."""
import json
import os

import transformers


def write_tiny_tokenizer(d, **kw):
    """A byte-level CLIP vocabulary (every byte alone and word-final) plus two merges, saved in
    `d`; kw goes to from_pretrained (e.g. model_max_length, pad_token)."""
    from tokenizers.pre_tokenizers import ByteLevel

    chars = ByteLevel.alphabet()
    merges = [("r", "e"), ("re", "d</w>")]
    vocab = sorted(chars) + [c + "</w>" for c in sorted(chars)] + [a + b for a, b in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(d, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(d, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = transformers.CLIPTokenizer.from_pretrained(d, **kw)
    assert len(tok) == len(vocab)  # guards against transformers' 2-token-vocabulary trap
    return tok
