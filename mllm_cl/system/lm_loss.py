"""The language-model loss at the supervised positions only.

A causal LM's loss needs the logits of the positions whose next token is supervised (the
answer, shifted by one): a few percent of a LLaVA sequence, whose 576 image tokens and
prompt carry no label. The collator finds them from the labels (``supervised_positions``, on
the host: no device sync), ``supervised_lm_loss`` applies the output head
to those hidden states alone. The value equals transformers' loss over the full
``(batch, length, vocab)`` logits: the mean token cross-entropy in float32, labels ``-100``
ignored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mllm_cl.data.collate import next_labels, supervised_positions
from mllm_cl.data.encoding import IGNORE


@contextlib.contextmanager
def final_norm_deferred(decoder: nn.Module) -> Iterator[nn.Module]:
    """The decoder stack runs without its final norm (``decoder.norm``, per token): the ``with`` block
    gets the norm, to apply at the supervised positions only with the head. Saves the norm's
    activations at every other position (~24 KiB per token at width 4096)."""
    norm = decoder.norm
    decoder.norm = nn.Identity()
    try:
        yield norm
    finally:
        decoder.norm = norm


def supervised_lm_loss(hidden: torch.Tensor, labels: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                       positions: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``head(hidden)`` at the supervised positions.

    hidden: (B, L, d) the decoder's output; head: hidden rows -> logits (the output head, after the
    final norm where ``final_norm_deferred`` left it out); labels: (B, L), ``-100`` where not
    supervised; positions: ``supervised_positions(labels)`` if already known (e.g. computed
    on the host).
    """
    B, L, d = hidden.shape
    if positions is None:
        positions = supervised_positions(labels)
    positions = positions.to(hidden.device)
    targets = next_labels(labels.to(hidden.device)).reshape(-1).index_select(0, positions)  # (N,)
    logits = head(hidden.reshape(B * L, d).index_select(0, positions))  # (N, V)
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE)
