"""GradAuditCallback the way transformers users add callbacks: the class with no arguments,
settings from the environment and files, scores in TensorBoard, output beside the Trainer's,
a folder per hyper-parameter-search trial, GRADAUDIT_DISABLE."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from _tiny import TinyTexts, read_audits
from conftest import make_tiny_model
from gradaudit.integrations.trainer import GradAuditCallback
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments
from transformers.trainer_callback import TrainerControl, TrainerState

from gradaudit import AuditConfig, GradAuditError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Fast settings for the plumbing under test: gradmatch at a tiny budget.
FAST = {"attack": "gradmatch", "budget": 0.01, "modules": ["query@0"]}


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("CONFIG", "MODULES", "OUTPUT_DIR", "DISABLE"):
        monkeypatch.delenv(f"GRADAUDIT_{name}", raising=False)
    return monkeypatch


def env_config(monkeypatch, folder: Path, **settings) -> Path:
    """Point GRADAUDIT_CONFIG at a JSON file holding `settings`."""
    path = folder / "gradaudit.json"
    path.write_text(json.dumps(settings))
    monkeypatch.setenv("GRADAUDIT_CONFIG", str(path))
    return path


def trainer(tokenizer, out: Path, callbacks=None, **args) -> Trainer:
    settings = {
        "per_device_train_batch_size": 4, "max_steps": 4, "learning_rate": 1e-3,
        "logging_steps": 1, "save_strategy": "no", "report_to": [], "use_cpu": True,
        "disable_tqdm": True, "seed": 0, **args,
    }  # fmt: skip
    return Trainer(
        model=make_tiny_model(tokenizer.vocab_size),
        args=TrainingArguments(str(out / "trainer"), **settings),
        train_dataset=TinyTexts(tokenizer, 32),
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the TensorBoard event files under `logdir`: [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(logdir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return found


def test_callback_class_added_bare_logs_scores_to_tensorboard(tokenizer, tmp_path, clean_env):
    """`trainer.add_callback(GradAuditCallback)` with settings from GRADAUDIT_CONFIG: the
    audits run in the background worker and finish at train end, after the Trainer's last
    log; TensorBoard's writer still gets them, and the Trainer's own logs are all there."""
    env_config(clean_env, tmp_path, steps=[1, 3], **FAST)
    clean_env.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    run = trainer(tokenizer, tmp_path, report_to=["tensorboard"])
    run.add_callback(GradAuditCallback)
    run.train()
    audits = read_audits(tmp_path / "trainer" / "gradaudit")  # beside the Trainer's output
    assert [a["step"] for a in audits] == [1, 3]
    assert all(a["error"] is None for a in audits)
    # One event file: the audits reached the writer before it closed (not a reopened one).
    assert len(list((tmp_path / "tb").rglob("events.out.tfevents.*"))) == 1
    found = scalars(tmp_path / "tb")
    (rouge1,) = [tag for tag in found if tag.endswith("gradaudit/rouge1")]
    assert sorted(v for _, v in found[rouge1]) == pytest.approx(sorted(a["rouge1"] for a in audits))
    (audited,) = [tag for tag in found if tag.endswith("gradaudit/audited_step")]
    assert sorted(v for _, v in found[audited]) == [1.0, 3.0]
    assert [step for step, _ in found["train/loss"]] == [1, 2, 3, 4]  # none cancelled
    history = run.state.log_history
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]
    assert sorted(h["gradaudit/audited_step"] for h in history if "gradaudit/rouge1" in h) == [
        1.0,
        3.0,
    ]


def test_callback_instance_in_trainer_callbacks_logs_at_its_step(tokenizer, tmp_path, clean_env):
    """`callbacks=[GradAuditCallback()]`: inline audits are logged at the step they finish,
    and the Trainer's loss log of that same step is not cancelled."""
    env_config(clean_env, tmp_path, every_n_steps=2, background=False, **FAST)
    clean_env.setenv("GRADAUDIT_OUTPUT_DIR", str(tmp_path / "audit"))
    run = trainer(tokenizer, tmp_path, callbacks=[GradAuditCallback()])
    run.train()
    assert [a["step"] for a in read_audits(tmp_path / "audit")] == [1, 3]
    assert not (tmp_path / "trainer" / "gradaudit").exists()
    history = run.state.log_history
    assert [h["step"] for h in history if "gradaudit/rouge1" in h] == [1, 3]
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]


def test_settings_precedence_explicit_then_env_then_file(tmp_path, clean_env):
    file = tmp_path / "audit.yaml"
    file.write_text("modules: [key@1]\nevery_n_steps: 7\noutput_dir: from-file\nbudget: 0.5\n")
    clean_env.setenv("GRADAUDIT_CONFIG", str(file))
    from_file = GradAuditCallback().config
    assert (from_file.modules, from_file.every_n_steps, from_file.output_dir) == (
        ["key@1"],
        7,
        "from-file",
    )
    clean_env.setenv("GRADAUDIT_MODULES", "query@0,1, value@last")
    clean_env.setenv("GRADAUDIT_OUTPUT_DIR", "from-env")
    from_env = GradAuditCallback().config
    assert from_env.modules == ["query@0,1", "value@last"] and from_env.output_dir == "from-env"
    assert from_env.every_n_steps == 7 and from_env.budget == 0.5  # still from the file
    explicit = GradAuditCallback({"every_n_steps": 3}).config
    assert explicit.every_n_steps == 3 and explicit.modules == ["query@0,1", "value@last"]
    with pytest.warns(RuntimeWarning, match="GRADAUDIT_MODULES ignored"):
        given = GradAuditCallback(AuditConfig(modules=["ffn_in@2"])).config
    assert given.modules == ["ffn_in@2"] and given.output_dir == "from-env"  # unset in code
    assert given.budget == 1.0  # an AuditConfig gives every field it holds


def test_bad_environment_is_one_named_error(tmp_path, clean_env):
    clean_env.setenv("GRADAUDIT_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(GradAuditError, match=r"missing.yaml does not exist.*GRADAUDIT_CONFIG"):
        GradAuditCallback()
    env_config(clean_env, tmp_path, modules=["query@0"], every_n=3)
    with pytest.raises(GradAuditError, match=r"unknown AuditConfig key.*every_n in .*json"):
        GradAuditCallback()
    clean_env.setenv("GRADAUDIT_DISABLE", "maybe")
    with pytest.raises(GradAuditError, match="GRADAUDIT_DISABLE='maybe' is neither true"):
        GradAuditCallback()


def test_disable_makes_the_callback_do_nothing(tokenizer, tmp_path, clean_env):
    """GRADAUDIT_DISABLE=1: no config is read (a broken one is no error), nothing written."""
    clean_env.setenv("GRADAUDIT_CONFIG", str(tmp_path / "missing.yaml"))
    clean_env.setenv("GRADAUDIT_DISABLE", "True")
    run = trainer(tokenizer, tmp_path, max_steps=2)
    run.add_callback(GradAuditCallback)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a warning
        run.train()
    assert run.state.global_step == 2
    assert not (tmp_path / "trainer" / "gradaudit").exists()
    assert not any("gradaudit/rouge1" in h for h in run.state.log_history)


def test_each_hyperparameter_search_trial_gets_its_folder(tokenizer, tmp_path, clean_env):
    """optuna trials without hp_name: a folder per trial (named from its parameters), each
    with the report of its own audits."""
    pytest.importorskip("optuna")
    env_config(clean_env, tmp_path, steps=[1, 2], attack=None, background=False)

    def model_init(trial=None):
        return make_tiny_model(tokenizer.vocab_size)

    search = trainer(tokenizer, tmp_path, callbacks=[GradAuditCallback()], max_steps=2)
    search.model_init = model_init
    search.eval_dataset = TinyTexts(tokenizer, 4)
    search.hyperparameter_search(
        hp_space=lambda trial: {"learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-2)},
        backend="optuna",
        n_trials=2,
        direction="minimize",
    )
    folders = sorted((tmp_path / "trainer" / "gradaudit").iterdir())
    assert len(folders) == 2 and all(f.name.startswith("trial-") for f in folders)
    for folder in folders:
        assert [a["step"] for a in read_audits(folder)] == [1, 2]


def test_without_sampling_settings_eight_audits_are_spread_over_the_run(
    tokenizer, tmp_path, clean_env
):
    run = trainer(tokenizer, tmp_path, max_steps=16, logging_steps=100)
    run.add_callback(GradAuditCallback({"attack": None, "background": False}))
    run.train()
    audits = read_audits(tmp_path / "trainer" / "gradaudit")
    assert [a["step"] for a in audits] == [1, 3, 5, 7, 9, 11, 13, 15]


def test_called_outside_a_trainer_it_says_where_the_scores_go(tokenizer, tmp_path, clean_env):
    callback = GradAuditCallback({"attack": None, "output_dir": str(tmp_path / "audit")})
    args = TrainingArguments(str(tmp_path / "t"), use_cpu=True, report_to=[])
    model = make_tiny_model(tokenizer.vocab_size)
    with pytest.warns(RuntimeWarning, match="not called by a Trainer's callback handler"):
        callback.on_train_begin(args, TrainerState(), TrainerControl(), model=model)
    callback.on_train_end(args, TrainerState(), TrainerControl())
    assert (tmp_path / "audit" / "report.json").is_file()
