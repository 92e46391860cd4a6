"""Stage-by-stage forwards: embeddings → layer 0 … layer N-1 → head, per architecture.

Each stage does exactly what the model's own forward does at that point (same ops, same order), so
a staged run gives the same numbers as the plain forward and the hidden states after any stage can
be cached and reused by every chain that shares that prefix.

A state between stages is a pair (hidden states, extras); extras carry what later stages need
(the attention mask, positions, the choice targets). `staging(module)` returns a `Staging` for the
supported architectures, else None: BERT/RoBERTa classifiers, ViT and CLIP image classifiers, GPT-2
and Llama causal LMs (their head reduces logits to choice log-likelihoods, see choice.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

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


def _bert(m) -> Staging:
    backbone = getattr(m, "bert", None) or getattr(m, "roberta")

    def embed(batch):
        h = backbone.embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))
        mask = backbone._create_attention_masks(attention_mask=batch["attention_mask"],
                                                encoder_attention_mask=None, embedding_output=h,
                                                encoder_hidden_states=None, past_key_values=None)[0]
        return h, mask

    def layer(i):
        block = backbone.encoder.layer[i]
        return lambda state: (block(state[0], state[1]), state[1])

    if hasattr(m, "bert"):
        head = lambda state: m.classifier(m.dropout(backbone.pooler(state[0])))  # noqa: E731
    else:
        head = lambda state: m.classifier(state[0])  # noqa: E731
    return Staging(len(backbone.encoder.layer), embed, layer, head)


def _vit(m) -> Staging:
    from transformers.masking_utils import create_bidirectional_mask

    vit = m.vit

    def embed(batch):
        pixels = batch["pixel_values"].to(vit.embeddings.patch_embeddings.projection.weight.dtype)
        h = vit.embeddings(pixels, bool_masked_pos=None, interpolate_pos_encoding=None)
        return h, create_bidirectional_mask(config=vit.config, inputs_embeds=h, attention_mask=None)

    def layer(i):
        block = vit.layers[i]
        return lambda state: (block(state[0], state[1]), state[1])

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
    from transformers.masking_utils import create_causal_mask

    tr = m.transformer

    def embed(batch):
        ids = batch["input_ids"]
        inputs_embeds = tr.wte(ids)
        pos = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)).unsqueeze(0)
        h = inputs_embeds + tr.wpe(pos).to(inputs_embeds.device)
        mask = batch.get("attention_mask")
        if mask is not None and mask.ndim < 4:
            mask = mask.view(ids.shape[0], -1)
        causal = create_causal_mask(config=tr.config, inputs_embeds=inputs_embeds, attention_mask=mask,
                                    past_key_values=None, position_ids=pos)
        return tr.drop(h), {"mask": causal, "pos": pos, "targets": _targets(batch)}

    def layer(i):
        block = tr.h[i]

        def run(state):
            x = state[1]
            return block(state[0], None, x["mask"], None, encoder_attention_mask=None, use_cache=False,
                         position_ids=x["pos"]), x
        return run

    return Staging(len(tr.h), embed, layer, _lm_head(m, tr.ln_f))


def _llama(m) -> Staging:
    from transformers.masking_utils import create_causal_mask

    model = m.model

    def embed(batch):
        h = model.embed_tokens(batch["input_ids"])
        pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        causal = create_causal_mask(config=model.config, inputs_embeds=h, attention_mask=batch.get("attention_mask"),
                                    past_key_values=None, position_ids=pos)
        rope = model.rotary_emb(h, position_ids=pos)
        return h, {"mask": causal, "pos": pos, "rope": rope, "targets": _targets(batch)}

    def layer(i):
        block = model.layers[i]

        def run(state):
            x = state[1]
            return block(state[0], attention_mask=x["mask"], position_ids=x["pos"], past_key_values=None,
                         use_cache=False, position_embeddings=x["rope"]), x
        return run

    return Staging(len(model.layers), embed, layer, _lm_head(m, model.norm))
