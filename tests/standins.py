"""Tiny random stand-ins for the paper's four settings (merge_recipes/paper-*.yaml), built offline.

`build_paper_standins(root)` writes the layout the paper recipes expect and returns the environment
variables that point the recipes at it:

    root/models/{clip-vit-b32,roberta-base-glue,gpt2-glue,t0-3b-ia3}/<task>/   fine-tunes / adapters
    root/models/bases/{clip,roberta,gpt2,t0}/                                 pre-trained bases
    root/data/{vision,glue,t0}/<task>/{validation,test,router}.jsonl

Same architectures as the real checkpoints (CLIPModel + CLIPForImageClassification, RoBERTa MLM +
sequence classification, GPT-2 LM + sequence classification, T5 gated-gelu + PEFT IA3), 2 layers,
width 16. Weights are random; only shapes, names, configs and data columns matter to `validate`.
CLIP, the GPT-2 base, tokenizers, images and choice rows come from mergetool.testing.toy_kinds.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import transformers as tf

from mergetool.testing.toy import write_jsonl
from mergetool.testing.toy_kinds import (
    VOCAB,
    make_kind_zoo,
    make_tiny_gpt2,
    write_choice_rows,
    write_tiny_images,
    write_tiny_tokenizer,
)

tf.logging.set_verbosity_error()
tf.logging.disable_progress_bar()

LAYERS = 2
H = dict(hidden_size=16, num_attention_heads=2, intermediate_size=32)
WORDS = [f"w{i}" for i in range(40)]

VISION = {"sun397": 397, "cars": 196, "resisc45": 45, "eurosat": 10, "svhn": 10, "gtsrb": 43, "mnist": 10,
          "dtd": 47}
# task -> (classes, text column, text_pair column); GLUE's own column names; 1 class = regression
GLUE = {"cola": (2, "sentence", None), "sst2": (2, "sentence", None), "mrpc": (2, "sentence1", "sentence2"),
        "stsb": (1, "sentence1", "sentence2"), "qqp": (2, "question1", "question2"),
        "mnli": (3, "premise", "hypothesis"), "qnli": (2, "question", "sentence"),
        "rte": (2, "sentence1", "sentence2")}
GLUE7 = [t for t in GLUE if t != "stsb"]
T0_TASKS = {"rte": 2, "cb": 3, "winogrande": 2, "wic": 2, "wsc": 2, "copa": 2, "hellaswag": 4,
            "story_cloze": 2, "anli_r1": 3, "anli_r2": 3, "anli_r3": 3}
SPLITS = ("validation", "test", "router")


def _perturb(model, seed: int, noise: float = 0.01) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _copy_shared(base, model) -> None:
    """Start a fine-tune from the base: copy every tensor both have under the same name."""
    own = model.state_dict()
    shared = {k: v for k, v in base.state_dict().items() if k in own and own[k].shape == v.shape}
    assert len(shared) > len(own) // 2, "base and fine-tune do not line up"
    model.load_state_dict(shared, strict=False)


def _labels(n: int) -> dict:
    return {"num_labels": n, "id2label": {i: f"c{i}" for i in range(n)}, "label2id": {f"c{i}": i for i in range(n)}}


def write_roberta_tokenizer(path: Path) -> int:
    """A word-level RoBERTa-style tokenizer (<s> A </s></s> B </s>) over 5 specials + w0..w39; its size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                               eos_token="</s>", cls_token="<s>", sep_token="</s>", mask_token="<mask>",
                               model_input_names=["input_ids", "attention_mask"]).save_pretrained(path)
    return len(vocab)


def _text(i: int, n: int = 5) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n))


# --- CLIP ViT-B/32 on 8 vision tasks ------------------------------------------------------------

def clip_vision8(root: Path) -> dict:
    base, tasks = make_kind_zoo(root / "models" / "clip-zoo", "clip", n_tasks=len(VISION), layers=LAYERS,
                                labels=tuple(VISION.values()))  # CLIPModel base, CLIPForImageClassification
    (root / "models" / "bases").mkdir(exist_ok=True)
    (root / "models" / "clip-vit-b32").mkdir()
    base_dir = base.rename(root / "models" / "bases" / "clip")
    for t, (task, n) in enumerate(VISION.items()):
        tasks[t].rename(root / "models" / "clip-vit-b32" / task)
        for i, split in enumerate(SPLITS):
            write_tiny_images(root / "data" / "vision" / task, 3, n, seed=10 * t + i, name=f"{split}.jsonl")
    return {"MERGETOOL_CLIP_BASE": str(base_dir)}


# --- RoBERTa-base on GLUE-8 and GPT-2 on GLUE-7 ---------------------------------------------------

def _glue_data(root: Path, tasks: list[str]) -> None:
    for task in tasks:
        n, col, pair = GLUE[task]
        rows = []
        for i in range(6):
            row = {"idx": i, col: _text(i), "label": round(0.7 * i, 2) if n == 1 else i % n}
            if pair:
                row[pair] = _text(i + 11, 4)
            rows.append(row)
        for split in SPLITS:
            write_jsonl(root / "data" / "glue" / task / f"{split}.jsonl", rows)


def roberta_glue8(root: Path) -> dict:
    base_dir = root / "models" / "bases" / "roberta"
    config = tf.RobertaConfig(vocab_size=write_roberta_tokenizer(base_dir), num_hidden_layers=LAYERS,
                              max_position_embeddings=40, pad_token_id=1, bos_token_id=0, eos_token_id=2, **H)
    torch.manual_seed(0)
    base = tf.RobertaForMaskedLM(config).eval()  # like the hub's roberta-base: lm_head stays base-only
    base.save_pretrained(base_dir)
    for t, task in enumerate(GLUE):
        config = tf.RobertaConfig.from_pretrained(base_dir, **_labels(GLUE[task][0]))
        model = tf.RobertaForSequenceClassification(config)
        _copy_shared(base, model)
        _perturb(model, 200 + t)
        model.save_pretrained(root / "models" / "roberta-base-glue" / task)
    _glue_data(root, list(GLUE))
    return {"MERGETOOL_ROBERTA_BASE": str(base_dir)}


def gpt2_glue7(root: Path) -> dict:
    base_dir = make_tiny_gpt2(root / "models" / "bases" / "gpt2", layers=LAYERS)  # LM head tied, like gpt2
    base = tf.GPT2LMHeadModel.from_pretrained(base_dir)
    for t, task in enumerate(GLUE7):
        model = tf.GPT2ForSequenceClassification(tf.GPT2Config.from_pretrained(base_dir, **_labels(GLUE[task][0])))
        _copy_shared(base, model)
        _perturb(model, 300 + t)
        model.save_pretrained(root / "models" / "gpt2-glue" / task)
    _glue_data(root, GLUE7)
    return {"MERGETOOL_GPT2_BASE": str(base_dir)}


# --- T0-3B with (IA)3 on 11 tasks ---------------------------------------------------------------------

def t0_ia3_11(root: Path) -> dict:
    from peft import IA3Config, TaskType, get_peft_model

    config = tf.T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=LAYERS,
                         num_heads=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                         decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)  # T0 = T5 v1.1 LM-adapted
    torch.manual_seed(0)
    base_dir = root / "models" / "bases" / "t0"
    tf.T5ForConditionalGeneration(config).save_pretrained(base_dir)
    write_tiny_tokenizer(base_dir, "t5")
    with warnings.catch_warnings():  # peft calls a transformers method deprecated in v5
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(tf.T5ForConditionalGeneration.from_pretrained(base_dir),
                                    IA3Config(task_type=TaskType.SEQ_2_SEQ_LM))  # k, v and wo, as in T-Few
    for t, (task, n) in enumerate(T0_TASKS.items()):
        g = torch.Generator().manual_seed(400 + t)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "ia3_l" in name:
                    p.copy_(1 + 0.05 * torch.randn(p.shape, generator=g))
        out = root / "models" / "t0-3b-ia3" / task
        peft_model.save_pretrained(out)
        cfg = json.loads((out / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = "bigscience/T0_3B"
        (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        for i, split in enumerate(SPLITS):
            write_choice_rows(root / "data" / "t0" / task / f"{split}.jsonl", 3, n_choices=n, seed=10 * t + i)
    return {"MERGETOOL_T0_BASE": str(base_dir)}


BUILDERS = {"clip": clip_vision8, "roberta": roberta_glue8, "gpt2": gpt2_glue7, "t0": t0_ia3_11}


def build_paper_standins(root: Path, which=tuple(BUILDERS)) -> dict:
    """Build the stand-ins for `which` settings under `root`; returns the env vars for the recipes."""
    root = Path(root)
    env = {"MERGETOOL_PAPER_DIR": str(root / "models"), "MERGETOOL_PAPER_DATA": str(root / "data")}
    for key in which:
        env.update(BUILDERS[key](root))
    return env
