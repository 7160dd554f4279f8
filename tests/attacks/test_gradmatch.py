import random

import pytest
import torch

from gradaudit import GradAuditError, get_attack
from gradaudit.attacks.base import attack_model, candidate_token_ids
from gradaudit.attacks.gradmatch import MOVE_KINDS, GradientMatcher, GradMatchAttack, reorder
from gradaudit.gradients.capture import capture
from gradaudit.model.batch import make_batch
from gradaudit.model.families import eager_attention
from gradaudit.scoring.metrics import score

QUERY0 = "bert.encoder.layer.0.attention.self.query"
TEXTS = ["the movie was very good", "a boring film"]
# A short run on the tiny model: every phase (init, steps, moves) happens at least once.
SHORT = dict(
    steps=40, init_candidates=6, init_permutations=6, moves_every=10, moves=6, candidates_per_pass=4
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def tiny_snapshot(tiny_model, tiny_tokenizer):
    batch = make_batch(tiny_model, tiny_tokenizer, TEXTS, [1, 0])
    return capture(tiny_model, batch, [QUERY0, "bert.encoder.layer.1.output.dense"])


def test_registered_under_its_name():
    attack = get_attack("gradmatch", steps=5)
    assert isinstance(attack, GradMatchAttack)
    assert attack.options.steps == 5 and attack.options.lr == 0.01


def test_unknown_or_bad_option_is_an_error():
    with pytest.raises(GradAuditError, match="stepz"):
        get_attack("gradmatch", stepz=10)
    with pytest.raises(GradAuditError, match="steps"):
        get_attack("gradmatch", steps=0)


def test_true_embeddings_score_zero_and_candidates_are_scored_independently(
    tiny_model, tiny_tokenizer, tiny_snapshot
):
    model = attack_model(tiny_model, tiny_snapshot, torch.device("cpu"))
    attack = GradMatchAttack(reg_weight=0.0)
    with eager_attention(model):
        matcher = GradientMatcher(
            model, tiny_snapshot, tiny_tokenizer, torch.device("cpu"), attack.options
        )
        true = model.bert.embeddings.word_embeddings(tiny_snapshot.batch["input_ids"]).detach()
        noise = torch.randn((2, *true.shape), generator=torch.Generator().manual_seed(1))
        batched = matcher.losses(torch.stack([noise[0], true, noise[1]]))
        alone = torch.stack([matcher.losses(x.unsqueeze(0))[0] for x in (noise[0], noise[1])])
    assert batched[1].item() < 1e-5
    assert batched[[0, 2]].min().item() > 0.05
    torch.testing.assert_close(batched[[0, 2]], alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", MOVE_KINDS)
def test_every_move_reorders_the_content_tokens(kind):
    rng = random.Random(0)
    for n in (2, 3, 7):
        for _ in range(20):
            assert sorted(reorder(n, kind, rng)) == list(range(n))


def test_seeded_runs_are_deterministic(tiny_model, tiny_tokenizer, tiny_snapshot):
    attack = GradMatchAttack(**SHORT)
    runs = [
        attack.reconstruct(tiny_model, tiny_snapshot, tokenizer=tiny_tokenizer, seed=s)
        for s in (3, 3, 4)
    ]
    assert runs[0].token_ids == runs[1].token_ids
    assert runs[0].loss_trace == runs[1].loss_trace
    assert runs[0].loss_trace != runs[2].loss_trace


def test_output_has_true_lengths_special_tokens_and_only_candidate_ids(
    tiny_model, tiny_tokenizer, tiny_snapshot
):
    result = GradMatchAttack(**SHORT).reconstruct(
        tiny_model, tiny_snapshot, tokenizer=tiny_tokenizer, seed=0
    )
    allowed = set(candidate_token_ids(tiny_tokenizer).tolist())
    for ids in result.token_ids:
        assert ids[0] == tiny_tokenizer.cls_token_id and ids[-1] == tiny_tokenizer.sep_token_id
        assert set(ids[1:-1]) <= allowed
    lengths = tiny_snapshot.batch["attention_mask"].sum(1).tolist()
    assert [len(ids) for ids in result.token_ids] == lengths
    assert result.texts == tiny_tokenizer.batch_decode(result.token_ids, skip_special_tokens=True)
    assert result.attack == "gradmatch" and result.options["steps"] == 40
    assert result.info["best_loss"] <= min(result.loss_trace)
    assert result.info["best_loss"] < result.info["init_loss"]


def test_budget_scales_steps_and_initial_candidates(tiny_model, tiny_tokenizer, tiny_snapshot):
    attack = GradMatchAttack(**SHORT)
    half = attack.reconstruct(
        tiny_model, tiny_snapshot, tokenizer=tiny_tokenizer, seed=0, budget=0.5
    )
    assert len(half.loss_trace) == half.info["steps"] == 20
    assert half.info["init_candidates"] == half.info["init_permutations"] == 3
    tiny = attack.reconstruct(
        tiny_model, tiny_snapshot, tokenizer=tiny_tokenizer, seed=0, budget=1e-3
    )
    assert tiny.info["steps"] == tiny.info["init_candidates"] == 1
    with pytest.raises(GradAuditError, match="budget"):
        attack.reconstruct(tiny_model, tiny_snapshot, tokenizer=tiny_tokenizer, budget=0)


@pytest.mark.slow
def test_recovers_the_words_of_a_short_sentence_from_the_layer0_query_of_minilm(minilm):
    # Measured at budget 0.1 (200 steps), seeds 0-4: ROUGE-1 0.75, 0.75, 0.5, 0.75, 0.75
    # (seed 0: "i love film love"), token recall at position 0.25-0.5; "love" and "film" always
    # come back, "this" never, and word order mostly not.
    model, tokenizer = minilm
    text = "i love this film"
    snapshot = capture(model, make_batch(model, tokenizer, [text], [1]), [QUERY0])
    result = GradMatchAttack().reconstruct(model, snapshot, tokenizer=tokenizer, seed=0, budget=0.1)
    scores = score([text], result.texts)
    assert scores.rouge1 >= 0.5, result.texts
    assert {"love", "film"} <= set(result.texts[0].split()), result.texts
    assert result.token_ids[0][0] == tokenizer.cls_token_id
    assert len(result.token_ids[0]) == len(tokenizer(text)["input_ids"])
