"""The lockers task (issue #16): per-question tool state, a misleading wrong locker, demonstrations
whose argument skill is the config's, and the right-call counts the gate reads."""

import json
import random

import pytest

from axpo.agent.trajectory import ToolCallRecord, Trajectory
from axpo.eval import EvalRecord, QuestionResult, summarize
from axpo.rollout_stats import RolloutCounts
from axpo.tasks import DemoConfig, generate_task, make_demonstrations, verify
from axpo.tasks.lockers import LockersConfig, argument_skill, call_correct
from axpo.tools import ToolContext, build_tools


@pytest.fixture(scope="module")
def registry():
    return build_tools(["open_locker"])


def _call(registry, sample, arguments):
    return registry.execute(json.dumps({"name": "open_locker", "arguments": arguments}), ToolContext(sample=sample))[1]


def test_target_letter_is_unique_and_wrong_lockers_mislead(registry):
    for s in generate_task("lockers", 60, seed=3):
        k, slots = s.meta["target"], s.meta["slots"]
        assert len(slots) == 9 and slots[k - 1] == s.answer and slots.count(s.answer) == 1
        assert f"locker {k}?" in s.question and s.answer in "ABCDEF"
        for j in range(1, 10):
            r = _call(registry, s, {"locker": j})
            assert r.error is None and r.text == f"Locker {j} holds {{{slots[j - 1]}}}."
            said = f"The answer is \\boxed{{{slots[j - 1]}}}."
            assert verify(s, said) == (1.0 if j == k else 0.0)   # a wrong locker's letter is never right


def test_the_tool_reads_the_question_it_is_called_for(registry):
    a, b = generate_task("lockers", 2, seed=5)
    assert a.meta["slots"] != b.meta["slots"]
    assert _call(registry, a, {"locker": 1}).text.endswith("{" + a.meta["slots"][0] + "}.")
    assert _call(registry, b, {"locker": 1}).text.endswith("{" + b.meta["slots"][0] + "}.")


@pytest.mark.parametrize("arguments, kind, words", [
    ({"locker": 0}, "out_of_range", "between 1 and 9, got 0"),
    ({"locker": 10}, "out_of_range", "between 1 and 9, got 10"),
    ({"locker": "7"}, "bad_arguments", "'locker'"),
    ({"locker": 10 ** 40}, "bad_arguments", "'locker'"),
    ({"locker": 7, "peek": True}, "bad_arguments", "unknown argument 'peek'"),
    ({}, "bad_arguments", "missing required argument 'locker'"),
])
def test_bad_calls_are_messages_to_the_model(registry, arguments, kind, words):
    [s] = generate_task("lockers", 1, seed=1)
    r = _call(registry, s, arguments)
    assert r.error == kind and words in r.text


def test_no_question_no_lockers(registry):
    r = registry.execute('{"name": "open_locker", "arguments": {"locker": 1}}', ToolContext())[1]
    assert r.error == "no_lockers"


def test_options_are_task_options():
    [s] = generate_task("lockers", 1, seed=2, options={"slots": 20, "options": 4, "think_names_target": True})
    assert len(s.meta["slots"]) == 20 and s.answer in "ABCD" and "Lockers 1 to 20" in s.question
    with pytest.raises(ValueError, match="slots = 1"):
        LockersConfig(slots=1)


@pytest.mark.parametrize("wrong", [0.9, 0.5])
def test_demonstrated_argument_skill_is_the_configs(registry, wrong):
    samples = generate_task("lockers", 600, seed=7)
    demos = make_demonstrations(samples, registry, seed=0, cfg=DemoConfig(tool_prob=0.5, wrong_call_prob=wrong))
    used = [d for d in demos if d.used_tool]
    assert 0.4 < len(used) / len(demos) < 0.6
    right = sum(d.tool_call_correct for d in used) / len(used)
    assert abs(right - argument_skill(wrong)) < 0.07
    for d, s in zip(demos, samples):
        if d.used_tool:
            call = d.messages[1]["tool_calls"][0]["function"]
            assert call_correct(s, call) == d.tool_call_correct   # the answer follows the locker read
            assert str(s.meta["target"]) not in d.messages[1]["reasoning_content"]   # the think does not name k
            assert d.messages[-1]["content"].endswith(
                f"{{{s.meta['slots'][call['arguments']['locker'] - 1]}}}.")


def test_right_call_counts_and_eval_keys():
    s = generate_task("lockers", 1, seed=9)[0]
    k = s.meta["target"]

    def traj(locker, reward):
        t = Trajectory(uid=str(random.random()), sample_uid=s.uid, group=0, prompt_len=0, reward=reward)
        if locker is not None:
            t.tool_calls.append(ToolCallRecord(0, 1, "open_locker", {"locker": locker}, None))
        return t

    ts = [traj(k, 1.0), traj(k, 0.0), traj(k % 9 + 1, 0.0), traj(None, 1.0), traj(None, 0.0)]
    c = RolloutCounts.of(ts, call_correct=lambda call: call_correct(s, call))
    assert (c.tool_users, c.right_callers, c.correct_right_callers) == (3, 2, 1)
    r = c.rates()
    assert r["right_call_rate"] == pytest.approx(2 / 3) and r["accuracy_after_right_call"] == 0.5
    assert RolloutCounts.of(ts).right_callers == 0                    # no check: no count
    out = summarize(EvalRecord([QuestionResult("lockers", 5, 2)], {"lockers": c}), n=5)
    assert out["lockers/right_call_rate"] == pytest.approx(2 / 3)
    assert out["lockers/accuracy_after_right_call"] == 0.5 and out["lockers/accuracy_without_tool"] == 0.5


def test_a_rejected_call_is_never_a_right_call(registry):
    """`{"locker": true}` equals 1 in Python, but the registry rejects it (not an integer): the
    right-call counts take only calls the tool ran."""
    s = next(x for x in generate_task("lockers", 200, seed=4) if x.meta["target"] == 1)
    call, result = registry.execute('{"name": "open_locker", "arguments": {"locker": true}}', ToolContext(sample=s))
    assert result.error == "bad_arguments"
    t = Trajectory(uid="u", sample_uid=s.uid, group=0, prompt_len=0, reward=0.0)
    t.tool_calls.append(ToolCallRecord(0, 1, call.name, call.arguments, result.error))
    c = RolloutCounts.of([t], call_correct=lambda cl: call_correct(s, cl))
    assert c.tool_users == 1 and c.right_callers == 0
