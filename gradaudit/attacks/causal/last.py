"""The last token of each sentence, from the gradient match.

No module's gradient has a row for a causal LM's last token (it predicts nothing), but it is
the label of the position before it. With the loss `(1/N) sum CE` (N: the batch's predicted
positions, known from the lengths), `G = A - (1/N) sum_b dz_b[y_b]/dW`, where `A` is the
gradient with each sentence's last label term replaced by its log-sum-exp (computable from the
recovered prefixes) and `z_b` the logits at the position before sentence b's last token. So
`-N (G - A) = sum_b T_b(w_{y_b})`, `T_b(u)` being the weight gradient of `u . h_b` (h_b the
final hidden state there, `w_y` the output embedding of token y). Each sentence's `y_b` is
shortlisted by `<T_b^T(M_b), w_y>` (one double backward: `M_b` the target with the others'
terms taken off) and the model's own top guesses, then picked by the exact residual.
"""

from __future__ import annotations

import torch
from torch import nn

from gradaudit.attacks.causal.options import CausalOptions


class LastTokens:
    """Gradient match of the last tokens given every sentence's prefix (see module doc)."""

    def __init__(self, model: nn.Module, module: str, observed: torch.Tensor) -> None:
        self.model = model
        self.module = model.get_submodule(module)
        self.weight = self.module.weight
        self.observed = observed.to(self.weight.dtype)
        self.heads = model.get_output_embeddings().weight

    def _forward(self, tokens: torch.Tensor, mask: torch.Tensor):
        """Final hidden states, module inputs and outputs of a right-padded batch."""
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        hook = self.module.register_forward_hook(lambda m, a, o: seen.append((a[0], o)))
        try:
            out = self.model(input_ids=tokens, attention_mask=mask, output_hidden_states=True)
        finally:
            hook.remove()
        return out.hidden_states[-1], seen[0][0], seen[0][1]

    def known_part(self, prefixes: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """`A` (the gradient without the last labels' terms), the logits before each last
        token (B, V) and N."""
        lengths = [int(p.shape[0]) for p in prefixes]
        width = max(lengths)
        tokens = torch.zeros(len(prefixes), width, dtype=torch.long, device=self.weight.device)
        mask = torch.zeros_like(tokens)
        for b, p in enumerate(prefixes):
            tokens[b, : len(p)], mask[b, : len(p)] = p, 1
        count = sum(lengths)  # N: every prefix token predicts one token (its last, the last)
        with torch.enable_grad():
            hidden, _, _ = self._forward(tokens, mask)
            logits = self.model.get_output_embeddings()(hidden)
            loss = logits.new_zeros(())
            for b, n in enumerate(lengths):
                lse = torch.logsumexp(logits[b, :n], -1)
                targets = logits[b, : n - 1].gather(1, tokens[b, 1:n, None])[:, 0]
                loss = loss + lse.sum() - targets.sum()
            (grad,) = torch.autograd.grad(loss / count, self.weight)
        rows = torch.tensor([n - 1 for n in lengths], device=tokens.device)
        return grad.detach(), logits[torch.arange(len(lengths)), rows].detach(), count

    def terms(self, prefix: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per candidate y in `ids` (K,): D (K, n, out) and the module inputs X (n, in), with
        `T(w_y) = D_k^T X`."""
        k, n = int(ids.shape[0]), int(prefix.shape[0])
        tokens = prefix.expand(k, n)
        with torch.enable_grad():
            hidden, x, o = self._forward(tokens, torch.ones_like(tokens))
            score = (hidden[:, -1] * self.heads[ids]).sum()
            (d,) = torch.autograd.grad(score, o)
        return d.detach().reshape(k, n, -1), x[0].detach().reshape(n, -1)

    def shortlist_direction(self, prefix: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """T^T(target): the final-hidden direction u maximising <target, T(u)>."""
        tokens = prefix[None]
        with torch.enable_grad():
            u = torch.zeros(self.heads.shape[1], device=tokens.device, requires_grad=True)
            hidden, _, _ = self._forward(tokens, torch.ones_like(tokens))
            (g,) = torch.autograd.grad((hidden[0, -1] * u).sum(), self.weight, create_graph=True)
            (direction,) = torch.autograd.grad((g * target).sum(), u)
        return direction

    def solve(
        self, prefixes: dict[int, torch.Tensor], options: CausalOptions, sweeps: int = 2
    ) -> tuple[dict[int, int], float]:
        """Each sentence's last token, and the relative gradient residual of the result."""
        order = sorted(prefixes)
        known, logits, count = self.known_part([prefixes[b] for b in order])
        target = -count * (self.observed - known)
        terms = {b: torch.zeros_like(target) for b in order}
        chosen: dict[int, int] = {}
        for _ in range(sweeps):
            for i, b in enumerate(order):
                rest = target - sum(terms[c] for c in order if c != b)
                ids = self._candidates(prefixes[b], rest, logits[i], options.last_candidates)
                d, x = self.terms(prefixes[b], ids)
                fitted = torch.einsum("kno,ni->koi", d, x)
                miss = (fitted - rest).flatten(1).norm(dim=1)
                j = int(miss.argmin())
                chosen[b], terms[b] = int(ids[j]), fitted[j]
        residual = target - sum(terms.values())
        scale = float(target.norm()) or 1.0
        return chosen, float(residual.norm()) / scale

    def _candidates(
        self, prefix: torch.Tensor, rest: torch.Tensor, logits: torch.Tensor, count: int
    ) -> torch.Tensor:
        """Token ids: the best to first order of the gradient match, and the model's guesses."""
        scores = self.heads @ self.shortlist_direction(prefix, rest)
        guesses = max(1, count // 8)
        ids = torch.cat([scores.topk(count - guesses).indices, logits.topk(guesses).indices])
        return ids.unique()
