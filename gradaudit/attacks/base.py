"""The one interface every inversion attack implements, and what attacks share."""

from __future__ import annotations

import copy
import dataclasses
import re
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from gradaudit.errors import GradAuditError
from gradaudit.gradients.snapshot import GradientSnapshot
from gradaudit.model.families import eager_attention
from gradaudit.model.linear import uniform_copy
from gradaudit.model.lora import zero_gradient_reason

# What an attack ran on, in the words results' `info["regime"]` use: the span test with every
# input in the row space, with an r-dimensional slice of it (LoRA's lora_A, r < tokens), or
# gradient matching.
SPAN_EXACT, SPAN_PARTIAL, GRADIENT_MATCHING = "span exact", "span partial", "gradient matching"
_UNUSED_TOKEN = re.compile(r"^\[unused\d+\]$|^<unused\d+>$")


@dataclass
class Reconstruction:
    """What an attack recovered: token ids per sentence (with special tokens), and how."""

    token_ids: list[list[int]]
    texts: list[str]
    attack: str
    options: dict[str, Any]
    seconds: float = 0.0
    loss_trace: list[float] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None` or `"auto"`: CUDA when present, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GradAuditError(
            f"device {device} was asked for but CUDA is not available: use cpu or auto"
        )
    return device


def special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The tokenizer's special ids, with added tokens marked special that it does not list
    among `all_special_ids` (SmolLM2's GGUF tokenizer: `<repo_name>`, `<file_sep>`, ...):
    control tokens, not text."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    return set(tokenizer.all_special_ids) | {i for i, t in added.items() if t.special}


def candidate_token_ids(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """Vocabulary ids an attack may output: no special and no unused ids."""
    special = special_ids(tokenizer)
    vocab = tokenizer.get_vocab()
    ids = [i for tok, i in vocab.items() if i not in special and not _UNUSED_TOKEN.match(tok)]
    return torch.tensor(sorted(ids), dtype=torch.long)


def sentence_lengths(snapshot: GradientSnapshot) -> list[int]:
    """True length of each sentence (special tokens included): the adversary knows them."""
    return [int(n) for n in snapshot.batch["attention_mask"].sum(1)]


def content_mask(snapshot: GradientSnapshot, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """True where a position holds a text token to recover (not special, not padding)."""
    ids = snapshot.batch["input_ids"]
    special = torch.tensor(sorted(special_ids(tokenizer)), dtype=ids.dtype)
    return snapshot.batch["attention_mask"].bool() & ~torch.isin(ids, special)


def decode(tokenizer: PreTrainedTokenizerBase, token_ids: list[list[int]]) -> list[str]:
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in token_ids]


def blank_ids(snapshot: GradientSnapshot, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """The batch's ids with every text token replaced by [UNK]: what the adversary knows."""
    ids = snapshot.batch["input_ids"].clone()
    unk = tokenizer.unk_token_id
    ids[content_mask(snapshot, tokenizer)] = unk if unk is not None else 0
    return ids


def from_ids(
    tokenizer: PreTrainedTokenizerBase,
    snapshot: GradientSnapshot,
    ids: torch.Tensor,
    attack: str,
    options: dict[str, Any],
    info: dict[str, Any],
) -> Reconstruction:
    """A reconstruction of padded ids `ids` (B, L), each sentence cut to its known length."""
    token_ids = [ids[b, :n].tolist() for b, n in enumerate(sentence_lengths(snapshot))]
    return Reconstruction(token_ids, decode(tokenizer, token_ids), attack, options, info=info)


ZERO_GRADIENT = "all-zero gradient: nothing to recover (the batch contributed no gradient)"


def zero_gradient(model: nn.Module, snapshot: GradientSnapshot) -> str:
    """Why there is nothing to attack when every observed weight gradient is zero ("" when
    one is not), naming LoRA's zero-initialised lora_B where that is the cause."""
    if any(torch.any(snapshot.weight_gradient(m)) for m in snapshot.modules):
        return ""
    return zero_gradient_reason(model, list(snapshot.modules)) or ZERO_GRADIENT


def attack_model(model: nn.Module, snapshot: GradientSnapshot, device: torch.device) -> nn.Module:
    """A private eval-mode copy of `model` on `device`, with the snapshot's weights if it has them.

    Only the observed parameters require grad, so backward passes compute nothing else.
    """
    snapshot.check_model(model)
    clone = copy.deepcopy(model).to(device).eval()
    if snapshot.weights is not None:
        clone.load_state_dict(snapshot.weights)
    observed = set(snapshot.gradients)
    for name, param in clone.named_parameters():
        param.requires_grad_(name in observed)
    return clone


class Attack(ABC):
    """A gradient-inversion attack: `reconstruct` rebuilds a snapshot's batch text.

    Subclasses set `name`, an `Options` dataclass holding every number they use, and
    implement `_reconstruct`. Seeded runs are deterministic on CPU.
    """

    name: ClassVar[str]
    Options: ClassVar[type]

    def __init__(self, **options: Any) -> None:
        known = {f.name for f in dataclasses.fields(self.Options)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise GradAuditError(
                f"unknown option(s) {', '.join(unknown)} for attack {self.name!r}; "
                f"it takes: {', '.join(sorted(known))}"
            )
        self.options = self.Options(**options)

    def reconstruct(
        self,
        model: nn.Module,
        snapshot: GradientSnapshot,
        *,
        tokenizer: PreTrainedTokenizerBase,
        seed: int = 0,
        device: str | torch.device | None = None,
        budget: float = 1.0,
    ) -> Reconstruction:
        """Reconstruct the batch behind `snapshot` from its gradients (white-box threat model).

        An all-zero gradient is not attacked (`info["mode"] == "none"`, `info["why"]`).
        """
        if budget <= 0:
            raise GradAuditError(f"budget must be positive, got {budget}")
        for module in snapshot.modules:
            snapshot.weight_gradient(module)
        device = resolve_device(device)
        start = time.perf_counter()
        clone = attack_model(model, snapshot, device)
        snapshot = snapshot.as_linear(uniform_copy(clone))  # GPT-2's Conv1D as nn.Linear
        nothing = zero_gradient(clone, snapshot)
        if nothing:  # any guess would be unconstrained: reported as not attacked
            info = {"mode": "none", "why": nothing, "zero_gradient": True}
            ids = blank_ids(snapshot, tokenizer)
            result = from_ids(tokenizer, snapshot, ids, self.name, self.options_dict(), info)
        else:
            with eager_attention(clone), torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                result = self._reconstruct(
                    clone, snapshot, tokenizer=tokenizer, seed=seed, device=device, budget=budget
                )
        result.seconds = time.perf_counter() - start
        result.info["device"] = str(device)  # where the attack actually ran
        return result

    @abstractmethod
    def _reconstruct(
        self,
        model: nn.Module,
        snapshot: GradientSnapshot,
        *,
        tokenizer: PreTrainedTokenizerBase,
        seed: int,
        device: torch.device,
        budget: float,
    ) -> Reconstruction:
        """Run on `model`, a private eval-mode copy on `device`."""

    def options_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.options)
