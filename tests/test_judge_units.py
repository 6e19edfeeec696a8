"""Verdict parsing, the swap rule, tables, agreement, question and prompt files (no bus)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bus import combine_games
from judge.prompts import load_prompts, pick_prompt
from judge.questions import load_questions, load_references, parse_questions, select, with_references
from judge.results import compute_agreement, pairwise_stats, show_result, single_scores
from judge.schemas import EvalSpec
from judge.verdicts import Unparseable, pair_winner, parse_choice, parse_rating

# The MT-bench files sit beside the checkout (../shared/data), as CI lays it out.
MT_BENCH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mt_bench"


@pytest.mark.parametrize(
    ("reply", "rating"),
    [
        ("Good answer. Rating: [[8]]", 8.0),
        ("Rating: [[ 7.5 ]]", 7.5),
        ("I'd say [[9]] ... final: [[9]]", 9.0),
        ("Rating: [6]", 6.0),  # one bracket lost: FastChat's backup pattern
        ("[[10]]", 10.0),
    ],
)
def test_ratings_are_read_from_double_brackets(reply: str, rating: float) -> None:
    assert parse_rating(reply) == rating


@pytest.mark.parametrize(
    "reply", ["Rating: 8/10", "[[rating]]", "[[5]] or maybe [[7]]", "Rating: [[11]]", "[[0]]", ""]
)
def test_bad_ratings_are_unparseable(reply: str) -> None:
    with pytest.raises(Unparseable):
        parse_rating(reply)


def test_choices_and_the_swap_rule() -> None:
    assert parse_choice("B wins: [[B]]") == "B" and parse_choice("[[C]]") == "C"
    for bad in ("A is better", "[[A]] if A is better, [[B]] if B", "[[D]]"):
        with pytest.raises(Unparseable):
            parse_choice(bad)
    # game 1 shows model_1 as A; game 2 shows model_2 as A
    assert pair_winner("A", swapped=False) == "model_1" and pair_winner("A", swapped=True) == "model_2"
    assert pair_winner("B", swapped=True) == "model_1" and pair_winner("C", swapped=True) == "tie"
    assert combine_games("model_1", "model_1") == "model_1"
    assert combine_games("model_1", "model_2") == "tie"  # position bias: the orders disagree
    assert combine_games("model_2", "error") == "error"


def _pair(q: int, g1: str, g2: str, turn: int = 1, cat: str = "math") -> dict:
    return {
        "question_id": q,
        "model_1": "x",
        "model_2": "y",
        "g1_winner": g1,
        "g2_winner": g2,
        "turn": turn,
        "category": cat,
        "judge": ["j", "pair"],
    }


def test_pairwise_tables_count_swaps_as_ties_and_skip_errors() -> None:
    js = [
        _pair(1, "model_1", "model_1"),
        _pair(2, "model_1", "model_2"),
        _pair(3, "model_2", "model_2", 2),
        {**_pair(4, "error", "model_1"), "error": "unparseable"},
    ]
    stats = pairwise_stats(js)
    x = stats[("x", "")]
    assert (x.win, x.loss, x.tie) == (1, 1, 1) and x.win_rate_adjusted == 0.5
    text = show_result(js)
    assert "win_rate_adjusted" in text and "3/4 judgments usable" in text and "unparseable 1" in text


def test_single_tables_leave_failures_out() -> None:
    js = [
        {"question_id": 1, "model": "m", "score": 6, "turn": 1, "category": "math", "judge": ["j", "s"]},
        {"question_id": 1, "model": "m", "score": 8, "turn": 2, "category": "math", "judge": ["j", "s"]},
        {"question_id": 2, "model": "m", "score": -1, "turn": 1, "category": "stem", "error": "timeout"},
    ]
    assert single_scores(js)["m"]["all"] == [6.0, 8.0]
    text = show_result(js)
    assert "7.00" in text and "timeout 1" in text


def test_agreement_between_two_judges() -> None:
    a = [_pair(1, "model_1", "model_1"), _pair(2, "model_2", "model_2"), _pair(3, "model_1", "model_2")]
    b = [_pair(1, "model_1", "model_1"), _pair(2, "model_1", "model_1"), _pair(3, "tie", "tie")]
    agreement = compute_agreement(a, b)
    assert (agreement.n, agreement.agree) == (3, 2)  # q1 agree, q2 disagree, q3 both tie
    assert (agreement.n_without_ties, agreement.agree_without_ties) == (2, 1)
    single = [{"question_id": 1, "model": m, "score": s, "turn": 1} for m, s in (("x", 9), ("y", 2))]
    assert compute_agreement(single, a).agree == 1  # grades become a pairwise vote


def test_builtin_questions_and_mt_bench_with_references() -> None:
    builtin = load_questions()
    assert 10 <= len(builtin) <= 16 and {"math", "reasoning", "coding"} <= {q.category for q in builtin}
    assert all(q.reference for q in builtin if q.needs_reference)
    if not MT_BENCH.exists():
        if os.environ.get("CI"):  # CI always has ../shared: missing data there is a broken layout
            pytest.fail(f"MT-bench data missing at {MT_BENCH} (CI checks out ../shared beside the repo)")
        pytest.skip(f"MT-bench data not beside this checkout ({MT_BENCH})")
    mt = load_questions(MT_BENCH / "question.jsonl")
    assert len(mt) == 80 and all(len(q.turns) == 2 for q in mt)
    merged = with_references(mt, load_references(MT_BENCH / "reference_answer" / "gpt-4.jsonl"))
    assert all(q.reference for q in merged if q.needs_reference)
    assert [q.question_id for q in select(merged, [81, "120"])] == [81, 120]


def test_question_file_errors_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="question_id, category and turns"):
        parse_questions('{"turns": ["hi"]}', "q.jsonl")
    with pytest.raises(ValueError, match="appears twice"):
        parse_questions("\n".join([json.dumps({"question_id": 1, "category": "x", "turns": ["a"]})] * 2))


def test_every_prompt_variant_exists_and_renders() -> None:
    prompts = load_prompts()
    fields = {
        k: f"<{k}>"
        for k in (
            "question",
            "answer",
            "question_1",
            "answer_1",
            "question_2",
            "answer_2",
            "ref_answer_1",
            "ref_answer_2",
            "answer_a",
            "answer_b",
            "answer_a_1",
            "answer_b_1",
            "answer_a_2",
            "answer_b_2",
        )
    }
    for kind in ("single", "pairwise"):
        for multi in (False, True):
            for ref in (False, True):
                system, user = pick_prompt(prompts, kind, multi, ref).render(**fields)  # type: ignore[arg-type]
                assert ("[[A]]" if kind == "pairwise" else "[[") in system
                assert ("<ref_answer_1>" in user) == ref and ("<question_2>" in user) == multi


def test_spec_problems_are_explained() -> None:
    assert EvalSpec(models=["a"], judge="j").problems() == []
    assert "--baseline" in " ".join(EvalSpec(models=["a"], judge="j", mode="pairwise-baseline").problems())
    assert "two different models" in " ".join(
        EvalSpec(models=["a"], judge="j", mode="pairwise-all").problems()
    )
    spec = EvalSpec(models=["a", "b", "c"], judge="j", mode="pairwise-all")
    assert spec.pairs() == [("a", "b"), ("a", "c"), ("b", "c")]
    base = EvalSpec(models=["a", "b"], judge="j", mode="pairwise-baseline", baseline="b")
    assert base.pairs() == [("a", "b")] and base.answer_models() == ["a", "b"]
