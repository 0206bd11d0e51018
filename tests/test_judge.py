"""The judge interface: no judge is an error, the OpenAI-compatible client against a local server, the MM-Vet and
LLaVA-Bench rubrics' scoring, and replies without a score raising instead of counting as zero."""
import pytest
from judge_server import JudgeServer

from efficientllava.judge import (JudgeError, OpenAIChatJudge, parse_llava_bench, parse_mmvet, require_judge,
                                  score_with_judge)


class Scripted:
    """A judge whose replies are given in advance, in order."""

    name = "scripted"

    def __init__(self, replies):
        self.replies, self.prompts = list(replies), []

    def complete(self, prompt):
        self.prompts.append(prompt)
        return self.replies.pop(0)


def rows(metric, categories, context=""):
    return [{"id": f"q{i}", "question": f"question {i}?", "prediction": f"answer {i}", "answers": [f"truth {i}"],
             "category": c, "metric": metric, "judge_context": context} for i, c in enumerate(categories)]


def test_a_judged_benchmark_without_judge_is_an_error():
    with pytest.raises(JudgeError, match="benchmark 'mmvet' is scored by a judge model and no judge is configured; "
                                         "expected judge=openai"):
        require_judge("mmvet", None, "mmvet")
    require_judge("vqa", None)  # VQA accuracy needs none
    with pytest.raises(JudgeError, match="no judge is configured"):
        score_with_judge(rows("llava_bench", ["conv"]), None)


def test_missing_api_key_is_named(monkeypatch):
    monkeypatch.delenv("MY_JUDGE_KEY", raising=False)
    with pytest.raises(JudgeError, match=r"\$MY_JUDGE_KEY, which is not set"):
        OpenAIChatJudge("some-model", api_key_env="MY_JUDGE_KEY")


def test_openai_client_sends_a_chat_request_and_reads_the_reply(monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test")
    with JudgeServer(lambda prompt: "0.7" if "Ground truth: Paris" in prompt else "?") as server:
        judge = OpenAIChatJudge("grader-1", base_url=server.url, api_key_env="MY_JUDGE_KEY", retries=1)
        summary, judged = score_with_judge([{**rows("mmvet", ["know"])[0], "answers": ["Paris"]}], judge)
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-test"
    assert request["body"]["model"] == "grader-1" and request["body"]["temperature"] == 0.0
    assert request["body"]["messages"][0]["role"] == "system"
    assert judged[0]["score"] == 0.7 and summary["score"] == pytest.approx(70.0)
    assert summary["judge"].startswith("grader-1")


def test_http_errors_are_named_not_retried_forever(monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "bad")
    with JudgeServer(lambda prompt: "1.0", status=401) as server:
        judge = OpenAIChatJudge("grader-1", base_url=server.url, api_key_env="MY_JUDGE_KEY", retries=3)
        with pytest.raises(JudgeError, match="did not answer \\(HTTP 401"):
            judge.complete("hello")
    assert len(server.requests) == 1


def test_mmvet_scores_per_capability():
    judged_rows = rows("mmvet", ["ocr,math", "rec,know", "rec"])
    judge = Scripted(["0.5", "Score: 1.0", "0.0"])
    summary, judged = score_with_judge(judged_rows, judge)
    assert [j["score"] for j in judged] == [0.5, 1.0, 0.0]
    assert summary["score"] == pytest.approx(100 * 1.5 / 3)
    assert summary["score/rec"] == pytest.approx(50.0) and summary["score/ocr"] == pytest.approx(50.0)
    assert summary["score/know"] == pytest.approx(100.0) and summary["n"] == 3
    assert "Ground truth: truth 0" in judge.prompts[0] and "Model answer: answer 0" in judge.prompts[0]


def test_llava_bench_is_relative_to_the_reference():
    judged_rows = rows("llava_bench", ["conv", "detail"], context="a red gate in water")
    judge = Scripted(["8 6\nThe second misses details.", "10, 10\nBoth good."])
    summary, judged = score_with_judge(judged_rows, judge)
    assert summary["score"] == pytest.approx(100 * (6 + 10) / (8 + 10))
    assert summary["score/conv"] == pytest.approx(75.0) and summary["score/detail"] == pytest.approx(100.0)
    assert summary["reference_mean"] == 9 and summary["model_mean"] == 8
    assert "a red gate in water" in judge.prompts[0]  # the caption goes to the judge
    assert "[Assistant 1]\ntruth 0" in judge.prompts[0] and "[Assistant 2]\nanswer 0" in judge.prompts[0]


def test_a_reply_without_a_score_is_asked_again_then_raises():
    judge = Scripted(["I think it is good.", "Looks fine!"])
    with pytest.raises(JudgeError, match="reply for record 'q0' holds no score: 'Looks fine!'; expected a number"):
        score_with_judge(rows("mmvet", ["rec"]), judge, retries=2)
    assert len(judge.prompts) == 2
    judge = Scripted(["unparsable", "7 9\nok"])
    summary, _ = score_with_judge(rows("llava_bench", ["conv"]), judge, retries=2)
    assert summary["score"] == pytest.approx(100 * 9 / 7)


@pytest.mark.parametrize("reply, value", [("0.8", 0.8), ("The score is 1", 1.0), ("5 out of 10", None),
                                          ("", None)])
def test_parse_mmvet(reply, value):
    assert parse_mmvet(reply) == value


@pytest.mark.parametrize("reply, value", [("7 8\nwhy", (7.0, 8.0)), ("7, 8", (7.0, 8.0)), ("7\n8", None),
                                          ("0 11", None)])
def test_parse_llava_bench(reply, value):
    assert parse_llava_bench(reply) == value


def test_rows_of_several_benchmarks_are_refused():
    with pytest.raises(JudgeError, match=r"scored by \['llava_bench', 'mmvet'\]; expected rows of one"):
        score_with_judge(rows("mmvet", ["rec"]) + rows("llava_bench", ["conv"]), Scripted([]))
