"""The LLM judge against a local OpenAI-compatible stub server (127.0.0.1, a free port, per test)."""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from vift.benchmarks.formats import load_benchmark
from vift.benchmarks.judge import Judge, JudgeConfig
from vift.benchmarks.scoring import make_scorer
from vift.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
KEY = "sk-test-0123456789"


class Stub:
    """Records every request; ``reply(body) -> (status, content or payload)`` decides the answer."""

    def __init__(self):
        self.requests: list[dict] = []
        self.reply = lambda body: (200, "0")
        self.delay = 0.0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                stub.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                if stub.delay:
                    time.sleep(stub.delay)
                status, content = stub.reply(body)
                if isinstance(content, str) and status == 200:
                    content = {"id": "x", "object": "chat.completion", "model": body["model"],
                               "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}  # fmt: skip
                data = (json.dumps(content) if isinstance(content, dict) else content).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def prompts(self) -> list[str]:
        return [r["body"]["messages"][0]["content"] for r in self.requests]


@pytest.fixture
def stub():
    server = Stub()
    yield server
    server.server.shutdown()
    server.server.server_close()


def judge_for(stub: Stub, sleeps: list | None = None, **config) -> Judge:
    settings = {"base_url": stub.base_url, "model": "stub-model", "api_key": KEY, "timeout": 5.0, "retries": 2, "backoff": 1.0}
    settings.update(config)
    return Judge(JudgeConfig(**settings), sleep=(sleeps.append if sleeps is not None else lambda s: None))


def response_in(prompt: str) -> str:
    """The response an extraction prompt asks about (its last "Model response:")."""
    return prompt.rsplit("Model response: ", 1)[1].removesuffix("\nExtracted answer:")


def records(benchmark: str) -> dict:
    return {r.id: r for r in load_benchmark(benchmark, FIXTURES / benchmark)[0]}


def test_extraction_request_is_an_openai_chat_completion_with_question_and_response(stub):
    stub.reply = lambda body: (200, "22.3")
    extracted = judge_for(stub).extract("How far apart are Ned and Bart?", "So the distance d is about 22.3 m.")
    assert extracted == "22.3"
    (request,) = stub.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {KEY}"
    body = request["body"]
    assert body["model"] == "stub-model" and body["temperature"] == 0
    assert [m["role"] for m in body["messages"]] == ["user"]
    assert "\nHow far apart are Ned and Bart?\nModel response: So" in body["messages"][0]["content"]
    assert body["messages"][0]["content"].endswith("Model response: So the distance d is about 22.3 m.\nExtracted answer:")


def test_agreement_verdict_is_read_from_the_judges_reply(stub):
    replies = iter(["Judgement: 1", "0", "I think 1"])
    stub.reply = lambda body: (200, next(replies))
    judge = judge_for(stub)
    assert [judge.agrees("q", "5", "5"), judge.agrees("q", "5", "6"), judge.agrees("q", "5", "five")] == [True, False, True]
    assert "Reference answer: 5\nModel answer: 6\nJudgement:" in stub.prompts()[1]


def test_mathverse_is_scored_by_extraction_then_judgement(stub):
    record = records("mathverse")["2"]  # free form, gold 22.3, question_for_eval set

    def reply(body):
        prompt = body["messages"][0]["content"]
        if prompt.endswith("Extracted answer:"):
            return 200, "22.3" if "22.3" in response_in(prompt) else "null"
        return 200, "1" if "Model answer: 22.3" in prompt and "Reference answer: 22.3" in prompt else "0"

    stub.reply = reply
    scorer = make_scorer("mathverse", judge_for(stub))
    assert scorer(record, "Twenty-two point three? No: d = 22.3 m.") == {"extracted": "22.3", "correct": True, "scored_by": "judge"}
    assert "Question: How far apart are Ned and Bart, to one decimal place?" in stub.prompts()[1]
    assert scorer(record, "I cannot tell.") == {"extracted": "", "correct": False, "scored_by": "judge"}
    assert len(stub.requests) == 3  # no judgement asked for a null extraction


def test_mathvista_with_the_judge_scores_the_extraction_by_exact_match(stub):
    record = records("mathvista")["2"]  # choices 1/4, 1/2, 3/4; gold 1/2
    stub.reply = lambda body: (200, "(B) 1/2")
    result = make_scorer("mathvista", judge_for(stub))(record, "Half of it is blue, so (B).")
    assert (result["extracted"], result["correct"], result["judge_extracted"]) == ("B", True, "(B) 1/2")
    assert len(stub.requests) == 1  # extraction only: MathVista needs no judgement


def test_server_errors_are_retried_with_exponential_backoff(stub):
    statuses = iter([500, 503, 200])
    stub.reply = lambda body: (next(statuses), "7")
    sleeps: list[float] = []
    assert judge_for(stub, sleeps).extract("q", "It is 7.") == "7"
    assert len(stub.requests) == 3 and sleeps == [1.0, 2.0]


def test_client_errors_fail_at_once_without_leaking_the_key(stub):
    stub.reply = lambda body: (401, {"error": {"message": f"Incorrect API key provided: {KEY}"}})
    with pytest.raises(UserError) as raised:
        judge_for(stub).extract("q", "It is 7.")
    message = str(raised.value)
    assert "HTTP 401" in message and "VIFT_JUDGE_API_KEY" in message and KEY not in message
    assert len(stub.requests) == 1


def test_slow_endpoint_times_out_and_is_retried(stub):
    stub.delay = 0.5
    stub.reply = lambda body: (200, "7")
    with pytest.raises(UserError, match=r"after 2 attempt\(s\) \(.*timed out"):
        judge_for(stub, timeout=0.1, retries=1).extract("q", "It is 7.")
    assert len(stub.requests) == 2


def test_unreachable_endpoint_is_a_clear_user_error():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    judge = Judge(JudgeConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", api_key=KEY, retries=1), sleep=lambda s: None)
    with pytest.raises(UserError) as raised:
        judge.extract("q", "It is 7.")
    message = str(raised.value)
    assert f"http://127.0.0.1:{port}/v1/chat/completions unreachable" in message and "VIFT_JUDGE_BASE_URL" in message
    assert KEY not in message


def test_config_comes_from_the_environment():
    env = {"VIFT_JUDGE_BASE_URL": "http://localhost:8000/v1/", "VIFT_JUDGE_API_KEY": KEY, "VIFT_JUDGE_RETRIES": "1"}
    config = JudgeConfig.from_env(default_model="from-params", environ=env)
    assert (config.url, config.model, config.api_key, config.retries) == (
        "http://localhost:8000/v1/chat/completions",
        "from-params",
        KEY,
        1,
    )
    assert JudgeConfig.from_env("from-params", {**env, "VIFT_JUDGE_MODEL": "gpt-4o-mini"}).model == "gpt-4o-mini"
    assert KEY not in repr(config)
    with pytest.raises(UserError, match="VIFT_JUDGE_BASE_URL is not set"):
        JudgeConfig.from_env("m", environ={})


# --- through `vift eval` ------------------------------------------------------------------------------


def run_eval(argv: list[str], params_file: Path) -> int:
    from vift.eval.cli import add_commands

    parser = argparse.ArgumentParser(prog="vift")
    add_commands(parser.add_subparsers(dest="command"), lambda p: p.add_argument("--params", default=str(params_file)))
    args = parser.parse_args(["eval", *argv])
    return args.func(args)


def test_eval_command_scores_with_the_judge(stub, tiny_checkpoint, tmp_path, monkeypatch):
    canned = {"1": "B. Four stars", "2": "It is 7.", "3": "one half"}  # MathVision fixture ids
    by_question = {r.question: canned[r.id] for r in records("mathvision").values()}
    monkeypatch.setattr(
        "vift.eval.runner.fused_generate", lambda model, processor, images, questions, fusion, **kw: [by_question[q] for q in questions]
    )
    extractions = {"B. Four stars": "B", "It is 7.": "7", "one half": "1/2"}

    def reply(body):
        prompt = body["messages"][0]["content"]
        if prompt.endswith("Extracted answer:"):
            return 200, extractions[response_in(prompt)]
        return 200, "0" if "Model answer: B" in prompt else "1"  # the judge's verdict decides, not the rules

    stub.reply = reply
    monkeypatch.setenv("VIFT_JUDGE_BASE_URL", stub.base_url)
    monkeypatch.setenv("VIFT_JUDGE_MODEL", "stub-model")
    monkeypatch.setenv("VIFT_JUDGE_API_KEY", KEY)
    out = tmp_path / "out"
    argv = [
        "--benchmark",
        "mathvision",
        "--data",
        str(FIXTURES / "mathvision"),
        "--model",
        str(tiny_checkpoint),
        "--judge",
        "--out",
        str(out),
    ]
    assert run_eval(argv, tmp_path / "no-params.yaml") == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [(r["extracted"], r["correct"], r["scored_by"]) for r in rows] == [
        ("B", False, "judge"),
        ("7", True, "judge"),
        ("1/2", True, "judge"),
    ]
    assert metrics["accuracy"] == pytest.approx(2 / 3) and metrics["scoring"] == "judge (stub-model)"
    assert any("Reference answer: B (4)\nModel answer: B\n" in p for p in stub.prompts())  # letter + option text


def test_judge_enabled_in_params_without_an_endpoint_fails_before_loading_a_model(tmp_path, monkeypatch):
    monkeypatch.delenv("VIFT_JUDGE_BASE_URL", raising=False)
    params = tmp_path / "params.yaml"
    params.write_text("eval:\n  judge:\n    enabled: true\n")
    argv = [
        "--benchmark",
        "mathvision",
        "--data",
        str(FIXTURES / "mathvision"),
        "--model",
        str(tmp_path / "absent"),
        "--out",
        str(tmp_path / "out"),
    ]
    with pytest.raises(UserError, match="VIFT_JUDGE_BASE_URL is not set"):
        run_eval(argv, params)
    assert not (tmp_path / "out").exists()
