"""Chat templates: a conversation -> text segments, each marked trainable or not.

The loss covers assistant answers only, so a template returns segments rather
than one string: ``(text, trainable)``. ``"<image>"`` stays in the text; the
tokenizer step expands it. An assistant segment ends with the EOS token
(``eos=True``), which is trained too: the model must learn to stop.

- ``vicuna_v1`` is LLaVA-1.5's ``conv_vicuna_v1``:
  ``{system} USER: {q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT: {a2}</s>``
- ``short`` is the same without the system prompt, for tiny models on the CPU.
- ``hf`` uses the tokenizer's own ``chat_template`` (Qwen2-VL, Llama-3, ...).

``data.template: auto`` (the default) is none of these: the data module takes the
name the backbone gives in ``data_spec()["template"]``.
"""

from __future__ import annotations

from dataclasses import dataclass

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


@dataclass(frozen=True)
class Segment:
    text: str
    trainable: bool = False
    eos: bool = False  # append the tokenizer's EOS token after the text


@dataclass(frozen=True)
class ConversationTemplate:
    """``{system}{sep}USER: q ASSISTANT: a</s>USER: ...`` with configurable pieces."""

    name: str
    system: str = ""
    user: str = "USER:"
    assistant: str = "ASSISTANT:"
    sep: str = " "

    def segments(self, turns: list[tuple[str, str]], *, add_generation_prompt: bool = False) -> list[Segment]:
        out = [Segment(self.system + self.sep)] if self.system else []
        for role, text in turns:
            if role == "user":  # LLaVA: no separator after "</s>" before the next "USER:"
                out.append(Segment(f"{self.user} {text}{self.sep}{self.assistant}"))
            else:
                out.append(Segment(f" {text}", trainable=True, eos=True))
        if add_generation_prompt and (not turns or turns[-1][0] != "user"):
            raise ValueError("a generation prompt needs the conversation to end with a user turn")
        return out


TEMPLATES = {
    "vicuna_v1": ConversationTemplate("vicuna_v1", system=VICUNA_SYSTEM),
    "short": ConversationTemplate("short"),
}


def get_template(name: str) -> ConversationTemplate | str:
    """A named template, or ``"hf"`` for the tokenizer's own chat template."""
    if name == "hf":
        return name
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; choose one of {sorted(TEMPLATES) + ['hf']}")
    return TEMPLATES[name]
