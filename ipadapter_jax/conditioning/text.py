"""Text conditioning, as diffusers' SD / SDXL pipelines and the reference training scripts compute it.

SD: the text encoder's final hidden state. SDXL: the penultimate hidden states of both encoders (CLIP ViT-L,
then OpenCLIP bigG) concatenated, the second encoder's projected pooled output as ``text_embeds``, and
``time_ids`` = (original size, crop top-left, target size). With guidance, an absent negative prompt is the
empty caption, or all zeros where the base says ``force_zeros_for_empty_prompt`` (SDXL's default).

``encode_text`` and ``sdxl_time_ids`` are pure (they run inside the jitted train step, the cache encoder and
the validation grids' encoder); ``prompt_conditioning`` is the pipeline's host-side path from prompt strings.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# A diffusers base folder's text encoders and tokenizers, in order; the encoders' names are also the keys of
# their params in the trainer's frozen tree, the ids' names the keys of a training batch.
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
TOKENIZERS = ("tokenizer", "tokenizer_2")
INPUT_IDS = ("input_ids", "input_ids_2")


def text_encoder_names(sdxl: bool) -> tuple[str, ...]:
    """The text encoders a base has: one for SD, two for SDXL (``UNetConfig.is_sdxl``)."""
    return TEXT_ENCODERS if sdxl else TEXT_ENCODERS[:1]


class TextConditioning(NamedTuple):
    context: jax.Array  # [B, T, cross_attention_dim]
    pooled: jax.Array | None  # [B, P] (SDXL's text_embeds) or None


def encode_text(encoders: Sequence[nn.Module], params: Mapping[str, Any], input_ids: Sequence[jax.Array | None]
                ) -> TextConditioning:
    """Token ids ``[B, T]`` per encoder -> the UNet's text conditioning. One encoder is SD's (final hidden
    state); two are SDXL's. ``params``: keyed by ``TEXT_ENCODERS`` names (a tree holding more, such as the
    trainer's frozen tree, is fine); ``input_ids``: in encoder order (entries past the encoders are ignored)."""
    params = [params[name] for name in TEXT_ENCODERS[:len(encoders)]]
    if len(encoders) == 1:
        out = encoders[0].apply({"params": params[0]}, input_ids[0], output_hidden_states=False)
        return TextConditioning(out.last_hidden_state, None)
    outs = [encoder.apply({"params": p}, ids) for encoder, p, ids in zip(encoders, params, input_ids)]
    return TextConditioning(jnp.concatenate([out.hidden_states[-2] for out in outs], axis=-1), outs[-1].text_embeds)


def sdxl_time_ids(original_size: jax.Array, crop_top_left: jax.Array, target_size: int | tuple[int, int]
                  ) -> jax.Array:
    """``[B, 6]`` float32: original (h, w), crop (top, left), target (h, w) as SDXL's ``add_time_ids``
    (``original_size``, ``crop_top_left``: ``[B, 2]``; ``target_size``: a side, or ``(h, w)``)."""
    target = jnp.broadcast_to(jnp.asarray(target_size, original_size.dtype), original_size.shape)
    return jnp.concatenate([original_size, crop_top_left, target], axis=-1).astype(jnp.float32)


def added_conditioning(text: TextConditioning, time_ids: jax.Array) -> dict | None:
    """The UNet's ``added_cond``: SDXL's ``{"text_embeds", "time_ids"}``, None for SD."""
    return None if text.pooled is None else {"text_embeds": text.pooled, "time_ids": time_ids}


@functools.partial(jax.jit, static_argnums=0)
def _encode_text(encoders, params, input_ids):
    return encode_text(encoders, params, input_ids)


def prompt_conditioning(encoders: Sequence[nn.Module], params: Mapping[str, Any], tokenizers: Sequence[Any],
                        prompts: Sequence[str], negative_prompts: Sequence[str] | None, guided: bool, height: int,
                        width: int, zeros_for_empty_negative: bool = False) -> tuple[jax.Array, dict | None]:
    """``(context [copies * B, T, C], added_cond or None)`` for prompt strings, the negative half first when
    ``guided``. ``tokenizers``: one ``data.tokenize.CaptionTokenizer`` per encoder. With no
    ``negative_prompts`` the negative is the empty caption, or zeros when ``zeros_for_empty_negative``
    (diffusers' ``force_zeros_for_empty_prompt``). SDXL time ids: no crop, original size = target size."""
    encoders = tuple(encoders)

    def encode(texts):
        return _encode_text(encoders, dict(params), [jnp.asarray(t(list(texts))) for t in tokenizers])

    text = encode(prompts)
    size = jnp.tile(jnp.asarray([[height, width]], jnp.int32), (len(prompts), 1))
    time_ids = sdxl_time_ids(size, jnp.zeros_like(size), (height, width))
    if guided:
        if negative_prompts is None and zeros_for_empty_negative:
            negative = jax.tree.map(jnp.zeros_like, text)
        else:
            negative = encode(negative_prompts or [""] * len(prompts))
        text = jax.tree.map(lambda n, p: jnp.concatenate([n, p]), negative, text)
        time_ids = jnp.concatenate([time_ids] * 2)
    return text.context, added_conditioning(text, time_ids)
