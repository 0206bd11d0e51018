"""Scoring open-ended answers with a judge model (MM-Vet, LLaVA-Bench), through a pluggable interface.

A judge is any object with `name` and `complete(prompt: str) -> str` (`conf/judge/*.yaml` instantiates one). The
rubrics, written for this project after each benchmark's published protocol:

- **mmvet**: the judge sees the question, the ground truth (where "<AND>" joins parts that must all be present and
  "<OR>" alternatives) and the model's answer, and replies with a correctness score from 0.0 to 1.0. The benchmark
  score is the mean x 100, overall and per capability (a question counts for each of its capabilities).
- **llava_bench**: the judge sees the image's caption (it cannot see the image), the question, the reference
  answer (GPT-4's) and the model's answer, and rates each from 1 to 10 ("<reference> <model>" on the first line).
  The score is 100 x the model's mean / the reference's mean, overall and per category; the two means are reported
  too.

A reply that does not hold the asked-for numbers is asked again (`retries`), then raises `JudgeError` naming the
record and the reply: an answer is never silently scored 0. No judge configured raises before any generation.
Judge scores depend on the judge model: report it (it is written beside the scores).
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections import defaultdict

from efficientllava.data.schema import JUDGED

log = logging.getLogger(__name__)

NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


class JudgeError(RuntimeError):
    """No judge, a judge that cannot be reached, or a reply that holds no score."""


def require_judge(metric: str, judge, benchmark: str = "") -> None:
    """Judge-scored benchmarks refuse to run without a judge (before any answer is generated)."""
    if metric in JUDGED and judge is None:
        raise JudgeError(
            f"benchmark {benchmark or metric!r} is scored by a judge model and no judge is configured; expected "
            "judge=openai (an OpenAI-compatible chat API, key in $OPENAI_API_KEY) or your own conf/judge/*.yaml, "
            "or predictions_only=true to write the answers without a score")


class OpenAIChatJudge:
    """A judge behind an OpenAI-compatible chat-completions endpoint; the API key is read from the environment."""

    def __init__(self, model: str, base_url: str = "https://api.openai.com/v1", api_key_env: str = "OPENAI_API_KEY",
                 temperature: float = 0.0, max_tokens: int = 256, timeout_s: float = 60.0, retries: int = 3,
                 system: str = "You are a careful, impartial grader of answers to questions about images."):
        key = os.environ.get(api_key_env)
        if not key:
            raise JudgeError(f"the judge needs an API key in the environment variable ${api_key_env}, which is not "
                             "set; expected `export " + api_key_env + "=...` (or judge.api_key_env=OTHER_VARIABLE)")
        self.model, self.url = str(model), str(base_url).rstrip("/") + "/chat/completions"
        self.temperature, self.max_tokens = float(temperature), int(max_tokens)
        self.timeout_s, self.retries, self.system = float(timeout_s), int(retries), system
        self._key = key
        self.name = f"{self.model} @ {base_url}"

    def complete(self, prompt: str) -> str:
        body = json.dumps({"model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens,
                           "messages": [{"role": "system", "content": self.system},
                                        {"role": "user", "content": prompt}]}).encode()
        request = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {self._key}"})
        last = None
        for attempt in range(max(self.retries, 1)):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    data = json.loads(response.read().decode())
                return data["choices"][0]["message"]["content"]
            except urllib.error.HTTPError as err:
                detail = err.read().decode(errors="replace")[:300]
                last = f"HTTP {err.code}: {detail}"
                if err.code in (400, 401, 403, 404):  # will not get better by asking again
                    break
            except (urllib.error.URLError, TimeoutError, KeyError, IndexError, json.JSONDecodeError) as err:
                last = f"{type(err).__name__}: {err}"
            time.sleep(min(2**attempt, 10))
        raise JudgeError(f"the judge at {self.url} did not answer ({last}); expected a chat-completions reply")


# ---- rubrics ------------------------------------------------------------------------------------------------------
def mmvet_prompt(question: str, reference: str, prediction: str) -> str:
    return (
        "Grade how correct a model's answer to a question about an image is, compared with the ground truth.\n"
        "In the ground truth, <AND> joins parts that must all be present and <OR> separates acceptable "
        "alternatives. Give partial credit for partly correct or incomplete answers; wording may differ.\n"
        "Reply with one number from 0.0 (wrong) to 1.0 (fully correct), in steps of 0.1, and nothing else.\n\n"
        f"Question: {question}\nGround truth: {reference}\nModel answer: {prediction}\nScore:")


def llava_bench_prompt(context: str, question: str, reference: str, prediction: str) -> str:
    return (
        "Two assistants answered a user's question about an image. You cannot see the image; its description "
        "is given below.\n"
        f"Image description: {context}\nQuestion: {question}\n\n"
        f"[Assistant 1]\n{reference}\n[End of Assistant 1]\n\n[Assistant 2]\n{prediction}\n[End of Assistant 2]\n\n"
        "Rate the helpfulness, relevance, accuracy and level of detail of each answer on a scale of 1 to 10 "
        "(higher is better). On the first line write only the two scores, Assistant 1's then Assistant 2's, "
        "separated by a space. Then explain your ratings briefly, without favouring either by its position or "
        "length.")


def parse_mmvet(reply: str) -> float | None:
    for match in NUMBER.findall(reply):
        value = float(match)
        if 0.0 <= value <= 1.0:
            return value
    return None


def parse_llava_bench(reply: str) -> tuple[float, float] | None:
    first = reply.strip().splitlines()[0] if reply.strip() else ""
    numbers = [float(n) for n in NUMBER.findall(first.replace(",", " "))]
    if len(numbers) >= 2 and all(1.0 <= n <= 10.0 for n in numbers[:2]):
        return numbers[0], numbers[1]
    return None


def _ask(judge, prompt: str, parse, rid: str, retries: int):
    reply = ""
    for _ in range(max(retries, 1)):
        reply = judge.complete(prompt)
        value = parse(reply)
        if value is not None:
            return value, reply
    raise JudgeError(f"the judge's reply for record {rid!r} holds no score: {reply[:200]!r}; expected "
                     + ("a number from 0 to 1" if parse is parse_mmvet else "two scores from 1 to 10 on the first line"))


def score_with_judge(rows: list[dict], judge, retries: int = 2) -> tuple[dict, list[dict]]:
    """(summary, per-record judgements) for prediction rows of one judge-scored benchmark."""
    metrics = {r["metric"] for r in rows}
    if len(metrics) != 1 or not metrics <= set(JUDGED):
        raise JudgeError(f"rows are scored by {sorted(metrics)}; expected rows of one judge-scored benchmark "
                         f"{list(JUDGED)}")
    metric = metrics.pop()
    require_judge(metric, judge)
    judged = []
    for row in rows:
        if metric == "mmvet":
            prompt = mmvet_prompt(row["question"], row["answers"][0], row["prediction"])
            score, reply = _ask(judge, prompt, parse_mmvet, row["id"], retries)
            judged.append({"id": row["id"], "category": row["category"], "score": score, "reply": reply})
        else:
            prompt = llava_bench_prompt(row.get("judge_context", ""), row["question"], row["answers"][0],
                                        row["prediction"])
            (reference, model), reply = _ask(judge, prompt, parse_llava_bench, row["id"], retries)
            judged.append({"id": row["id"], "category": row["category"], "reference_score": reference,
                           "score": model, "reply": reply})
    summary = mmvet_summary(judged) if metric == "mmvet" else llava_bench_summary(judged)
    summary["judge"] = getattr(judge, "name", type(judge).__name__)
    return summary, judged


def mmvet_summary(judged: list[dict]) -> dict:
    """Mean score x 100, overall and per capability (each capability of a question counts it)."""
    out = {"score": 100.0 * sum(j["score"] for j in judged) / len(judged), "n": len(judged)}
    per = defaultdict(list)
    for j in judged:
        for capability in j["category"].split(","):
            per[capability].append(j["score"])
    for capability in sorted(per):
        out[f"score/{capability}"] = 100.0 * sum(per[capability]) / len(per[capability])
    return out


def llava_bench_summary(judged: list[dict]) -> dict:
    """100 x model mean / reference mean, overall and per category, with the two means."""
    def relative(rows):
        ref = sum(r["reference_score"] for r in rows) / len(rows)
        model = sum(r["score"] for r in rows) / len(rows)
        return 100.0 * model / ref, ref, model

    score, ref, model = relative(judged)
    out = {"score": score, "reference_mean": ref, "model_mean": model, "n": len(judged)}
    per = defaultdict(list)
    for j in judged:
        per[j["category"]].append(j)
    for category in sorted(per):
        out[f"score/{category}"] = relative(per[category])[0]
    return out
