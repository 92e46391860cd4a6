"""Stage-by-stage forwards: embeddings → layer 0 … layer N-1 → head, per architecture.

Each stage does exactly what the model's own forward does at that point (same ops, same order), so
a staged run gives the same numbers as the plain forward and the hidden states after any stage can
be cached and reused by every chain that shares that prefix.

A state between stages is a pair (hidden states, extras); extras carry what later stages need
(the attention mask, positions, the choice targets). `staging(module)` returns a `Staging` for the
supported architectures, else None: BERT/RoBERTa classifiers, ViT and CLIP image classifiers, GPT-2
and Llama causal LMs (their head reduces logits to choice log-likelihoods, see choice.py).

This is the only staged forward in mergetool: the runtime (inference) runs BERT-like backbones through
`encoder_embed`, `encoder_mask` and `encoder_layers` below, the same functions the search evaluates
with. Attention masks come from `mergetool.core.compat`, which builds them with transformers' public mask
functions, never a model's private helpers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from mergetool.core.compat import bidirectional_mask, causal_mask
from mergetool.evaluation.choice import choice_logprobs


@dataclass
class Staging:
    n_layers: int
    embed: Callable  # batch -> state
    layer: Callable  # i -> (state -> state)
    head: Callable  # state -> outputs


def staging(module) -> Optional[Staging]:
    name = type(module).__name__
    if name in ("BertForSequenceClassification", "RobertaForSequenceClassification",
                "XLMRobertaForSequenceClassification"):
        return _bert(module)
    if name == "ViTForImageClassification":
        return _vit(module)
    if name == "CLIPForImageClassification":
        return _clip(module)
    if name == "GPT2LMHeadModel":
        return _gpt2(module)
    if name == "LlamaForCausalLM":
        return _llama(module)
    return None


def encoder_embed(backbone, batch: dict) -> torch.Tensor:
    """Stage 0 of a BERT-like encoder: the embeddings of the token ids."""
    return backbone.embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))


def encoder_mask(backbone, attention_mask: torch.Tensor, h: torch.Tensor):
    """The mask the encoder layers take for a padding mask, as the encoder's own forward builds it."""
    return bidirectional_mask(backbone.config, h, attention_mask)


def encoder_layers(backbone, h: torch.Tensor, mask, start: int, stop: int) -> torch.Tensor:
    """Encoder layers [start, stop) on hidden states h."""
    for block in backbone.encoder.layer[start:stop]:
        h = _hidden(block(h, mask))
    return h


def _hidden(out):
    return out[0] if isinstance(out, tuple) else out


def _bert(m) -> Staging:
    backbone = getattr(m, "bert", None) or getattr(m, "roberta")

    def embed(batch):
        h = encoder_embed(backbone, batch)
        return h, encoder_mask(backbone, batch["attention_mask"], h)

    def layer(i):
        return lambda state: (encoder_layers(backbone, state[0], state[1], i, i + 1), state[1])

    if hasattr(m, "bert"):
        head = lambda state: m.classifier(m.dropout(backbone.pooler(state[0])))  # noqa: E731
    else:
        head = lambda state: m.classifier(state[0])  # noqa: E731
    return Staging(len(backbone.encoder.layer), embed, layer, head)


def _vit(m) -> Staging:
    vit = m.vit

    def embed(batch):
        pixels = batch["pixel_values"].to(vit.embeddings.patch_embeddings.projection.weight.dtype)
        h = vit.embeddings(pixels, bool_masked_pos=None, interpolate_pos_encoding=None)
        return h, bidirectional_mask(vit.config, h, None)

    def layer(i):
        block = vit.layers[i]
        return lambda state: (_hidden(block(state[0], state[1])), state[1])

    return Staging(len(vit.layers), embed, layer, lambda state: m.classifier(vit.layernorm(state[0])[:, 0, :]))


def _clip(m) -> Staging:
    vm = m.vision_model

    def embed(batch):
        h = vm.embeddings(batch["pixel_values"], interpolate_pos_encoding=False)
        return vm.pre_layrnorm(h), None

    def layer(i):
        block = vm.encoder.layers[i]
        return lambda state: (block(state[0], None), None)

    return Staging(len(vm.encoder.layers), embed, layer,
                   lambda state: m.classifier(torch.mean(state[0][:, 1:, :], dim=1)))


def _targets(batch) -> dict:
    return {k: batch[k] for k in ("target_ids", "target_mask") if k in batch}


def _lm_head(m, norm) -> Callable:
    def head(state):
        logits = m.lm_head(norm(state[0]))
        return choice_logprobs(logits, state[1]["targets"]) if state[1]["targets"] else logits
    return head


def _gpt2(m) -> Staging:
    tr = m.transformer

    def embed(batch):
        ids = batch["input_ids"]
        inputs_embeds = tr.wte(ids)
        pos = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)).unsqueeze(0)
        h = inputs_embeds + tr.wpe(pos).to(inputs_embeds.device)
        mask = batch.get("attention_mask")
        if mask is not None and mask.ndim < 4:
            mask = mask.view(ids.shape[0], -1)
        causal = causal_mask(tr.config, inputs_embeds, mask, pos)
        return tr.drop(h), {"mask": causal, "pos": pos, "targets": _targets(batch)}

    def layer(i):
        block = tr.h[i]

        def run(state):
            x = state[1]
            return _hidden(block(state[0], attention_mask=x["mask"], use_cache=False, position_ids=x["pos"])), x
        return run

    return Staging(len(tr.h), embed, layer, _lm_head(m, tr.ln_f))


def _llama(m) -> Staging:
    model = m.model

    def embed(batch):
        h = model.embed_tokens(batch["input_ids"])
        pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        causal = causal_mask(model.config, h, batch.get("attention_mask"), pos)
        rope = model.rotary_emb(h, position_ids=pos)
        return h, {"mask": causal, "pos": pos, "rope": rope, "targets": _targets(batch)}

    def layer(i):
        block = model.layers[i]

        def run(state):
            x = state[1]
            return _hidden(block(state[0], attention_mask=x["mask"], position_ids=x["pos"], use_cache=False,
                                 position_embeddings=x["rope"])), x
        return run

    return Staging(len(model.layers), embed, layer, _lm_head(m, model.norm))
