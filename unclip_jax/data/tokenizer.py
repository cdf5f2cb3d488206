"""One tokenizer API for CLIP, the priors and the decoder.

    tok = Tokenizer.train(captions, vocab_size=1000, context_length=64)   # from scratch (BPE)
    tok = Tokenizer.load(directory)          # ours (tokenizer.json + unclip_tokenizer.json),
                                             # or a Hugging Face CLIP directory (vocab/merges)
    tokens, mask = tok.encode(["a red square", ...])   # int32 [B, L], bool [B, L]
    tok.save(directory)

Layout of a row: [bos, ids..., eos, pad, pad, ...]; `mask` is True on bos..eos. Captions longer
than the context are truncated (the eos is kept, a warning says how many) and an empty caption
is an error: the unconditional input of guidance is the models' learned null, not "".
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Sequence

import ml_collections
import numpy as np

META_FILE = "unclip_tokenizer.json"
TOKENIZER_FILE = "tokenizer.json"
SPECIALS = ("[PAD]", "[BOS]", "[EOS]", "[UNK]")


def tokenizer_config(**kw) -> ml_collections.ConfigDict:
    """`config.tokenizer` of the clip and prior stages."""
    c = ml_collections.ConfigDict(dict(
        dir="",               # the tokenizer's directory (clip: trained and saved there if empty)
        num_captions=5000,    # training captions the clip stage builds it from
    ))
    c.update(kw)
    return c


class Tokenizer:
    """Wraps a `tokenizers.Tokenizer` (ours) or a transformers tokenizer (pretrained CLIP)."""

    def __init__(self, backend, *, context_length: int, bos_id: int, eos_id: int, pad_id: int,
                 vocab_size: int, kind: str):
        if context_length < 3:
            raise ValueError(f"tokenizer context_length must be >= 3, got {context_length}")
        self.backend, self.kind = backend, kind
        self.context_length = int(context_length)
        self.bos_id, self.eos_id, self.pad_id = int(bos_id), int(eos_id), int(pad_id)
        self.vocab_size = int(vocab_size)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def train(cls, captions: Sequence[str], *, vocab_size: int = 2000,
              context_length: int = 64) -> "Tokenizer":
        """A lower-cased byte-level-free BPE on whitespace/punctuation words of `captions`."""
        from tokenizers import Tokenizer as HFTok
        from tokenizers import models, normalizers, pre_tokenizers, trainers

        tok = HFTok(models.BPE(unk_token="[UNK]"))
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                      show_progress=False)
        tok.train_from_iterator([str(c) for c in captions], trainer)
        return cls._from_backend(tok, context_length)

    @classmethod
    def _from_backend(cls, tok, context_length):
        ids = [tok.token_to_id(s) for s in SPECIALS]
        return cls(tok, context_length=context_length, pad_id=ids[0], bos_id=ids[1],
                   eos_id=ids[2], vocab_size=tok.get_vocab_size(), kind="bpe")

    @classmethod
    def from_hf(cls, directory: str, context_length: int | None = None) -> "Tokenizer":
        """A pretrained CLIP tokenizer saved by transformers (vocab.json + merges.txt + configs).

        `from_pretrained` is used on purpose: in transformers 5, CLIPTokenizer(vocab_file=...,
        merges_file=...) silently builds a 2-token vocabulary. A gs:// directory is read through
        a local copy (transformers reads local files, or the Hub, only)."""
        from transformers import AutoTokenizer

        from unclip_jax import paths
        hf = AutoTokenizer.from_pretrained(paths.local_dir(directory))
        if hf.bos_token_id is None or hf.eos_token_id is None:
            raise ValueError(f"tokenizer in {directory!r} has no bos/eos token")
        pad = hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id
        ctx = context_length or min(int(hf.model_max_length), 10_000)
        return cls(hf, context_length=ctx, bos_id=hf.bos_token_id, eos_id=hf.eos_token_id,
                   pad_id=pad, vocab_size=len(hf), kind="hf")

    @classmethod
    def load(cls, directory: str, context_length: int | None = None) -> "Tokenizer":
        from unclip_jax import paths
        if paths.is_url(directory):   # the tokenizer libraries read local files only
            if not paths.path(directory).is_dir():
                raise FileNotFoundError(f"no tokenizer in {directory!r}: no such directory")
            directory = paths.local_dir(directory)
        meta = os.path.join(directory, META_FILE)
        if os.path.exists(meta):
            from tokenizers import Tokenizer as HFTok
            with open(meta) as f:
                m = json.load(f)
            tok = HFTok.from_file(os.path.join(directory, TOKENIZER_FILE))
            return cls._from_backend(tok, context_length or int(m["context_length"]))
        if os.path.exists(os.path.join(directory, "vocab.json")) or \
                os.path.exists(os.path.join(directory, "tokenizer_config.json")):
            return cls.from_hf(directory, context_length)
        raise FileNotFoundError(f"no tokenizer in {directory!r}: expected {META_FILE} (ours) or "
                                "vocab.json/tokenizer_config.json (Hugging Face)")

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        if self.kind == "hf":
            self.backend.save_pretrained(directory)
            return
        self.backend.save(os.path.join(directory, TOKENIZER_FILE))
        with open(os.path.join(directory, META_FILE), "w") as f:
            json.dump({"context_length": self.context_length, "kind": self.kind}, f)

    # -- encoding -------------------------------------------------------------------------------
    def _ids(self, texts: list[str]) -> list[list[int]]:
        if self.kind == "hf":
            return self.backend(texts, add_special_tokens=False)["input_ids"]
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """list[str] -> (tokens int32 [B, L], mask bool [B, L]) with L = context_length."""
        texts = [str(t) for t in texts]
        for i, t in enumerate(texts):
            if not t.strip():
                raise ValueError(f"caption {i} is empty: an empty prompt has no tokens; use the "
                                 "model's unconditional (null) input for guidance instead")
        ids = self._ids(texts)
        n, cap = len(texts), self.context_length - 2
        tokens = np.full((n, self.context_length), self.pad_id, np.int32)
        mask = np.zeros((n, self.context_length), bool)
        cut = 0
        for i, row in enumerate(ids):
            if len(row) > cap:
                cut += 1
                row = row[:cap]
            seq = [self.bos_id, *row, self.eos_id]
            tokens[i, :len(seq)] = seq
            mask[i, :len(seq)] = True
        if cut:
            warnings.warn(f"tokenizer: {cut} of {n} captions truncated to {self.context_length} "
                          "tokens (context_length)", stacklevel=2)
        return tokens, mask

    def decode(self, tokens: np.ndarray) -> list[str]:
        out = []
        for row in np.asarray(tokens):
            ids = [int(t) for t in row if t not in (self.bos_id, self.eos_id, self.pad_id)]
            out.append(self.backend.decode(ids))
        return out
