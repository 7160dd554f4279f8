"""The last token of each sentence, read off the gradient exactly.

No module's gradient has a row for a causal LM's last token (it predicts nothing), but it is
the label of the position before it, t*. The gradient is `G = D^T X`: X the module inputs of
every recovered prefix position (rows), D their backward signals. With X of full row rank, one
least-squares solve gives D. Position t*'s signal comes from its own loss term alone (nothing
after it has a loss), so `N d = J^T W^T (p - e_y)`: N the batch's predicted positions, p the
model's softmax at t*, W the output embeddings, J the Jacobian of t*'s final hidden state in
t*'s module output. So `J^T w_y = J^T W^T p - N d`, and every token y of the vocabulary is
tested at once by one matmul (`W J`). The result is checked end to end: the whole recovered
batch's gradient against the observed one (`gradient_residual`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from gradaudit.attacks.causal.prefix import cache_argument


class LastTokens:
    """Exact last tokens of a causal LM's sentences given their prefixes (see module doc)."""

    def __init__(self, model: nn.Module, module: str, observed: torch.Tensor) -> None:
        self.model = model
        self.module = model.get_submodule(module)
        self.weight = self.module.weight
        self.observed = observed.to(device=self.weight.device, dtype=torch.float64)
        self.heads = model.get_output_embeddings().weight.detach()
        self.cache_arg = cache_argument(model)

    def _padded(self, prefixes: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(int(p.shape[0]) for p in prefixes)
        tokens = torch.zeros(len(prefixes), width, dtype=torch.long, device=self.weight.device)
        mask = torch.zeros_like(tokens)
        for b, p in enumerate(prefixes):
            tokens[b, : len(p)], mask[b, : len(p)] = p, 1
        return tokens, mask

    @torch.no_grad()
    def prefix_pass(self, prefixes: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Module inputs of every prefix position, stacked (sum of lengths, in), and each
        sentence's next-token probabilities at its last prefix position (B, V)."""
        tokens, mask = self._padded(prefixes)
        seen: list[torch.Tensor] = []
        hook = self.module.register_forward_hook(lambda m, a, o: seen.append(a[0]))
        try:
            logits = self.model(input_ids=tokens, attention_mask=mask).logits
        finally:
            hook.remove()
        x = seen[0].reshape(*tokens.shape, -1)[mask.bool()]
        ends = mask.sum(1) - 1
        return x.double(), logits[torch.arange(len(prefixes)), ends].double().softmax(-1)

    def jacobian(self, prefix: torch.Tensor) -> torch.Tensor:
        """J (H, out): the final hidden state at the prefix's last position differentiated in
        the module's output there: one pass of the last token after the cached rest, and H
        backward passes batched over the rows of the identity (autograd's vmap)."""
        size = int(self.heads.shape[1])
        cache = DynamicCache()
        if prefix.shape[0] > 1:
            with torch.no_grad():
                self.model(input_ids=prefix[None, :-1], use_cache=True, **{self.cache_arg: cache})
        delta = torch.zeros(1, 1, self.weight.shape[0], device=prefix.device)
        delta.requires_grad_(True)
        hook = self.module.register_forward_hook(lambda m, a, o: o + delta)
        position = torch.full((1, 1), int(prefix.shape[0]) - 1, device=prefix.device)
        try:
            with torch.enable_grad():
                out = self.model(
                    input_ids=prefix[None, -1:],
                    position_ids=position,
                    use_cache=True,
                    output_hidden_states=True,
                    **{self.cache_arg: cache},
                )
                hidden = out.hidden_states[-1][0, 0]
                rows = torch.eye(size, dtype=hidden.dtype, device=hidden.device)
                (jac,) = torch.autograd.grad(hidden, delta, rows, is_grads_batched=True)
        finally:
            hook.remove()
        return jac[:, 0, 0].double()

    def signals(self, prefixes: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Backward signals (B, out) at each sentence's last prefix position, from the
        observed gradient and the prefixes' inputs, and the probabilities there (B, V)."""
        x, probs = self.prefix_pass(prefixes)
        # G = D^T X. Sentences sharing a first token give equal rows, so X can be rank
        # deficient: a pseudo-inverse (lstsq's default QR solver misfit such a batch by 0.3).
        d = torch.linalg.pinv(x.T) @ self.observed.T
        ends = torch.tensor([len(p) for p in prefixes], device=x.device).cumsum(0) - 1
        return d[ends], probs

    def solve(self, prefixes: dict[int, torch.Tensor]) -> tuple[dict[int, int], dict[int, float]]:
        """Each sentence's last token, and its relative misfit (about 1e-5 for the truth)."""
        order = sorted(prefixes)
        d, probs = self.signals([prefixes[b] for b in order])
        count = sum(int(p.shape[0]) for p in prefixes.values())  # N
        heads = self.heads.double()
        chosen, misfit = {}, {}
        for i, b in enumerate(order):
            jac = self.jacobian(prefixes[b])
            target = jac.T @ (heads.T @ probs[i]) - count * d[i]
            # every token ranked in float32 (the truth misfits by 1e-5, others by 0.1 and
            # up), the chosen one's misfit measured in float64
            miss = (self.heads.float() @ jac.float() - target.float()).norm(dim=1)
            best = int(miss.argmin())
            exact = (heads[best] @ jac - target).norm() / target.norm().clamp_min(1e-300)
            chosen[b], misfit[b] = best, float(exact)
        return chosen, misfit

    def guesses(self, prefixes: dict[int, torch.Tensor]) -> dict[int, int]:
        """The model's own most likely next token after each prefix."""
        order = sorted(prefixes)
        _, probs = self.prefix_pass([prefixes[b] for b in order])
        return dict(zip(order, probs.argmax(-1).tolist()))

    def gradient_residual(self, sentences: list[list[int]]) -> float:
        """|G(batch) - G_observed| / |G_observed| for the recovered batch (standard shifted
        next-token loss, mean over the predicted positions)."""
        tokens, mask = self._padded([torch.tensor(s, device=self.weight.device) for s in sentences])
        labels = tokens.masked_fill(mask == 0, -100)
        with torch.enable_grad():
            loss = self.model(input_ids=tokens, attention_mask=mask, labels=labels).loss
            (grad,) = torch.autograd.grad(loss, self.weight)
        scale = float(self.observed.norm()) or 1.0
        return float((grad.double() - self.observed).norm()) / scale
