"""Partial-gradient snapshots: what an adversary observes, saved as safetensors + JSON."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from gradaudit.errors import GradAuditError
from gradaudit.io import atomic_write_bytes, atomic_write_json, private_dir
from gradaudit.model.batch import check_batch

GRADIENT_KINDS = ("raw", "clipped", "noised")
SNAPSHOT_VERSION = 1
_ARCH_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
    "num_labels",
)


def config_hash(model: nn.Module) -> str:
    """Short hash of the architecture fields of `model.config` (not of its weights)."""
    config = model.config
    fields = {k: getattr(config, k, None) for k in _ARCH_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def weight_names(model: nn.Module, modules: Iterable[str], include_bias: bool) -> list[str]:
    """Parameter names captured for `modules`: each weight, and its bias when asked."""
    names = []
    for module_name in modules:
        module = model.get_submodule(module_name)
        names.append(f"{module_name}.weight")
        if include_bias and getattr(module, "bias", None) is not None:
            names.append(f"{module_name}.bias")
    return names


@dataclass
class GradientSnapshot:
    """Gradients of selected modules for one batch, with the batch they came from."""

    gradients: dict[str, torch.Tensor]
    batch: dict[str, torch.Tensor]
    modules: list[str]
    model_name: str
    config_hash: str
    kind: str = "raw"
    step: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.kind not in GRADIENT_KINDS:
            raise GradAuditError(f"gradient kind {self.kind!r} is not one of {GRADIENT_KINDS}")
        for name, grad in self.gradients.items():
            if not torch.isfinite(grad).all():
                raise GradAuditError(
                    f"gradient of {name!r} holds NaN or inf: fix the training step (loss scaling, "
                    "learning rate) before auditing it"
                )

    @property
    def batch_size(self) -> int:
        return int(self.batch["input_ids"].shape[0])

    def weight_gradient(self, module: str) -> torch.Tensor:
        """The weight gradient of `module`, with a clear error when it was not captured."""
        try:
            return self.gradients[f"{module}.weight"]
        except KeyError:
            if module in self.modules:
                raise GradAuditError(
                    f"the snapshot lists module {module!r} but holds no gradient for it: "
                    "capture it again"
                ) from None
            raise GradAuditError(
                f"module {module!r} is not in this snapshot (it holds {', '.join(self.modules)})"
            ) from None

    def restrict(self, modules: Iterable[str]) -> GradientSnapshot:
        """The same snapshot observing only `modules` (each must be in it)."""
        modules = list(modules)
        keep = {k for m in modules for k in self.gradients if k.rsplit(".", 1)[0] == m}
        for module in modules:
            self.weight_gradient(module)
        return dataclasses.replace(
            self, gradients={k: v for k, v in self.gradients.items() if k in keep}, modules=modules
        )

    def as_linear(self, modules: Iterable[str]) -> GradientSnapshot:
        """The same snapshot with the weight gradients (and saved weights) of `modules`, which
        were `Conv1D` (weight stored (in, out)), transposed to `nn.Linear`'s (out, in): what an
        attack sees on a copy converted by `gradaudit.model.linear.to_linear`."""
        keys = {f"{m}.weight" for m in modules}
        if not keys:
            return self

        def flip(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.T.contiguous() if k in keys else v for k, v in tensors.items()}

        weights = None if self.weights is None else flip(self.weights)
        return dataclasses.replace(self, gradients=flip(self.gradients), weights=weights)

    @classmethod
    def from_grads(
        cls,
        model: nn.Module,
        batch: Mapping[str, torch.Tensor],
        modules: Iterable[str],
        *,
        include_bias: bool = False,
        kind: str = "raw",
        step: int | None = None,
        include_weights: bool = False,
    ) -> GradientSnapshot:
        """Snapshot the `.grad` already present (e.g. after a real training backward)."""
        modules = list(modules)
        params = dict(model.named_parameters())
        gradients = {}
        for name in weight_names(model, modules, include_bias):
            grad = params[name].grad
            if grad is None:
                raise GradAuditError(f"{name!r} has no .grad: call it after backward()")
            gradients[name] = grad.detach().to("cpu", copy=True)
        return cls.from_gradients(model, batch, modules, gradients, kind, step, include_weights)

    @classmethod
    def from_gradients(
        cls,
        model: nn.Module,
        batch: Mapping[str, torch.Tensor],
        modules: Iterable[str],
        gradients: dict[str, torch.Tensor],
        kind: str = "raw",
        step: int | None = None,
        include_weights: bool = False,
    ) -> GradientSnapshot:
        """A snapshot of `gradients` (already on the CPU) taken from `model` on `batch`.

        With `include_weights`, the model's weights are copied too (an attack of this step
        later needs them). `meta["train_mode"]` records the model's mode now (a training loop's
        gradient: dropout on), which the attacks read, since the model they get may be in eval.
        """
        weights = None
        if include_weights:
            weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return cls(
            gradients=gradients,
            batch={
                k: v.detach().to("cpu", copy=True)
                for k, v in check_batch(dict(batch), model).items()
            },
            modules=list(modules),
            model_name=str(getattr(model.config, "_name_or_path", "") or type(model).__name__),
            config_hash=config_hash(model),
            kind=kind,
            step=step,
            weights=weights,
            meta={"train_mode": bool(model.training)},
        )

    def save(self, directory: str | Path) -> Path:
        """Write `gradients.safetensors`, `snapshot.json` (and `weights.safetensors`) privately."""
        directory = private_dir(directory)
        tensors = {f"grad/{k}": v.contiguous() for k, v in self.gradients.items()}
        tensors.update({f"batch/{k}": v.contiguous() for k, v in self.batch.items()})
        atomic_write_bytes(directory / "gradients.safetensors", save_safetensors(tensors))
        if self.weights is not None:
            weights = {k: v.contiguous() for k, v in self.weights.items()}
            atomic_write_bytes(directory / "weights.safetensors", save_safetensors(weights))
        atomic_write_json(
            directory / "snapshot.json",
            {
                "version": SNAPSHOT_VERSION,
                "modules": self.modules,
                "model_name": self.model_name,
                "config_hash": self.config_hash,
                "kind": self.kind,
                "step": self.step,
                "meta": self.meta,
            },
        )
        return directory

    @classmethod
    def load(cls, directory: str | Path, model: nn.Module | None = None) -> GradientSnapshot:
        """Read a saved snapshot; with `model`, refuse one taken from another architecture.

        A damaged, incomplete or newer snapshot is one `GradAuditError` naming the directory.
        """
        directory = Path(directory)
        if not (directory / "snapshot.json").is_file():
            raise GradAuditError(f"{directory} holds no snapshot.json: pass a snapshot directory")
        try:
            info, tensors, weights = _read_files(directory)
            snapshot = cls(
                gradients={k[5:]: v for k, v in tensors.items() if k.startswith("grad/")},
                batch={k[6:]: v for k, v in tensors.items() if k.startswith("batch/")},
                modules=list(info["modules"]),
                model_name=info["model_name"],
                config_hash=info["config_hash"],
                kind=info["kind"],
                step=info["step"],
                meta=info.get("meta", {}),
                weights=weights,
            )
        except GradAuditError as error:
            raise GradAuditError(f"snapshot {directory}: {error}") from None
        except (KeyError, TypeError, ValueError, OSError) as error:
            raise GradAuditError(
                f"snapshot {directory} is damaged or incomplete ({type(error).__name__}: "
                f"{error}): capture it again, or delete it"
            ) from None
        missing = [m for m in snapshot.modules if f"{m}.weight" not in snapshot.gradients]
        if missing or "input_ids" not in snapshot.batch:
            raise GradAuditError(
                f"snapshot {directory} lists module(s) {', '.join(missing) or '-'} but holds no "
                "gradient for them, or holds no batch: its files do not belong together; "
                "capture it again"
            )
        if model is not None:
            snapshot.check_model(model)
        return snapshot

    def check_model(self, model: nn.Module) -> None:
        """Raise when `model` is not the architecture this snapshot was taken from."""
        if config_hash(model) != self.config_hash:
            raise GradAuditError(
                f"snapshot was taken from model {self.model_name!r} (config {self.config_hash}), "
                f"not from this one (config {config_hash(model)}): attack it with the same model"
            )


def _read_files(
    directory: Path,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """The sidecar, the gradient and batch tensors, and the weights (when saved)."""
    from safetensors import SafetensorError

    try:
        info = json.loads((directory / "snapshot.json").read_text(encoding="utf-8"))
        tensors = load_safetensors((directory / "gradients.safetensors").read_bytes())
        weights_file = directory / "weights.safetensors"
        weights = load_safetensors(weights_file.read_bytes()) if weights_file.is_file() else None
    except SafetensorError as error:
        raise ValueError(f"a safetensors file is truncated or corrupt: {error}") from None
    if not isinstance(info, dict):
        raise ValueError("snapshot.json does not hold a mapping")
    version = info.get("version")
    if not isinstance(version, int) or version > SNAPSHOT_VERSION:
        raise GradAuditError(
            f"its format version {version!r} is not one this gradaudit reads "
            f"(up to {SNAPSHOT_VERSION}): upgrade gradaudit, or capture it again"
        )
    return info, tensors, weights


def require_per_token(snapshot: GradientSnapshot, modules: Iterable[str], purpose: str) -> None:
    """Refuse modules whose captured input had no token axis (`meta["not_per_token"]`, written
    by `capture`): a pooler or a classifier on [CLS] sees one vector per sentence."""
    pooled = snapshot.meta.get("not_per_token", {})
    for module in modules:
        if module in pooled:
            raise GradAuditError(
                f"module {module!r} took one vector per sentence (input shape "
                f"{pooled[module][0]}), not one per token, and {purpose} needs per-token "
                "inputs: select a module inside the layers (e.g. query@N, ffn_in@N), or "
                "attack this one with gradmatch"
            )
