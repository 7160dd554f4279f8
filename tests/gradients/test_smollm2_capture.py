"""The packaged SmolLM2 (a real Llama decoder from a GGUF file): load, capture, its span."""

from __future__ import annotations

import pytest
import torch

from gradaudit import capture, select_modules
from gradaudit.model.batch import make_batch
from gradaudit.model.families import layout

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def test_smollm2_layer_2_query_gradient_spans_the_tokens_it_saw(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and layout(model).num_layers == 30
    text = "it 's a charming and often affecting journey ."
    batch = make_batch(model, tokenizer, [text])
    (name,) = select_modules(model, "query@2")
    assert name == "model.layers.2.self_attn.q_proj"
    seen = []
    hook = model.get_submodule(name).register_forward_hook(
        lambda module, args, out: seen.append(args[0].detach()[0])
    )
    try:
        snapshot = capture(model, batch, [name])
    finally:
        hook.remove()
    inputs = seen[0].double()  # (tokens, 576)
    basis = torch.linalg.svd(snapshot.weight_gradient(name).double(), full_matrices=False)[2]
    tokens = inputs.shape[0]
    # Invisible to a query: the last token (it predicts nothing) and the first (it attends to
    # itself alone, so its query changes nothing). The others' inputs span the gradient's rows.
    rows = basis[: tokens - 2]

    def residual(x: torch.Tensor) -> torch.Tensor:
        return (x - (x @ rows.T) @ rows).norm(dim=-1) / x.norm(dim=-1)

    assert residual(inputs[1:-1]).max() < 1e-4
    assert residual(torch.randn(4, inputs.shape[1], dtype=torch.float64)).min() > 0.9
    assert tokenizer.decode(snapshot.batch["input_ids"][0]) == text
