"""ComposedMLLM: a frozen vision tower, a projector and any transformers causal LM.

LLaVA's recipe: image patch features are projected into the LLM's embedding
space and replace the ``<image>`` placeholder tokens of the prompt, one
placeholder per image feature (``num_image_tokens`` per image).

Saved as a directory::

    mllm_cl.json        what is where (vision kind, projector shape, image token)
    vision/             the vision tower (transformers save_pretrained, or timm safetensors)
    projector.safetensors
    llm/                the causal LM and its tokenizer (save_pretrained)

and loaded back with the libraries' own ``from_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mllm_cl.backbones.checkpointing import set_activation_checkpointing
from mllm_cl.backbones.kv_cache import cache_kwargs, take_cache
from mllm_cl.backbones.loading import load_options
from mllm_cl.backbones.vision import VisionTower, load_vision_tower, read_json
from mllm_cl.experts import expert_layers

FORMAT = "mllm-cl/composed-mllm"
FORMAT_VERSION = 1


def projector(vision_size: int, llm_size: int) -> nn.Sequential:
    """LLaVA-1.5's ``mlp2x_gelu`` projector."""
    return nn.Sequential(nn.Linear(vision_size, llm_size), nn.GELU(), nn.Linear(llm_size, llm_size))


class ComposedMLLM(nn.Module):
    """Vision tower + projector + causal LM.

    Args:
        vision: the vision tower (frozen unless ``freeze_vision=False``).
        language_model: any ``AutoModelForCausalLM`` model.
        image_token_id: the prompt placeholder replaced by image features.
        projector_module: maps vision features to the LLM width (default: a fresh 2-layer MLP).
        template: the chat template ``data.template: auto`` takes (saved in ``mllm_cl.json``;
            a directory that records none: ``vicuna_v1``, LLaVA-1.5's).
    """

    def __init__(
        self,
        vision: VisionTower,
        language_model: nn.Module,
        *,
        image_token_id: int,
        projector_module: nn.Module | None = None,
        freeze_vision: bool = True,
        template: str = "vicuna_v1",
    ) -> None:
        super().__init__()
        self.vision = vision
        self.language_model = language_model
        hidden = language_model.get_input_embeddings().embedding_dim
        self.projector = projector_module or projector(vision.hidden_size, hidden)
        self.image_token_id = image_token_id
        self.template = template
        if freeze_vision:
            self.vision.requires_grad_(False)

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_tokens

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @property
    def image_mean(self) -> tuple[float, ...]:
        return tuple(self.vision.mean)

    @property
    def image_std(self) -> tuple[float, ...]:
        return tuple(self.vision.std)

    def data_spec(self) -> dict:
        """What the data module needs to know about this model's inputs (``TaskSequence.connect``)."""
        return {"num_image_tokens": self.num_image_tokens, "image_token_id": self.image_token_id,
                "template": self.template}

    @property
    def config(self):
        return self.language_model.config

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def image_embeddings(self, pixel_values: torch.Tensor, **model_inputs) -> torch.Tensor:
        """(n_images, llm_hidden): each image's projected features, mean-pooled (what the LLM reads)."""
        return self.encode_images(pixel_values).mean(1)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n_images, 3, H, W) -> (n_images, num_image_tokens, llm_hidden)."""
        return self.projector(self.vision(pixel_values))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with image features in place of the ``<image>`` tokens.

        Images fill the placeholders in order: image ``i`` takes the ``i``-th
        run of ``num_image_tokens`` placeholders, so text-only samples in a
        batch simply have no placeholders and no image.
        """
        embed_tokens = self.language_model.get_input_embeddings()
        mask = input_ids == self.image_token_id  # (B, L)
        embeds = embed_tokens(input_ids.masked_fill(mask, 0))  # (B, L, d)
        n_slots = int(mask.sum())
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if n_slots != n_images * self.num_image_tokens:
            raise ValueError(
                f"the batch has {n_slots} image tokens (id {self.image_token_id}) but {n_images} images "
                f"x {self.num_image_tokens} tokens per image = {n_images * self.num_image_tokens}; "
                "expand each <image> to num_image_tokens placeholders when tokenizing"
            )
        if n_images == 0:
            return embeds
        feats = self.encode_images(pixel_values).to(embeds.dtype)  # (n, T, d)
        return embeds.masked_scatter(mask.unsqueeze(-1), feats.reshape(-1, feats.shape[-1]))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        hidden_only: bool = False,
        **kwargs,
    ):
        """The LM's output (logits, and the loss with ``labels``); ``hidden_only``: the decoder's output
        alone (``last_hidden_state``, after the final norm), without the output head, for a loss that
        applies ``output_head`` at the supervised positions only."""
        cache = take_cache(kwargs)  # `cache` or `past_key_values`: handed on under the name the LLM takes
        if cache is not None and cache.get_seq_length() > 0:  # decoding: new tokens are text, even an <image> id
            embeds = self.language_model.get_input_embeddings()(input_ids)
        else:
            embeds = self.embed(input_ids, pixel_values)
        if hidden_only:
            if labels is not None:
                raise ValueError("hidden_only returns no loss: apply output_head to the positions that need it")
            return self.language_model.base_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                                  **cache_kwargs(self.language_model, cache), **kwargs)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels,
                                   **cache_kwargs(self.language_model, cache), **kwargs)

    @property
    def output_head(self) -> nn.Module:
        """The LM's output projection (hidden -> vocabulary logits)."""
        return self.language_model.get_output_embeddings()

    @property
    def text_decoder(self) -> nn.Module:
        """The LM's decoder stack (its ``norm`` is the final norm before ``output_head``)."""
        return self.language_model.base_model

    def set_checkpointing(self, enabled: bool, *, context_fn=None) -> None:
        """Activation checkpointing of the LM's decoder layers (the vision tower is frozen and keeps nothing
        for backward)."""
        set_activation_checkpointing(self.language_model, enabled, context_fn=context_fn)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """transformers' ``generate`` on the merged embeddings; returns the new tokens only.

        Routers that route on the whole prompt would re-route on every decoded
        token here; evaluation uses ``mllm_cl.eval.generation.greedy_generate``.
        """
        whole = [type(r).__name__ for layer in self._expert_layers() for r in layer.routers.values() if r.whole_input]
        if whole:
            raise RuntimeError(f"{whole[0]} routes on the whole prompt and would re-route every decoded token under "
                               "transformers' generate; use mllm_cl.eval.generation.greedy_generate")
        embeds = self.embed(input_ids, pixel_values)
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)

    # ------------------------------------------------------------- save / load
    def _expert_layers(self):
        return expert_layers(self).values()

    def save_pretrained(self, directory: str | Path, tokenizer=None) -> None:
        """Save the base model. Adapters are saved by the run's checkpoints, not here: with
        expert layers injected the base weights sit under ``base_layer`` and would not reload."""
        if any(True for _ in self._expert_layers()):
            raise RuntimeError("save_pretrained saves the base model only; this model has expert layers injected "
                               "(their adapters go to RUN/checkpoints). Save the backbone before injecting experts.")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        vision_spec = self.vision.save(directory / "vision")
        save_file({k: v.contiguous() for k, v in self.projector.state_dict().items()},
                  directory / "projector.safetensors")
        self.language_model.save_pretrained(directory / "llm")
        if tokenizer is not None:
            tokenizer.save_pretrained(directory / "llm")
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "vision": vision_spec,
            "projector": {"vision_size": self.vision.hidden_size, "llm_size": self.projector[-1].out_features},
            "image_token_id": self.image_token_id,
            "template": self.template,
        }
        (directory / "mllm_cl.json").write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, torch_dtype: torch.dtype | None = None,
                        attn_implementation: str | None = None,
                        device: torch.device | str | None = None) -> ComposedMLLM:
        from transformers import AutoModelForCausalLM  # heavy: transformers' auto classes load their code on first use

        directory = Path(directory)
        meta = read_json(directory / "mllm_cl.json")
        if meta.get("format") != FORMAT:
            raise ValueError(f"{directory / 'mllm_cl.json'}: format is {meta.get('format')!r}, expected {FORMAT!r}")
        vision = load_vision_tower(directory / "vision", meta["vision"])
        llm = AutoModelForCausalLM.from_pretrained(directory / "llm", dtype=torch_dtype,
                                                   **load_options(attn_implementation, device))
        proj = projector(meta["projector"]["vision_size"], meta["projector"]["llm_size"])
        proj.load_state_dict(load_file(directory / "projector.safetensors"))
        model = cls(vision, llm, image_token_id=meta["image_token_id"], projector_module=proj,
                    template=meta.get("template", "vicuna_v1"))
        return model.to(device=device, dtype=torch_dtype)  # the tower and projector (small) follow
