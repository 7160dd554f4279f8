"""From texts or saved snapshots to scored reconstructions: capture, attack, score.

`audit_batch` tokenizes and captures first; `audit_snapshot` attacks one snapshot;
`audit_snapshots` attacks a folder of them, sharded over ranks when launched on several.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from gradaudit.attacks import get_attack
from gradaudit.attacks.base import Reconstruction, special_ids
from gradaudit.errors import GradAuditError
from gradaudit.gradients.capture import capture
from gradaudit.gradients.snapshot import GradientSnapshot
from gradaudit.model.batch import make_batch
from gradaudit.model.selection import select_modules
from gradaudit.scoring.metrics import Scores, score
from gradaudit.scoring.result import AuditResult
from gradaudit.scoring.sharding import Shard


def _content_ids(snapshot: GradientSnapshot, token_ids: Sequence[Sequence[int]], special: set[int]):
    """Per sentence, the ids at the reference's text positions (specials and padding dropped)."""
    ids = snapshot.batch["input_ids"].tolist()
    mask = snapshot.batch["attention_mask"].tolist()
    keep = [
        [m == 1 and t not in special for t, m in zip(row, mrow)] for row, mrow in zip(ids, mask)
    ]
    refs = [[t for t, k in zip(row, krow) if k] for row, krow in zip(ids, keep)]
    recs = [[t for t, k in zip(row, krow) if k] for row, krow in zip(token_ids, keep)]
    return refs, recs


def score_reconstruction(
    snapshot: GradientSnapshot, reconstruction: Reconstruction, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[str], Scores]:
    """References of the snapshot's batch and the scores of `reconstruction` against them."""
    references = tokenizer.batch_decode(snapshot.batch["input_ids"], skip_special_tokens=True)
    ref_ids, rec_ids = _content_ids(snapshot, reconstruction.token_ids, special_ids(tokenizer))
    scores = score(
        references, reconstruction.texts, reference_ids=ref_ids, reconstruction_ids=rec_ids
    )
    return references, scores


def audit_snapshot(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    snapshot: GradientSnapshot,
    attack: str = "gradmatch",
    *,
    seed: int = 0,
    device: str | torch.device | None = None,
    budget: float = 1.0,
    **options: Any,
) -> AuditResult:
    """Attack a captured snapshot and score the reconstruction against its batch."""
    attacker = get_attack(attack, **options)
    rec = attacker.reconstruct(
        model, snapshot, tokenizer=tokenizer, seed=seed, device=device, budget=budget
    )
    references, scores = score_reconstruction(snapshot, rec, tokenizer)
    info = dict(rec.info)
    if "train_mode" in snapshot.meta:  # captured with dropout on, as training runs, or not
        info["train_mode"] = snapshot.meta["train_mode"]
    if snapshot.meta.get("contrast"):
        info["contrast"] = True  # a saved dp_contrast snapshot was never released: no verdict
    result = AuditResult(
        batch_size=snapshot.batch_size,
        references=references,
        reconstructions=rec.texts,
        rouge1=scores.rouge1,
        rouge2=scores.rouge2,
        rougeL=scores.rougeL,
        token_recall=scores.token_recall,
        exact=scores.exact,
        batch_rouge1=scores.batch_rouge1,
        seconds=rec.seconds,
        modules=list(snapshot.modules),
        attack=rec.attack,
        options={**rec.options, "seed": seed, "budget": budget},
        gradient=snapshot.kind,
        step=snapshot.step,
        sentences=[asdict(s) for s in scores.sentences],
        metric_config=scores.config,
        info=info,
    )
    return _without_scores_if_unattacked(result)


def _without_scores_if_unattacked(result: AuditResult) -> AuditResult:
    """An audit whose attack attacked nothing keeps its references but no scores.

    A blank guess scores ROUGE 0, which would read as "does not leak": it is reported as not
    attacked instead (an error), and no summary or assertion counts it as a measurement.
    """
    why = result.unattacked_reason
    if why is None:
        return result
    hint = "; its scores would say nothing about leakage: use attack='auto', which hands such "
    hint += "gradients to gradmatch"
    if result.info.get("zero_gradient"):  # no attack can use a zero gradient
        hint = ""
    return AuditResult.failure(
        result.modules,
        result.attack,
        result.batch_size,
        f"not attacked: {why}{hint}",
        references=result.references,
        seconds=result.seconds,
        options=result.options,
        gradient=result.gradient,
        step=result.step,
        metric_config=result.metric_config,
        info=result.info,
    )


def audit_batch(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    labels: Sequence[int],
    modules: str | Iterable[str],
    attack: str = "gradmatch",
    *,
    seed: int = 0,
    device: str | torch.device | None = None,
    budget: float = 1.0,
    train_mode: bool = False,
    **options: Any,
) -> AuditResult:
    """Tokenize `texts`, capture the selected modules' gradients, attack them and score.

    With `train_mode`, the gradient is taken as fine-tuning takes it, dropout on (masks
    seeded by `seed`); the default eval mode is the attack's best case.
    """
    get_attack(attack, **options)  # fail on a bad attack or option before any compute
    names = select_modules(model, modules)
    batch = make_batch(model, tokenizer, texts, labels)
    snapshot = capture(model, batch, names, train_mode=train_mode, seed=seed)
    return audit_snapshot(
        model, tokenizer, snapshot, attack, seed=seed, device=device, budget=budget, **options
    )


def find_snapshots(root: str | Path) -> list[Path]:
    """`root` itself when it is a snapshot directory, else the snapshot folders inside it."""
    root = Path(root)
    if (root / "snapshot.json").is_file():
        return [root]
    directories = sorted(p.parent for p in root.glob("*/snapshot.json"))
    if not directories:
        raise GradAuditError(f"{root} holds no snapshot (no snapshot.json in it or its subfolders)")
    return directories


def audit_snapshots(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    directories: Sequence[str | Path],
    attack: str = "gradmatch",
    *,
    seed: int = 0,
    device: str | torch.device | None = None,
    budget: float = 1.0,
    shard: Shard | None = None,
    progress: bool | None = False,
    on_result: Callable[[Path, AuditResult], None] | None = None,
    **options: Any,
) -> list[AuditResult] | None:
    """Attack each saved snapshot with seed `seed + i` (its index), and score it.

    A snapshot that cannot be read or attacked becomes a result with its `error`, so the
    others are still attacked (and, sharded, no rank leaves the others waiting). With a
    `shard` of several ranks, this rank attacks its share and rank 0 returns every rank's
    results in order (other ranks return None).
    `progress` True shows a progress bar, None only on a terminal.
    """
    from tqdm.auto import tqdm

    shard = shard or Shard()
    shard.start()
    device = shard.device(device)
    results = []
    mine = shard.mine([Path(d) for d in directories])
    for i, directory in tqdm(
        mine, desc=f"attack (rank {shard.rank})", disable=None if progress is None else not progress
    ):
        try:
            snapshot = GradientSnapshot.load(directory, model)
            result = audit_snapshot(
                model, tokenizer, snapshot, attack, seed=seed + i,  # global index: shards agree
                device=device, budget=budget, **options,
            )  # fmt: skip
        except Exception as error:  # noqa: BLE001 - one bad snapshot must not lose the others
            result = AuditResult.failure(
                [], attack, 0, f"{type(error).__name__}: {error}", info={"snapshot": str(directory)}
            )
        results.append((i, result))
        if on_result is not None:
            on_result(directory, result)
    return shard.gather(results)
