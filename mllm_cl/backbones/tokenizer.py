"""Offline tokenizers: nothing is downloaded, everything saves and reloads via ``AutoTokenizer``.

``byte_tokenizer()`` is a byte-level BPE with no merges: every UTF-8 byte is
a token, so it needs no training data and no files. ``train_bpe_tokenizer``
learns merges from a corpus (e.g. the synthetic benchmark's text) for
shorter sequences; the result is stored with the model it belongs to.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, IMAGE]


def _byte_alphabet() -> list[str]:
    return pre_tokenizers.ByteLevel.alphabet()


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE},
        # Batched generation appends on the right of the prompt: pad on the left.
        padding_side="left",
    )
    return fast


def _base(model: models.Model) -> Tokenizer:
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 261-token byte-level tokenizer: 5 special tokens, then the 256 byte symbols."""
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for sym in sorted(_byte_alphabet()):
        vocab[sym] = len(vocab)
    tok = _base(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.add_special_tokens(SPECIAL_TOKENS)
    return _wrap(tok)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``texts`` (deterministic for the same texts)."""
    tok = _base(models.BPE(unk_token=UNK))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=_byte_alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(tok)
