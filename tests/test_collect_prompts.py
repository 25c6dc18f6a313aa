"""collect_prompts.py: ROUGE-L against a naive LCS, the exact near-duplicate screen, each filter,
reply parsing, a fake chat-completions server (errors, slow replies, resume) and the local backend."""
import hashlib
import json
import os
import random
import re
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import collect_prompts as cp  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "case_small")


# -----------------------------------------------------------------------------
# an independent reference: the textbook O(m n) table


def naive_lcs(a, b):
    prev = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    return prev[-1]


def naive_is_near(a, b, num=7, den=10):  # 2 LCS / (m + n) >= num / den, in integers
    return 2 * naive_lcs(a, b) * den >= num * (len(a) + len(b))


def test_lcs_and_rouge_match_naive_reference():
    rng = random.Random(0)
    zh, en = "天地人和山水风", ["the", "cat", "dog", "runs", "a", "big", "red"]
    for _ in range(300):
        a = [rng.choice(en) for _ in range(rng.randint(0, 40))]
        b = [rng.choice(en) for _ in range(rng.randint(0, 40))]
        assert cp.lcs_length(a, b) == naive_lcs(a, b)
        if a or b:  # English: words are the units
            assert cp.rouge_l(" ".join(a), " ".join(b)) == 2 * naive_lcs(a, b) / (len(a) + len(b))
        s = "".join(rng.choice(zh) for _ in range(rng.randint(1, 80)))
        t = "".join(rng.choice(zh) for _ in range(rng.randint(1, 80)))
        # Chinese: characters are the units (lengths beyond 64 cross a machine word in the bit-parallel LCS)
        assert cp.rouge_l(s, t) == 2 * naive_lcs(s, t) / (len(s) + len(t))
    assert cp.text_units("用Python写一个 Hello-World 程序！") == ["用", "python", "写", "一", "个", "hello",
                                                              "world", "程", "序"]


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.9, 1.0])
def test_near_duplicate_screen_is_exact(threshold):
    """The index rejects exactly what a brute-force LCS against every kept prompt rejects: small
    vocabularies make many pairs land near the threshold and many postings long (skipped)."""
    from fractions import Fraction
    f = Fraction(threshold).limit_denominator(100)
    rng = random.Random(int(threshold * 100))
    index, kept, decisions = cp.RougeIndex(threshold), [], []
    for i in range(250):
        vocab = "abcdefgh" if i % 2 else "abcdefghijklmnopqrstuvwxyz"
        if kept and rng.random() < 0.4:  # an edit of a kept one, near the threshold
            c = list(rng.choice(kept))
            for _ in range(rng.randint(0, 3)):  # substitute, insert or delete a unit
                j, op = rng.randrange(len(c)), rng.randrange(3)
                if op == 0:
                    c[j] = rng.choice(vocab)
                elif op == 1 or len(c) == 1:
                    c.insert(j, rng.choice(vocab))
                else:
                    del c[j]
        else:
            c = [rng.choice(vocab) for _ in range(rng.randint(1, 16))]
        expected = any(naive_is_near(c, k, f.numerator, f.denominator) for k in kept)
        found = index.find(c)
        assert (found is not None) == expected, (i, c)
        if found is not None:  # it names a real match
            assert naive_is_near(c, kept[found], f.numerator, f.denominator)
        else:
            index.add(c)
            kept.append(c)
        decisions.append(expected)
    assert 20 < sum(decisions) < 230  # both outcomes were exercised


def test_each_filter_rejects_what_it_should():
    f = cp.PromptFilter()
    assert f.offer("Write a short poem about the sea at night.") is None
    assert f.offer("请写一首关于春天的诗") is None
    cases = {
        "length": ["Hi there", "!!!", " ".join(["word"] * 151), "你好"],
        "charset": ["Пожалуйста, расскажите о погоде завтра", "∑ ∫ ∂ ≈ ≠ ± → ← ↔ ⊂ ⊃ x y z",
                    "Tell me a joke\x07 about cats", "Explain \ufffd\ufffd this sentence please"],
        "blacklist": ["Describe the image below in detail", "请总结这个视频的主要内容",
                      "Summarize https://example.com for me", "Read the attached file and fix typos",
                      "Draw a cat sitting on a mat", "帮我下载一首好听的歌"],
        "duplicate": ["write a short   poem about the SEA at night.", "请写一首关于春天的诗"],
        "near_duplicate": ["Write a short poem about the sea at midnight", "请写一首关于夏天的诗",
                           "Please write a short poem about the sea at night"],
    }
    for reason, texts in cases.items():
        for text in texts:
            assert f.offer(text) == reason, (reason, text)
    # whole words only, and below the ROUGE-L threshold passes
    assert f.offer("Write a profile of a famous scientist from the 19th century") is None
    assert f.offer("How do I compute 12 * 37 + 5 in my head?") is None
    assert f.offer("Write a long story about the desert at noon.") is None  # 5/9 units shared


def test_parse_reply_formats():
    reply = ("Sure! Here are some new requests:\n\n9. Explain gravity.\n10) 写一首诗\n(11) Name three rivers\n"
             "12、如何学习英语\n**13.** \"Plan a trip to Kyoto\"\nPrompt 14: Write a story about a fox\n"
             "   that learns to read.\n15. Convert 1.5 kg to pounds\n\nI hope these help!")
    assert cp.parse_reply(reply) == [
        "Explain gravity.", "写一首诗", "Name three rivers", "如何学习英语", "Plan a trip to Kyoto",
        "Write a story about a fox\nthat learns to read.", "Convert 1.5 kg to pounds"]
    assert cp.parse_reply("Here you go:\n- Tell me a joke\n* 讲个笑话\nWhat is 2.5 squared?\n") == [
        "Tell me a joke", "讲个笑话", "What is 2.5 squared?"]
    assert cp.parse_reply("") == []
    assert cp.parse_reply("```\n\n```") == []


# -----------------------------------------------------------------------------
# a fake OpenAI-compatible endpoint: deterministic replies, with failures on first attempts

WORDS = sorted({a + b + c for a in "bdgklmnprst" for b in "aeiou" for c in ["", "n", "r", "l", "sh"]})
HAN = [chr(0x4E00 + i) for i in range(0, 3000, 7)]


def fake_reply(content, seed):
    """The reply to one request, a function of the request alone: fresh prompts plus junk
    that each filter must catch."""
    rng = random.Random(hashlib.sha256(f"{content}/{seed}".encode()).hexdigest())
    shown = [line.split(". ", 1)[1] for line in content.splitlines() if line[:1].isdigit() and ". " in line]

    def fresh_en():
        return "Tell me about " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 10)))

    def fresh_zh():
        return "请" + "".join(rng.choice(HAN) for _ in range(rng.randint(8, 16)))
    items = [fresh_en(), fresh_zh(), rng.choice(shown), rng.choice(shown) + " Thanks",
             "Describe the attached image of a " + rng.choice(WORDS), "Thanks!",
             "Пожалуйста, расскажите о погоде завтра утром", fresh_en(), fresh_zh()]
    first = len(shown) + 1
    return ("Sure, here are new requests:\n\n" +
            "\n".join(f"{first + i}. {t}" for i, t in enumerate(items)) + "\n\nHope these help!")


class FakeChat:
    KEY = "sk-test"

    def __init__(self, slow=1.5):
        self.attempts, self.failures, self.lock, self.slow = {}, [], threading.Lock(), slow
        self.first_attempts = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Authorization") != f"Bearer {fake.KEY}":
                    return self.send(401, b'{"error": "bad key"}')
                req = json.loads(body)
                content = req["messages"][0]["content"]
                key = hashlib.sha256(body).hexdigest()
                with fake.lock:  # first attempts fail in turn, 5 of every 8, each in its own way
                    fake.attempts[key] = fake.attempts.get(key, 0) + 1
                    mode = fake.first_attempts % 8 if fake.attempts[key] == 1 else 7
                    fake.first_attempts += fake.attempts[key] == 1
                ok = json.dumps({"choices": [{"message": {"role": "assistant",
                                                          "content": fake_reply(content, req["seed"])}}]})
                if mode < 5:
                    with fake.lock:
                        fake.failures.append(mode)
                if mode == 0:
                    self.send(500, b"internal error")
                elif mode == 1:
                    self.send(429, b"slow down", {"Retry-After": "0"})
                elif mode == 2:
                    self.send(200, b'{"choices": [{"message": ')  # cut off
                elif mode == 3:
                    time.sleep(fake.slow)  # beyond the client's timeout
                    self.send(200, ok.encode())
                elif mode == 4:
                    self.send(200, b'{"object": "error"}')
                else:
                    self.send(200, ok.encode())

            def send(self, code, data, headers=()):
                try:
                    self.send_response(code)
                    for k, v in dict(headers).items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout) first

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("FAKE_KEY", FakeChat.KEY)
    s = FakeChat()
    yield s
    s.close()


SEEDS = ["Explain how a rainbow forms.", "Write a poem about a lonely lighthouse keeper.",
         "What is the difference between a stack and a queue?", "Give me three tips for learning to cook.",
         "请解释一下什么是光合作用。", "写一个关于小狐狸的童话故事。", "如何提高自己的专注力？",
         "Plan a two-day trip to a seaside town.", "为什么天空是蓝色的？", "How do vaccines train the immune system?"]


@pytest.fixture
def seeds(tmp_path):
    path = tmp_path / "seeds.jsonl"
    lines = [json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in SEEDS]
    path.write_text("".join(lines), encoding="utf-8")
    return str(path)


def api_args(server_base, seeds, out, *extra):
    return cp.parse_args(["--seeds", seeds, "--out", str(out), "--api_base", server_base,
                          "--api_model", "fake", "--api_key_env", "FAKE_KEY", "--workers", "4",
                          "--timeout", "0.5", "--retries", "4", "--backoff", "0.01", "--k", "5",
                          "--k_generated", "2", "--seed", "3", *extra])


def read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_api_run_reaches_target_without_duplicates(server, seeds, tmp_path):
    out = tmp_path / "pool.jsonl"
    stats = cp.collect(api_args(server.base, seeds, out, "--target", "90"))
    pool = read(out)
    assert len(pool) == 90 and stats["accepted"] == 90 - len(SEEDS)
    prompts = [r["prompt"] for r in pool]
    assert len(set(prompts)) == len(prompts)
    assert [r["prompt"] for r in pool[:len(SEEDS)]] == SEEDS
    for r in pool[len(SEEDS):]:
        assert r["history"] == [] and r["source"] == "api:fake" and r["request"] >= 0
        assert r["seed_ids"] and set(r["seed_ids"]) <= set(range(len(SEEDS)))
    units = [cp.text_units(p) for p in prompts]
    for i in range(len(units)):
        for j in range(i):
            assert not naive_is_near(units[i], units[j]), (prompts[i], prompts[j])
    for reason in cp.PromptFilter.REASONS:
        assert stats[reason] > 0, reason  # the fake's junk reached every filter
    assert set(server.failures) == {0, 1, 2, 3, 4}  # 500, 429, cut-off JSON, too slow, no choices


def test_resumed_run_gives_the_same_pool(server, seeds, tmp_path):
    whole = tmp_path / "whole.jsonl"
    cp.collect(api_args(server.base, seeds, whole, "--target", "70"))
    expected = whole.read_text(encoding="utf-8")

    # stopped early by --max_requests, then resumed
    part = tmp_path / "part.jsonl"
    cp.collect(api_args(server.base, seeds, part, "--target", "70", "--max_requests", "4"))
    assert 0 < len(read(part)) < 70
    cp.collect(api_args(server.base, seeds, part, "--target", "70"))
    assert part.read_text(encoding="utf-8") == expected

    # killed mid-request (a torn last line), then resumed
    lines = expected.splitlines(keepends=True)
    cut = next(i for i in range(len(lines) - 1, 0, -1)
               if json.loads(lines[i])["request"] == json.loads(lines[i - 1])["request"] >= 0)
    torn = tmp_path / "torn.jsonl"
    torn.write_text("".join(lines[:cut]) + lines[cut][:17], encoding="utf-8")
    cp.collect(api_args(server.base, seeds, torn, "--target", "70"))
    assert torn.read_text(encoding="utf-8") == expected

    # a finished pool is left alone
    stats = cp.collect(api_args(server.base, seeds, whole, "--target", "70"))
    assert stats["requests"] == 0 and whole.read_text(encoding="utf-8") == expected


def test_unreachable_endpoint_fails_clearly(monkeypatch, seeds, tmp_path):
    monkeypatch.setenv("FAKE_KEY", "x")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.time()
    with pytest.raises(cp.CollectError, match="(?s)failed 5 times.*Connection refused.*reachable"):
        cp.collect(api_args(f"http://127.0.0.1:{port}/v1", seeds, tmp_path / "o.jsonl"))
    assert time.time() - t < 10
    assert len(read(tmp_path / "o.jsonl")) == len(SEEDS)  # the seeds were kept


def test_missing_or_refused_key(server, monkeypatch, seeds, tmp_path):
    monkeypatch.delenv("FAKE_KEY")
    with pytest.raises(cp.CollectError, match="FAKE_KEY is not set"):
        cp.collect(api_args(server.base, seeds, tmp_path / "o.jsonl"))
    monkeypatch.setenv("FAKE_KEY", "wrong")
    with pytest.raises(cp.CollectError, match="(?s)HTTP 401.*FAKE_KEY was refused"):
        cp.collect(api_args(server.base, seeds, tmp_path / "o.jsonl"))


def test_bad_seed_files(tmp_path):
    cases = {"empty.jsonl": ("\n\n", r"empty.jsonl: no seed prompts"),
             "broken.jsonl": ('{"prompt": "ok one"}\n{"prompt": "cut\n', r"broken.jsonl:2: not valid JSON"),
             "field.jsonl": ('{"prompt": "ok one"}\n\n{"text": "no prompt"}\n', r"field.jsonl:3: needs"),
             "missing.jsonl": (None, r"missing.jsonl: no such file")}
    for name, (text, message) in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text, encoding="utf-8")
        with pytest.raises(cp.CollectError, match=message):
            cp.read_seeds(str(path))


def test_bad_flags_and_output():
    with pytest.raises(cp.CollectError, match="choose one generator"):
        cp.collect(cp.parse_args(["--seeds", "s", "--out", "o"]))
    with pytest.raises(cp.CollectError, match="near-duplicate threshold"):
        cp.RougeIndex(1.5)


def test_foreign_output_file_is_refused(tmp_path):
    out = tmp_path / "other.jsonl"
    out.write_text('{"prompt": "a", "request": 0}\n{"prompt": "b"}\n', encoding="utf-8")
    with pytest.raises(cp.CollectError, match="other.jsonl:2: not a line this script wrote"):
        cp.read_pool(str(out))


def test_local_backend_with_toy_model(seeds, tmp_path, monkeypatch, capsys):
    """The local checkpoint runs end to end and its (random-weight, gibberish) text goes through
    the same parse/filter path; the same seed gives the same replies."""
    replies = []
    parse = cp.parse_reply
    monkeypatch.setattr(cp, "parse_reply", lambda text: replies.append(text) or parse(text))
    for run in range(2):
        out = tmp_path / f"local{run}.jsonl"
        args = cp.parse_args(["--seeds", seeds, "--out", str(out), "--model", FIXTURE, "--device", "cpu",
                              "--batch_size", "2", "--max_requests", "3", "--max_new_tokens", "24",
                              "--k", "3", "--target", "1000", "--seed", "5"])
        stats = cp.collect(args)
        assert stats["requests"] == 3
        assert "stopped at --max_requests 3" in capsys.readouterr().err
        pool = read(out)
        assert len(pool) >= len(SEEDS) and all(r["source"] == "local:case_small" for r in pool[len(SEEDS):])
    assert len(replies) == 6 and all(isinstance(r, str) for r in replies)
    assert replies[:3] == replies[3:]


def test_bench_filter_runs():
    r = cp.bench_filter(2000)
    assert r["prompts"] == 2000 and r["kept"] > 1000
    assert all(r.get(reason, 0) > 0 for reason in cp.PromptFilter.REASONS)


# -----------------------------------------------------------------------------
# the key is never printed; user errors end main() with one or two lines, exit 2, nothing written


def run_main(argv, monkeypatch, capsys):
    """main(argv)'s exit code and stderr (main ends errors with os._exit, raised here instead)."""
    def exit_(code):
        raise SystemExit(code)
    monkeypatch.setattr(os, "_exit", exit_)
    with pytest.raises(SystemExit) as e:
        cp.main(argv)
    return e.value.code, capsys.readouterr().err


def snapshot(folder):
    return {str(p): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def test_mask_secrets():
    text = ('Authorization: Bearer abc.DEF-123_x=; {"authorization": "bearer sk-zz"} key sk-proj-XyZ_9 '
            'raw Secret/42, task-based scikit-learn')
    assert cp.mask_secrets(text, "Secret/42") == ('Authorization: Bearer ***; {"authorization": "bearer ***"} '
                                                  'key *** raw ***, task-based scikit-learn')
    assert cp.mask_secrets("max x", "x") == "max x"  # a one-letter placeholder key is not masked everywhere


@pytest.mark.parametrize("code", [400, 401, 404, 200, 500])
@pytest.mark.parametrize("key", ["sk-proj-Abc123_secretkey", "plain.Secret/42"])
def test_key_echoed_by_server_is_never_printed(code, key, seeds, tmp_path, monkeypatch, capsys):
    """A server (or proxy) that puts the request's headers and key in its error body, or in a
    malformed 200 reply: what main() prints has them masked."""
    class Echo(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            token = self.headers["Authorization"].split()[-1]
            data = json.dumps({"error": f"no model for key {token}", "headers": dict(self.headers)}).encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("FAKE_KEY", key)
    try:
        status, err = run_main(["--seeds", seeds, "--out", str(tmp_path / "o.jsonl"), "--api_base",
                                f"http://127.0.0.1:{server.server_address[1]}/v1", "--api_model", "fake",
                                "--api_key_env", "FAKE_KEY", "--retries", "0", "--timeout", "5"],
                               monkeypatch, capsys)
    finally:
        server.shutdown()
        server.server_close()
    assert status == 2 and (f"HTTP {code}" in err or "malformed reply" in err), err
    for part in (key, "Abc123", "Secret/42", "secretkey"):
        assert part not in err
    if code != 500:  # a 5xx body is not shown at all
        assert "no model for key ***" in err


@pytest.mark.parametrize("base", ["http://api.example.com/v1", "http://10.0.0.5:8000/v1", "api.example.com/v1"])
def test_plain_http_to_another_host_is_refused(base, seeds, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_KEY", "sk-remote-key")
    monkeypatch.setattr(cp.urllib.request, "urlopen", lambda *a, **k: pytest.fail("a request was sent"))
    code, err = run_main(["--seeds", seeds, "--out", str(tmp_path / "o.jsonl"), "--api_base", base,
                          "--api_model", "m", "--api_key_env", "FAKE_KEY"], monkeypatch, capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "--allow_http" in err and "https://" in err
    assert not (tmp_path / "o.jsonl").exists()
    for ok in ["https://api.example.com/v1", "http://localhost:8000/v1", "http://[::1]:8000/v1",
               "http://127.0.0.1/v1", base + " --allow_http"]:
        url, *extra = ok.split()
        cp.check_args(cp.parse_args(["--seeds", seeds, "--out", str(tmp_path / "o.jsonl"), "--api_base", url,
                                     "--api_model", "m", *extra]))
    assert not (tmp_path / "o.jsonl").exists()  # the writability check left nothing behind


def test_a_malformed_api_base_is_one_line(seeds, tmp_path, monkeypatch, capsys):
    code, err = run_main(["--seeds", seeds, "--out", str(tmp_path / "o.jsonl"), "--api_base", "http://[bad",
                          "--api_model", "m"], monkeypatch, capsys)
    assert code == 2 and err.startswith("error: --api_base http://[bad: not a URL") and len(err.splitlines()) == 1
    assert not (tmp_path / "o.jsonl").exists()


def test_user_errors_end_main_in_one_or_two_lines(seeds, tmp_path, monkeypatch, capsys):
    """Bad flags, a missing seed file, an --out that cannot be written: exit 2, one or two lines
    naming the flag or file, no traceback, nothing written."""
    (tmp_path / "outdir").mkdir()
    (tmp_path / "afile").write_text("x")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    if os.geteuid() == 0:  # root writes anywhere: simulate the refusal the folder's mode gives others
        def deny(path, *args, **kwargs):
            if str(path).startswith(str(locked)):
                raise PermissionError(13, "Permission denied", str(path))
            return open(path, *args, **kwargs)
        monkeypatch.setattr(cp, "open", deny, raising=False)
    monkeypatch.setenv("FAKE_KEY", "sk-local-key")
    out = str(tmp_path / "o.jsonl")
    cases = [(["--target", "abc"], "--target: invalid int value"),
             (["--tragte", "5"], "unrecognized arguments: --tragte"),
             (["--retries", "-1"], "--retries >= 0"),
             (["--timeout", "nan"], "--timeout > 0"),
             (["--rouge", "1.5"], "--rouge 1.5"),
             (["--seeds", str(tmp_path / "missing.jsonl")], "missing.jsonl: no such file"),
             (["--api_key_env", "NO_SUCH_VARIABLE_SET"], "NO_SUCH_VARIABLE_SET is not set"),
             (["--out", str(tmp_path / "outdir")], "Is a directory"),
             (["--out", str(tmp_path / "afile" / "o.jsonl")], "Not a directory"),
             (["--out", str(tmp_path / "nofolder" / "o.jsonl")], "No such file or directory"),
             (["--out", str(locked / "o.jsonl")], "Permission denied")]
    before = snapshot(tmp_path)
    for extra, message in cases:
        argv = ["--seeds", seeds, "--out", out, "--api_base", "http://127.0.0.1:9/v1", "--api_model", "m",
                "--api_key_env", "FAKE_KEY", *extra]
        code, err = run_main(argv, monkeypatch, capsys)
        assert code == 2 and 1 <= len(err.splitlines()) <= 2 and "Traceback" not in err, (extra, err)
        assert message in err and (extra[0] in err or extra[1] in err), (extra, err)
        assert snapshot(tmp_path) == before, extra


# -----------------------------------------------------------------------------
# a generator that stops giving anything acceptable: --max_stall ends the run, the pool is kept


class JunkBackend:
    """Request i's reply: two fresh prompts while i < good, plus junk of one kind (in turn) that
    a known filter rejects, or an empty reply; it records what it returned, kind by kind."""
    source = "api:junk"
    KINDS = ["length", "charset", "blacklist", "duplicate", "near_duplicate", "empty_reply"]
    JUNK = {"length": ["Hi there"], "charset": ["Пожалуйста, расскажите о погоде завтра утром"],
            "blacklist": ["Describe the attached image of a cat"],
            "duplicate": [SEEDS[0].upper(), "  " + SEEDS[4]],
            "near_duplicate": [SEEDS[1] + " please", "Please " + SEEDS[2], "So " + SEEDS[3]]}

    def __init__(self, good):
        self.good, self.returned, self.fresh = good, [], []

    def reply(self, i):
        assert i < 100, "the run did not stop"  # fail, rather than loop for ever, without --max_stall
        kind = self.KINDS[i % len(self.KINDS)]
        if kind == "empty_reply":
            self.returned.append({"empty_reply": 1})
            return ""
        rng = random.Random(i)  # request i's fresh prompts are the same in every run
        fresh = ["Tell me about " + " ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(2)]
        items = self.JUNK[kind] + (fresh if i < self.good else [])  # junk first: a run that ends on
        # reaching --target leaves the rest of its last reply unread
        self.fresh += fresh if i < self.good else []
        self.returned.append({kind: len(self.JUNK[kind])})
        return "Here you go:\n" + "\n".join(f"{n + 1}. {t}" for n, t in enumerate(items))

    def replies(self, build, start, stop):
        for i in range(start, stop):
            yield build(i), self.reply(i)


def counts_in(text, label):
    """The 'name 1,234, ...' counts printed after `label` (up to the next '.', '|' or line end)."""
    part = re.search(re.escape(label) + r"([^.|\n]*)", text)[1]
    return {k: int(v.replace(",", "")) for k, v in re.findall(r"(\w+) ([\d,]+)", part)}


def total(dicts):
    out = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def junk_args(seeds, out, *extra):
    return ["--seeds", seeds, "--out", str(out), "--api_base", "http://127.0.0.1:9/v1", "--api_model", "m",
            "--target", "1000", *extra]


def test_stall_stops_with_the_reasons_and_keeps_the_pool(seeds, tmp_path, monkeypatch, capsys):
    """Requests 0-3 give fresh prompts, then only junk: --max_stall 7 stops after request 10 with
    exit 2, a two-line message whose counts are what the fake returned, and the pool on disk."""
    fake = JunkBackend(good=4)
    monkeypatch.setattr(cp, "ApiBackend", lambda a: fake)
    monkeypatch.setattr(os, "_exit", lambda code: (_ for _ in ()).throw(SystemExit(code)))
    out = tmp_path / "pool.jsonl"
    with pytest.raises(SystemExit) as e:
        cp.main(junk_args(seeds, out, "--max_stall", "7"))
    printed = capsys.readouterr()
    assert e.value.code == 2 and len(fake.returned) == 4 + 7
    msg = printed.err[printed.err.index("error: "):]
    assert len(msg.splitlines()) == 2 and "Traceback" not in printed.err, msg
    assert counts_in(msg, "rejected there:") == total(fake.returned[4:])  # the stalled requests only
    assert "last 7 requests" in msg and str(out) in msg and f"{len(SEEDS) + 8} prompts" in msg
    assert "--rouge (now 0.7" in msg and "--temperature" in msg  # near duplicates were the most
    # the whole run, in the final report and on the progress bar
    everything = total(fake.returned)
    assert counts_in(printed.out, "rejected:") == everything
    n_junk = sum(v for k, v in everything.items() if k != "empty_reply")
    assert f"accepted 8 of {8 + n_junk} candidates ({800 / (8 + n_junk):.1f}%) from 11 requests" in printed.out
    bar = printed.err[:printed.err.index("error: ")]
    assert counts_in(bar.split("\r")[-1], "rejected:") == everything
    # what was accepted is on disk, whole, and reads back as a pool to resume from
    assert out.read_bytes().endswith(b"\n")
    assert [r["prompt"] for r in cp.read_pool(str(out))] == SEEDS + fake.fresh


def test_a_stalled_pool_resumes_with_a_better_generator(seeds, tmp_path, monkeypatch, capsys):
    out = tmp_path / "pool.jsonl"
    first = JunkBackend(good=2)
    monkeypatch.setattr(cp, "ApiBackend", lambda a: first)
    with pytest.raises(cp.CollectError, match=r"(?s)no prompt accepted in the last 3 requests.*HINT: "):
        cp.collect(cp.parse_args(junk_args(seeds, out, "--max_stall", "3")))
    stalled = out.read_bytes()
    better = JunkBackend(good=10**9)
    monkeypatch.setattr(cp, "ApiBackend", lambda a: better)
    capsys.readouterr()
    stats = cp.collect(cp.parse_args(junk_args(seeds, out, "--max_stall", "3", "--target", "20")))
    pool = read(out)
    assert out.read_bytes().startswith(stalled) and len(pool) == 20
    assert better.returned[0] == {"charset": 1}  # it resumed at request 1, the last that added to the pool
    assert [r["prompt"] for r in pool] == SEEDS + first.fresh + better.fresh[2:8]  # request 1's prompts once
    # the normal finish prints the same breakdown, in one line, matching what the fake returned
    assert counts_in(capsys.readouterr().out, "rejected:") == total(better.returned)
    assert {k: stats[k] for k in cp.REJECTIONS if stats[k]} == total(better.returned)


@pytest.mark.parametrize("value", ["0", "-5"])
def test_max_stall_below_one_is_a_one_line_error(value, seeds, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cp, "ApiBackend", lambda a: pytest.fail("a generator was started"))
    code, err = run_main(junk_args(seeds, tmp_path / "o.jsonl", "--max_stall", value), monkeypatch, capsys)
    assert code == 2 and len(err.splitlines()) == 1 and f"--max_stall {value}: must be >= 1" in err
    assert not (tmp_path / "o.jsonl").exists()
