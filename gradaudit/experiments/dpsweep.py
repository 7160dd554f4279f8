"""`gradaudit dpsweep`: leakage of the DP-SGD released gradient against σ and ε, with utility.

For each noise multiplier σ, each attacked batch's per-example gradients are clipped to C,
summed, noised with N(0, (σ·C)²) and divided by the batch size by Opacus's own DPOptimizer
(see `privacy.private_snapshot`), then attacked. ε is what T steps at sample rate q cost.
With `utility_steps`, a copy of the model is fine-tuned with Opacus at each σ and scored on
held-out examples, so one table shows privacy, leakage and utility together.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import PreTrainedTokenizerBase

from gradaudit.attacks import get_attack
from gradaudit.errors import GradAuditError
from gradaudit.experiments.data import Examples
from gradaudit.io import atomic_write_bytes, atomic_write_json, atomic_write_text, private_dir
from gradaudit.model.batch import make_batch
from gradaudit.model.families import layout
from gradaudit.model.selection import select_modules
from gradaudit.privacy import (
    check_dp_parameters,
    check_opacus_compatible,
    default_delta,
    dp_step,
    engine_epsilon,
    per_sample_gradients,
    privacy_statement,
    private_snapshot,
)
from gradaudit.report.format import number, score
from gradaudit.scoring.audit import audit_snapshot
from gradaudit.scoring.result import THREAT_MODEL, AuditResult

DEFAULT_SIGMAS = (0.0, 0.01, 0.1, 0.5, 1.0)
DEFAULT_ATTACKS = ("auto", "gradmatch")
FROZEN = ("word_embeddings", "position_embeddings", "token_type_embeddings")


@dataclass
class SweepSettings:
    """Everything one sweep uses besides model, tokenizer and data."""

    modules: list[str]
    sigmas: list[float] = field(default_factory=lambda: list(DEFAULT_SIGMAS))
    clip: float = 1.0
    sample_rate: float = 0.01
    steps: int = 1000
    delta: float | None = None
    accountant: str = "rdp"
    attacks: list[str] = field(default_factory=lambda: list(DEFAULT_ATTACKS))
    budgets: dict[str, float] = field(default_factory=dict)
    batch_size: int = 1
    batches: int = 2
    clip_scope: str = "model"
    utility_steps: int = 0
    utility_lr: float = 5e-4
    eval_size: int = 200
    max_length: int = 64
    seed: int = 0

    def check(self) -> None:
        check_dp_parameters(
            clip=self.clip,
            sample_rate=self.sample_rate,
            steps=self.steps,
            delta=self.delta,
            accountant=self.accountant,
        )
        if not self.sigmas:
            raise GradAuditError("no noise multipliers given: pass e.g. --sigmas 0,0.1,1")
        for sigma in self.sigmas:
            check_dp_parameters(noise_multiplier=sigma)
        for name in self.attacks:
            get_attack(name)
        for setting in ("batch_size", "batches", "eval_size", "max_length"):
            if getattr(self, setting) < 1:
                raise GradAuditError(f"{setting} must be at least 1, got {getattr(self, setting)}")
        if self.utility_steps < 0 or self.utility_lr <= 0:
            raise GradAuditError("utility steps must be ≥ 0 and the utility learning rate > 0")


@dataclass
class SweepRow:
    """Mean scores of one attack over the sweep's batches at one σ."""

    sigma: float
    epsilon: float
    attack: str
    rouge1: float | None  # None when no batch could be attacked at this σ (see unattacked)
    rouge2: float | None
    token_recall: float | None
    accuracy: float | None = None
    utility_epsilon: float | None = None
    unattacked: int = 0  # batches the attack could not use (e.g. span on a saturated gradient)


@dataclass
class SweepResult:
    settings: SweepSettings
    rows: list[SweepRow]
    privacy: dict[str, dict[str, Any]]
    audits: list[AuditResult]
    dataset_size: int


def frozen_embeddings_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with word, position and token-type embeddings frozen.

    Opacus needs BERT's position embeddings frozen; freezing the word embeddings too keeps
    per-example gradients small. Clipping norms cover exactly the parameters left trainable.
    """
    work = copy.deepcopy(model).eval()
    lay = layout(work)
    for name in FROZEN:
        getattr(lay, name).weight.requires_grad_(False)
    return work


def _split(examples: Examples, settings: SweepSettings) -> tuple[Examples, Examples | None]:
    """(training pool, held-out evaluation set or None without utility)."""
    if not settings.utility_steps:
        return examples, None
    if len(examples) <= settings.eval_size:
        raise GradAuditError(
            f"{len(examples)} examples leave none for training after {settings.eval_size} "
            "held out: lower --eval-size or pass more data"
        )
    cut = len(examples) - settings.eval_size
    train = Examples(examples.texts[:cut], examples.labels[:cut], examples.source)
    held = Examples(examples.texts[cut:], examples.labels[cut:], examples.source)
    return train, held


def _tensors(tokenizer: PreTrainedTokenizerBase, data: Examples, max_length: int) -> TensorDataset:
    enc = tokenizer(
        data.texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    types = enc.get("token_type_ids", torch.zeros_like(enc["input_ids"]))
    labels = torch.tensor(data.labels, dtype=torch.long)
    return TensorDataset(enc["input_ids"], enc["attention_mask"], types, labels)


def accuracy(model: nn.Module, dataset: TensorDataset, batch_size: int = 64) -> float:
    """Share of `dataset` the model classifies correctly (eval mode, no gradients)."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for ids, mask, types, labels in DataLoader(dataset, batch_size=batch_size):
            logits = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
            correct += int((logits.argmax(-1) == labels).sum())
    return correct / len(dataset)


def dp_finetune(
    model: nn.Module,
    train: TensorDataset,
    *,
    sigma: float,
    clip: float,
    sample_rate: float,
    steps: int,
    lr: float,
    seed: int,
    accountant: str,
    delta: float,
) -> tuple[nn.Module, float]:
    """Fine-tune a copy of `model` for `steps` Opacus DP-SGD steps (Poisson sampling).

    Returns the trained copy and ε from the engine's own accountant.
    """
    from opacus import PrivacyEngine

    work = copy.deepcopy(model).train()
    check_opacus_compatible(work)
    batch_size = max(1, round(sample_rate * len(train)))
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(train, batch_size=batch_size, generator=generator)
    optimizer = torch.optim.AdamW([p for p in work.parameters() if p.requires_grad], lr=lr)
    engine = PrivacyEngine(accountant=accountant)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        private, optimizer, loader = engine.make_private(
            module=work,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=sigma,
            max_grad_norm=clip,
            noise_generator=torch.Generator().manual_seed(seed + 1),
        )
        done = 0
        while done < steps:
            for ids, mask, types, labels in loader:
                batch = {
                    "input_ids": ids, "attention_mask": mask, "token_type_ids": types,
                    "labels": labels,
                }  # fmt: skip
                dp_step(private, optimizer, batch)
                done += 1
                if done == steps:
                    break
    spent = engine_epsilon(engine, delta)
    private.remove_hooks()
    return work.eval(), spent


def run_dpsweep(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Examples,
    settings: SweepSettings,
    *,
    device: str | torch.device | None = None,
    progress: Callable[[str], None] | None = None,
) -> SweepResult:
    """Attack the DP-SGD released gradient at each σ; ε per σ; utility when asked."""
    settings.check()
    say = progress or (lambda _: None)
    train, held = _split(examples, settings)
    delta = settings.delta if settings.delta is not None else default_delta(len(train))
    work = frozen_embeddings_copy(model)
    statements = {
        str(s): privacy_statement(
            noise_multiplier=s,
            sample_rate=settings.sample_rate,
            steps=settings.steps,
            delta=delta,
            accountant=settings.accountant,
            clip=settings.clip,
            dataset_size=len(train),
        )
        for s in settings.sigmas
    }
    utility = {}
    if held is not None:
        utility = _utility(work, tokenizer, train, held, settings, delta, say)
    audits = _attack_released(work, tokenizer, train, settings, statements, device, say)
    rows = [
        _row(audits, sigma, attack, statements[str(sigma)]["epsilon"], utility.get(sigma))
        for sigma in settings.sigmas
        for attack in settings.attacks
    ]
    return SweepResult(settings, rows, statements, audits, len(train))


def _utility(
    work: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train: Examples,
    held: Examples,
    settings: SweepSettings,
    delta: float,
    say: Callable[[str], None],
) -> dict[float, tuple[float, float]]:
    """σ -> (held-out accuracy, ε) of a DP fine-tuning at that σ."""
    train_set = _tensors(tokenizer, train, settings.max_length)
    eval_set = _tensors(tokenizer, held, settings.max_length)
    utility = {}
    for sigma in settings.sigmas:
        trained, spent = dp_finetune(
            work,
            train_set,
            sigma=sigma,
            clip=settings.clip,
            sample_rate=settings.sample_rate,
            steps=settings.utility_steps,
            lr=settings.utility_lr,
            seed=settings.seed,
            accountant=settings.accountant,
            delta=delta,
        )
        utility[sigma] = (accuracy(trained, eval_set), spent)
        say(f"σ={sigma}: accuracy {utility[sigma][0]:.3f} after {settings.utility_steps} steps")
    return utility


def _attack_released(
    work: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train: Examples,
    settings: SweepSettings,
    statements: dict[str, dict[str, Any]],
    device: str | torch.device | None,
    say: Callable[[str], None],
) -> list[AuditResult]:
    """Each batch's released gradient at each σ, attacked by each attack."""
    names = select_modules(work, settings.modules)
    audits: list[AuditResult] = []
    for b, (texts, labels) in enumerate(train.batches(settings.batch_size, settings.batches)):
        samples = per_sample_gradients(
            work, make_batch(work, tokenizer, texts, labels), names, clip_scope=settings.clip_scope
        )
        for sigma in settings.sigmas:
            snapshot = private_snapshot(
                work, samples, clip=settings.clip, sigma=sigma, seed=settings.seed + b
            )
            for attack in settings.attacks:
                result = audit_snapshot(
                    work,
                    tokenizer,
                    snapshot,
                    attack,
                    seed=settings.seed + b,
                    device=device,
                    budget=settings.budgets.get(attack, 1.0),
                )
                result.epsilon = statements[str(sigma)]["epsilon"]
                result.info["dp"] = snapshot.meta["dp"]
                audits.append(result)
                outcome = result.error or f"ROUGE-1 {score(result.rouge1)}"
                say(f"batch {b} σ={sigma} {attack}: {outcome}")
    return audits


def _row(
    audits: list[AuditResult],
    sigma: float,
    attack: str,
    epsilon: float,
    utility: tuple[float, float] | None,
) -> SweepRow:
    """The mean scores of `attack` at `sigma`, next to ε and the utility run's figures."""
    group = [a for a in audits if a.attack == attack and a.info["dp"]["noise_multiplier"] == sigma]
    scored = [a for a in group if a.error is None]
    acc, spent = utility or (None, None)

    def mean(key: str) -> float | None:
        return sum(getattr(a, key) for a in scored) / len(scored) if scored else None

    return SweepRow(
        sigma=sigma,
        epsilon=epsilon,
        attack=attack,
        rouge1=mean("rouge1"),
        rouge2=mean("rouge2"),
        token_recall=mean("token_recall"),
        accuracy=acc,
        utility_epsilon=spent,
        unattacked=len(group) - len(scored),
    )


def render_table(result: SweepResult) -> str:
    """The sweep as a markdown table: σ, ε, attack, ROUGE-1/2, token recall, accuracy."""
    lines = [
        "| σ | ε | attack | ROUGE-1 | ROUGE-2 | token recall | not attacked | accuracy "
        "| ε (utility run) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result.rows:
        lines.append(
            f"| {r.sigma:g} | {number(r.epsilon)} | {r.attack} | {score(r.rouge1)} | "
            f"{score(r.rouge2)} | {score(r.token_recall)} | {r.unattacked} | "
            f"{number(r.accuracy)} | {number(r.utility_epsilon)} |"
        )
    return "\n".join(lines + [_UNATTACKED])


_UNATTACKED = (
    "Scores are means over the batches the attack could use; 'not attacked' counts the others "
    "(e.g. span on a gradient the noise saturated), whose blank guesses are not measurements."
)


def plot(result: SweepResult) -> bytes:
    """ROUGE-1/2 (and accuracy) against σ and against ε, one line per attack, as PNG."""
    import matplotlib.pyplot as plt

    from gradaudit.report.plots import figure_png  # selects the Agg backend first

    rows = result.rows
    sigmas = sorted({r.sigma for r in rows})
    finite = [r.epsilon for r in rows if math.isfinite(r.epsilon) and r.epsilon > 0]
    inf_at = max(finite) * 10 if finite else 1.0
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for attack in result.settings.attacks:
        own = sorted((r for r in rows if r.attack == attack), key=lambda r: r.sigma)
        eps = [r.epsilon if math.isfinite(r.epsilon) else inf_at for r in own]
        for key, style in (("rouge1", "-o"), ("rouge2", "--s")):
            values = [math.nan if getattr(r, key) is None else getattr(r, key) for r in own]
            label = f"{attack} {key.upper().replace('ROUGE', 'ROUGE-')}"
            axes[0].plot([r.sigma for r in own], values, style, label=label)
            axes[1].plot(eps, values, style, label=label)
    utility = sorted({(r.sigma, r.epsilon, r.accuracy) for r in rows if r.accuracy is not None})
    if utility:
        accs = [a for _, _, a in utility]
        axes[0].plot([s for s, _, _ in utility], accs, ":^k", label="accuracy")
        eps = [e if math.isfinite(e) else inf_at for _, e, _ in utility]
        axes[1].plot(eps, accs, ":^k", label="accuracy")
    axes[0].set_xscale("symlog", linthresh=min([s for s in sigmas if s > 0] or [1.0]))
    axes[0].set_xlabel("noise multiplier σ")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("ε (∞ drawn at the right edge)")
    for ax in axes:
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("score")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    s = result.settings
    fig.suptitle(
        f"{', '.join(s.modules)}: C={s.clip:g}, q={s.sample_rate:g}, T={s.steps}, "
        f"δ={result.privacy[str(s.sigmas[0])]['delta']:.2g}, {s.accountant.upper()}"
    )
    return figure_png(fig)


def write_dpsweep(
    directory: str | Path, result: SweepResult, *, redact: bool = False
) -> list[Path]:
    """Write `dpsweep.json`, `dpsweep.md` and `dpsweep.png` atomically into `directory`."""
    directory = private_dir(directory)
    audits = [a.redact() if redact else a for a in result.audits]
    payload = {
        "threat_model": THREAT_MODEL,
        "settings": asdict(result.settings),
        "dataset_size": result.dataset_size,
        "rows": [asdict(r) for r in result.rows],
        "privacy": result.privacy,
        "audits": [a.to_dict() for a in audits],
        "redacted": redact,
    }
    statements = sorted({p["statement"] for p in result.privacy.values()})
    markdown = "\n\n".join(["# gradaudit DP sweep", render_table(result), *statements]) + "\n"
    return [
        atomic_write_json(directory / "dpsweep.json", payload),
        atomic_write_text(directory / "dpsweep.md", markdown),
        atomic_write_bytes(directory / "dpsweep.png", plot(result)),
    ]


def parse_floats(text: str) -> list[float]:
    """`0,0.01,0.1` -> [0.0, 0.01, 0.1], with a clear error for a bad number."""
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise GradAuditError(f"bad number list {text!r}: use e.g. 0,0.01,0.1,0.5,1") from None
