"""Inference commands (infer.py: glm.py chat / predict / serve) against plain model.generate.

The reference everywhere is greedy `model.generate` on a model that has the LoRA adapter loaded
directly (not merged), one prompt at a time, decoded with glm.Tokenizer; the commands merge the
adapter, batch prompts with left padding, pipeline them over ranks, stream over HTTP.
"""
import http.client
import json
import os
import runpy
import shutil
import socket
import sys
import threading
from types import SimpleNamespace

import pytest
import torch

import glm
import infer
import lora
from conftest import TOK_PATH, fork_ranks, make_base, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

N = 6  # new tokens per answer: enough text to cut, cheap to generate


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A toy base whose answers depend on the prompt (std 0.3), a LoRA adapter folder as train_sft.py
    writes it (with ice_text.model), the adapted model unmerged (the reference) and the bare base."""
    root = tmp_path_factory.mktemp("infer")
    base = make_base(root / "base", std=0.3)
    model = glm.ChatGLM.from_pretrained(base).eval()
    lora.inject_lora(model, r=4, alpha=8, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, m in lora.lora_modules(model):
            m.lora_B["default"].copy_(torch.randn(m.lora_B["default"].shape, generator=g) * 0.5)
    adapter = str(root / "adapter")
    lora.save_adapter(model, adapter)
    shutil.copy(TOK_PATH, adapter)
    ref = lora.load_adapter(glm.ChatGLM.from_pretrained(base), adapter).eval()
    return SimpleNamespace(root=root, base=base, adapter=adapter, ref=ref, tok=glm.Tokenizer.from_dir(base),
                           bare=glm.ChatGLM.from_pretrained(base).eval())


def greedy(toy, query, history=(), n=N, model=None):
    """(text, new token ids) of greedy model.generate on one prompt."""
    ids = torch.tensor([toy.tok.encode(glm.chat_prompt(query, history))])
    new = (model or toy.ref).generate(ids, max_new_tokens=n)[0, ids.shape[1]:].tolist()
    return toy.tok.decode(new, skip_special_tokens=True), new


def cli(argv, monkeypatch):
    """`python infer.py ARGV` in this process (its __main__ block, which `python glm.py ARGV` runs in its
    place); the exit code, 0 if it returned."""
    monkeypatch.setattr("sys.argv", ["infer.py", *argv])
    try:
        runpy.run_module("infer", run_name="__main__")
    except SystemExit as e:
        return e.code
    return 0


# -----------------------------------------------------------------------------
# chat


def test_read_message_blocks_blank_lines_and_exit():
    lines = iter(["  hello  ", "", '"""', "line 1", "", "  line 3", ' """ ', "", "clear", '"""', "exit", "clear", '"""',
                  "exit", "quit"])
    ask = lambda prompt: next(lines)  # noqa: E731
    got = [infer.read_message(ask) for _ in range(6)]
    assert got == [("say", "hello"), ("say", "line 1\n\n  line 3"), ("clear", None),
                   ("say", "exit\nclear"), ("exit", None), ("exit", None)]  # inside a block, commands are text
    terminal = iter(['"""', "half a block"])

    def ctrl_d_at_the_end(prompt):
        for line in terminal:
            return line
        raise EOFError
    with pytest.raises(EOFError):  # Ctrl-D inside a block quits too
        infer.read_message(ctrl_d_at_the_end)


def test_chat_with_an_adapter_answers_as_the_adapted_model(toy, monkeypatch, capsys):
    lines = iter(["你好", '"""', "多行", "", "消息", '"""', "", "clear", "hello there", "exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    # --adapter alone: the base comes from its adapter_config.json
    argv = ["chat", "--adapter", toy.adapter, "--temperature", "0", "--max_new_tokens", str(N), "--device", "cpu"]
    assert cli(argv, monkeypatch) == 0
    printed = capsys.readouterr().out.split("ChatGLM: ")[1:]
    answers = [a.removesuffix("\n") for a in printed]
    a1 = greedy(toy, "你好")[0]
    assert answers == [a1, greedy(toy, "多行\n\n消息", [("你好", a1)])[0], greedy(toy, "hello there")[0]]
    assert a1 != greedy(toy, "你好", model=toy.bare)[0]  # the adapter changes the answer


# -----------------------------------------------------------------------------
# predict

INPUTS = [{"prompt": "你好"}, {"prompt": "1加1等于几", "history": [["hello", "there"]], "id": 7},
          {"instruction": "翻译", "input": "hello there"}, "", {"prompt": "hello there", "meta": {"k": [1, 2.5]}},
          {"prompt": "集"}]


def expected_lines(toy):
    """What predict must write: each input object plus the greedy answer to it, alone."""
    out = []
    for obj in (o for o in INPUTS if o):
        query = obj.get("prompt") or f"{obj['instruction']}\n{obj['input']}"
        out.append({**obj, "output": greedy(toy, query, obj.get("history", ()))[0]})
    return out


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def predict_argv(toy, data, out, *extra):
    return ["predict", "--model", toy.base, "--adapter", toy.adapter, "--data", str(data), "--out", str(out),
            "--max_new_tokens", str(N), "--batch_size", "2", *extra]


@pytest.fixture(scope="module")
def predicted(toy):
    """One single-process predict run: (data file, out file)."""
    data, out = write_jsonl(toy.root / "in.jsonl", INPUTS), toy.root / "out.jsonl"
    infer.main(predict_argv(toy, data, out))
    return data, out


def test_predict_writes_each_input_with_its_greedy_answer_in_order(toy, predicted):
    assert read_lines(predicted[1]) == expected_lines(toy)


def test_predict_resumes_after_a_cut_file_without_redoing_lines(toy, predicted, tmp_path, monkeypatch):
    data, full = predicted
    lines = full.read_bytes().split(b"\n")
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"\n".join(lines[:2]) + b"\n" + lines[2][:15])  # killed while writing line 3
    rows, generate = [], infer.dist.generate
    monkeypatch.setattr(infer.dist, "generate", lambda m, d, ids, *a, **k: rows.append(len(ids)) or generate(m, d, ids, *a, **k))
    infer.main(predict_argv(toy, data, out))
    assert sum(rows) == 3 and out.read_bytes() == full.read_bytes()
    infer.main(predict_argv(toy, data, out))  # complete: nothing to do
    assert sum(rows) == 3 and out.read_bytes() == full.read_bytes()


@pytest.mark.parametrize("pp", [2, 1])  # 2 stages; 2 replicas of 1 stage
def test_predict_on_two_ranks_writes_what_one_process_writes(toy, predicted, tmp_path, pp):
    data, full = predicted
    out = tmp_path / "out.jsonl"
    fork_ranks(lambda rank: infer.main(predict_argv(toy, data, out, "--pp", str(pp))), tmp_path / "ranks")
    assert out.read_bytes() == full.read_bytes()


# -----------------------------------------------------------------------------
# one-line errors (exit code 2, no traceback), nothing written


def test_user_errors_are_one_line(toy, predicted, tmp_path, monkeypatch, capsys):
    data, full = predicted
    wrong = tmp_path / "wrong.jsonl"
    rows = read_lines(full)
    rows[1]["prompt"] = "another question"
    write_jsonl(wrong, rows)
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"prompt": "q"}, {"instruction": "i", "output": "ref"}])
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    cases = [
        (["chat", "--model", toy.adapter], [toy.adapter, "--adapter", "--model BASE"]),
        (predict_argv(toy, data, wrong), [str(wrong), "line 2", f"{data}:2", "--overwrite"]),
        (predict_argv(toy, alpaca, tmp_path / "o.jsonl"), [f"{alpaca}:2", "'output'", "--output_key"]),
        (predict_argv(toy, data, data), ["--out", "is the --data file"]),
        (predict_argv(toy, data, tmp_path / "o.jsonl", "--batch_size", "0"), ["--batch_size", ">= 1"]),
        (["serve", "--model", toy.base, "--port", str(busy.getsockname()[1])], [str(busy.getsockname()[1]), "--port"]),
    ]
    before = {p: p.read_bytes() for p in (wrong, full)}
    with busy:
        for argv, words in cases:
            capsys.readouterr()
            assert cli(argv, monkeypatch) == 2, argv
            err = capsys.readouterr().err.strip()
            assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
            for w in words:
                assert w in err, (w, err)
    assert {p: p.read_bytes() for p in before} == before and not (tmp_path / "o.jsonl").exists()


# -----------------------------------------------------------------------------
# serve


@pytest.fixture(scope="module")
def server(toy):
    """A server on a free port in a thread; yields (host, port, engine)."""
    args = infer.parse_args(["serve", "--model", toy.base, "--adapter", toy.adapter, "--port", "0", "--device", "cpu",
                             "--temperature", "0", "--max_new_tokens", str(N)])
    yield from serving(args)


def serving(args):
    httpd, engine = infer.make_server(args)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield (*httpd.server_address[:2], engine)
    finally:
        httpd.shutdown()
        httpd.server_close()
        engine.stop()


def post(server, body, path="/v1/chat/completions"):
    """(status, parsed JSON reply) of one POST through http.client; body: an object or raw bytes."""
    conn = http.client.HTTPConnection(*server[:2], timeout=60)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, raw, {"Content-Type": "application/json"})
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    assert "\n" not in text.strip()  # one line
    return r.status, json.loads(text)


def raw_stream(server, body):
    """The data: payloads of a streamed reply, read off a plain socket (HTTP/1.0: it ends at close)."""
    payload = json.dumps(body).encode()
    with socket.create_connection(server[:2], timeout=60) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, events = reply.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.0 200") and "text/event-stream" in head, head
    assert events.endswith("\n\n") and all(e.startswith("data: ") for e in events.strip().split("\n\n"))
    return [e[len("data: "):] for e in events.strip().split("\n\n")]


def test_collect_prompts_client_gets_the_greedy_answer(toy, server, monkeypatch):
    import collect_prompts as cp
    monkeypatch.setenv("INFER_TEST_KEY", "any")
    args = SimpleNamespace(api_base=f"http://{server[0]}:{server[1]}/v1", api_model="toy", api_key_env="INFER_TEST_KEY",
                           temperature=0.0, top_p=1.0, max_new_tokens=N, retries=0, timeout=60, backoff=0.0, workers=1)
    assert cp.ApiBackend(args).complete(cp.Request(0, "hello there", [], 123)) == greedy(toy, "hello there")[0]


def test_a_completion_with_system_history_and_usage(toy, server):
    history = [("SYS\n你好", "ok")]  # the system text leads the first query
    text, new = greedy(toy, "1加1等于几", history)
    assert toy.tok.eop_id not in new  # so the answer ends by length
    status, r = post(server, {"model": "whatever", "max_tokens": N, "temperature": 0, "messages": [
        {"role": "system", "content": "SYS"}, {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "ok"}, {"role": "user", "content": [{"type": "text", "text": "1加1等于几"}]}]})
    assert status == 200 and r["object"] == "chat.completion", r
    assert r["choices"] == [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}]
    n_prompt = len(toy.tok.encode(glm.chat_prompt("1加1等于几", history)))
    assert r["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": N, "total_tokens": n_prompt + N}


def test_stop_cuts_the_answer_streamed_or_not(toy, server):
    text, new = greedy(toy, "你好")
    for k in range(1, len(new)):  # a stop string across two tokens: its first half must be held back
        end = len(toy.tok.decode(new[:k], skip_special_tokens=True))
        stop = text[end - 1:end + 1]
        if end >= 2 and len(stop) == 2 and text.index(stop) == end - 1:
            break
    else:
        pytest.fail(f"no stop string across two tokens in {text!r}")
    want = text[:end - 1]
    body = {"messages": [{"role": "user", "content": "你好"}], "stop": ["never there", stop]}
    status, r = post(server, body)
    assert status == 200 and r["choices"][0]["message"]["content"] == want
    assert r["choices"][0]["finish_reason"] == "stop"
    chunks = [json.loads(e) for e in raw_stream(server, {**body, "stream": True})[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_streamed_chunks_add_up_to_the_greedy_answer(toy, server):
    events = raw_stream(server, {"messages": [{"role": "user", "content": "集"}], "stream": True,
                                 "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == greedy(toy, "集")[0]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == N


def test_concurrent_requests_share_one_batch(toy):
    args = infer.parse_args(["serve", "--model", toy.base, "--adapter", toy.adapter, "--port", "0", "--device", "cpu",
                             "--temperature", "0", "--max_batch", "2", "--batch_wait_ms", "60000"])  # for the second
    replies = {}
    for srv in serving(args):
        asks = {"hello there": 3, "1加1等于几": N}  # each row stops at its own max_tokens
        threads = [threading.Thread(target=lambda q, n: replies.update({q: post(srv, {
            "messages": [{"role": "user", "content": q}], "max_tokens": n})}), args=item) for item in asks.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert srv[2].batch_sizes == [2]
    for q, n in asks.items():
        status, r = replies[q]
        assert status == 200 and r["choices"][0]["message"]["content"] == greedy(toy, q, n=n)[0]
        assert r["usage"]["completion_tokens"] == n


@pytest.mark.parametrize("body,words", [
    (b"{not json", "not valid JSON"),
    ({"model": "m"}, "'messages' is missing"),
    ({"messages": [{"role": "user", "content": "q"}], "n": 2}, "n = 1"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "alternate"),
    ({"messages": [{"role": "user", "content": "q"}], "temperature": "hot"}, "'temperature'"),
    ({"messages": [{"role": "user", "content": "q"}], "stop": 5}, "'stop'"),
])
def test_bad_requests_get_a_400_with_a_json_error(server, body, words):
    status, r = post(server, body)
    assert status == 400 and words in r["error"]["message"], r


def test_health_models_and_unknown_routes(server):
    conn = http.client.HTTPConnection(*server[:2], timeout=60)
    for path, code in (("/health", 200), ("/v1/models", 200), ("/v2/nothing", 404)):
        conn.request("GET", path)
        r = conn.getresponse()
        body = json.loads(r.read())
        assert r.status == code, (path, body)
        if path == "/v1/models":
            assert body["data"][0]["id"] == "adapter"  # the adapter folder's name
        conn.close()
    assert post(server, {"messages": []}, path="/v1/completions")[0] == 404


@pytest.mark.parametrize("cmd", ["chat", "predict", "serve"])
def test_glm_py_hands_its_inference_commands_to_infer_py(cmd, monkeypatch):
    """`python glm.py CMD ...` runs `python infer.py CMD ...` in its place (glm.py imports no project
    module); `convert` stays in glm.py."""
    calls = []
    monkeypatch.setattr(glm.os, "execv", lambda path, args: calls.append((path, args)))
    glm.main([cmd, "--model", "M", "--port", "1"])
    infer_py = os.path.join(os.path.dirname(os.path.abspath(glm.__file__)), "infer.py")
    assert calls == [(sys.executable, [sys.executable, infer_py, cmd, "--model", "M", "--port", "1"])]
