"""Inference: chat in the terminal, batch predictions over a jsonl file, an OpenAI-compatible server.

    python glm.py chat --model DIR [--adapter ADAPTER_DIR]          # multi-turn, streamed; \"\"\" opens a block
    python glm.py predict --model DIR [--adapter DIR] --data in.jsonl --out out.jsonl [--batch_size 8]
    torchrun --nproc_per_node=2 glm.py predict --pp 2 --model DIR --data in.jsonl --out out.jsonl
    python glm.py serve --model DIR [--adapter DIR] [--host 127.0.0.1] --port 8000

(`python infer.py chat ...` is the same.) A LoRA adapter written by train_sft.py / train_rm.py is
loaded onto its base and merged for speed; with --adapter alone, the base recorded in its
adapter_config.json is used. `predict` writes one line per input line, in order, with the input's
fields plus "output"; rerun the same command to continue after a stop. `serve` answers
POST /v1/chat/completions (streamed or not), GET /v1/models and GET /health; concurrent requests
are generated together in one batch by a single thread that owns the model.
"""
import argparse
import json
import math
import os
import queue
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
import torch.distributed as tdist
from tqdm import tqdm

import data
import dist
import flags
import glm
import lora
import plan
import quant

# -----------------------------------------------------------------------------
# loading: the base model, a LoRA adapter on it, the tokenizer


def resolve_dirs(model_dir, adapter_dir):
    """(model folder, adapter folder or None), checked: an adapter passed as --model is named as such,
    and without --model the base that the adapter's config records is used."""
    if model_dir and os.path.isfile(os.path.join(model_dir, lora.CONFIG_FILE)) and \
            not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(f"--model {model_dir} is a LoRA adapter folder ({lora.CONFIG_FILE}), not a model. "
                         f"HINT: pass --adapter {model_dir} --model BASE_DIR (the base it was trained on)")
    if adapter_dir:
        base = lora.read_adapter_config(adapter_dir).get("base_model_name_or_path")
        if not model_dir:
            if not (isinstance(base, str) and os.path.isdir(base)):
                raise ValueError(f"--adapter {adapter_dir}: its {lora.CONFIG_FILE} names no base folder found "
                                 f"here ({base!r}). HINT: pass --model BASE_DIR")
            model_dir = base
    if not model_dir:
        raise ValueError("--model is required (or --adapter DIR whose adapter_config.json names its base)")
    return glm.check_model_dir(model_dir), adapter_dir


def load_tokenizer(model_dir, adapter_dir=None):
    """The base's ice_text.model, else the one train_sft.py saves beside an adapter."""
    if adapter_dir and not os.path.isfile(os.path.join(model_dir, "ice_text.model")) and \
            os.path.isfile(os.path.join(adapter_dir, "ice_text.model")):
        return glm.Tokenizer(os.path.join(adapter_dir, "ice_text.model"))
    return glm.Tokenizer.from_dir(model_dir)


def with_adapter(model, adapter_dir):
    """Load the adapter (strict about keys, shapes and base) and fold it into the weights: generation
    then costs what the base costs."""
    if adapter_dir:
        lora.load_adapter(model, adapter_dir)
        if not quant.is_quantized(model):  # an int8 / int4 base runs the adapter unmerged
            lora.merge_lora(model)
    return model.eval()


def load_model(model_dir, adapter_dir, device="", quantize=(0, -1)):
    """The whole model on `device` ("": the GPU if there is one, else the CPU), bf16 on GPUs, else float32;
    quantize (bits, group size[, head]): its block linears int8 / int4 (a quantized checkpoint loads as
    it is), and lm_head int8 if head."""
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ValueError(f"--device {device}: not a device. HINT: cpu, cuda or cuda:N") from None
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return with_adapter(quant.from_pretrained(model_dir, dtype, device, *quantize), adapter_dir)


class TextStream:
    """One answer's tokens as text that only grows, cut at the first stop string. Text that may still
    become a stop string, or a character whose bytes have not all arrived, is held back."""

    def __init__(self, tok, stop=()):
        self.tok, self.stop = tok, [s for s in stop if s]
        self.ids, self.text, self.sent = [], "", 0
        self.n, self.finish = 0, None  # tokens taken (<eop> included); "stop" / "length" once ended

    def add(self, t):
        """Take token id t; return the new text that is safe to show."""
        self.n += 1
        if t == self.tok.eop_id:
            self.finish = "stop"
            return self.rest()
        self.ids.append(t)
        self.text = self.tok.decode(self.ids, skip_special_tokens=True)  # whole: pieces join correctly
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.finish = self.text[:cut], "stop"
            return self.rest()
        hold = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        end = len(self.text) - hold
        while end > self.sent and self.text[end - 1] == "\ufffd":  # a character's bytes still to come
            end -= 1
        return self.take(end)

    def rest(self):
        return self.take(len(self.text))

    def take(self, end):
        piece = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return piece


# -----------------------------------------------------------------------------
# chat in the terminal

BLOCK = '"""'  # a line holding only this opens a multi-line message; the next one closes it


def read_message(ask=None):
    """("say", text) for a line, or for the lines between two \"\"\" lines; ("clear", None) or ("exit", None)
    for those words alone on a line (inside a block they are text). Ctrl-D raises EOFError; blank lines
    outside a block are skipped."""
    ask = ask or input  # looked up when called, so a test can stand in for the terminal
    while True:
        line = ask("\nUser: ")
        if line.strip() == BLOCK:
            lines = []
            while (line := ask("... ")).strip() != BLOCK:
                lines.append(line)
            text = "\n".join(lines)
        else:
            text = line.strip()
            if text in ("clear", "exit", "quit"):
                return ("exit" if text == "quit" else text), None
        if text.strip():
            return "say", text


def chat(args):
    model_dir, adapter_dir = resolve_dirs(args.model, args.adapter)
    tok = load_tokenizer(model_dir, adapter_dir)
    model = load_model(model_dir, adapter_dir, args.device, (args.quantize, args.quant_group_size,
                                                              args.quantize_head))
    device, max_seq = next(model.parameters()).device, model.config.max_sequence_length
    history = []
    print(f'ChatGLM chat. A line of {BLOCK} starts and ends a multi-line message; "clear" resets the '
          'history; "exit" or Ctrl-D quits.')
    while True:
        try:
            what, query = read_message()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D / Ctrl-C at the prompt: end the prompt's line, quit
            print()
            return
        if what == "exit":
            return
        if what == "clear":
            history = []
            continue
        ids = tok.encode(glm.chat_prompt(query, history))
        while history and len(ids) + args.max_new_tokens > max_seq:  # the oldest turns go first
            history = history[1:]
            ids = tok.encode(glm.chat_prompt(query, history))
        if len(ids) >= max_seq:
            print(f"(the message is {len(ids)} tokens; the model takes {max_seq}: shorten it)")
            continue
        answer = TextStream(tok)
        print("ChatGLM: ", end="", flush=True)
        try:
            model.generate(torch.tensor([ids], device=device), min(args.max_new_tokens, max_seq - len(ids)),
                           do_sample=args.temperature > 0, temperature=args.temperature or 1.0, top_p=args.top_p,
                           streamer=lambda t: print(answer.add(int(t[0])), end="", flush=True))
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
            print(" [stopped]", end="")
        print(answer.rest())
        history.append((query, answer.text))


# -----------------------------------------------------------------------------
# predict: a jsonl of prompts -> the same lines with "output", resumable, pipelined with --pp


def read_inputs(path, output_key):
    """(examples for data.encode_prompt, the lines' objects): every shape data.load_prompts reads."""
    examples, objs = data.load_prompts(path), [obj for _, obj in data.read_jsonl(path)]
    for ex, obj in zip(examples, objs):
        if output_key in obj:
            raise ValueError(f"{ex['source']}: the line already has a field '{output_key}' (an Alpaca reference "
                             f"answer?). HINT: pass --output_key generated to write the answers under another name")
    return examples, objs


def lines_done(out, examples, objs, output_key):
    """How many complete lines of an existing --out match the first inputs, and the byte length they
    take (an incomplete last line, from a killed run, is not counted); any mismatch is an error."""
    if not os.path.exists(out):
        return 0, 0
    with open(out, "rb") as f:
        lines = f.read().split(b"\n")[:-1]  # the part after the last newline is incomplete
    hint = "HINT: pass --overwrite to start again, or choose another --out"
    if len(lines) > len(objs):
        raise ValueError(f"--out {out} has {len(lines)} lines but --data has {len(objs)} inputs. {hint}")
    for i, (line, obj) in enumerate(zip(lines, objs)):
        try:
            got = json.loads(line)
            ok = isinstance(got, dict) and isinstance(got.pop(output_key, None), str) and got == obj
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"--out {out}: line {i + 1} is not the answer to input {examples[i]['source']}. {hint}")
    return len(lines), sum(len(line) + 1 for line in lines)


def check_out(args):
    """--out names a file that can be written, and is not the input."""
    folder = os.path.dirname(os.path.abspath(args.out))
    if os.path.isdir(args.out) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ValueError(f"--out {args.out}: cannot write a file there. HINT: name a .jsonl file in a folder "
                         "that exists and that you can write to")
    if os.path.abspath(args.out) == os.path.abspath(args.data) or \
            (os.path.exists(args.out) and os.path.samefile(args.out, args.data)):
        raise ValueError(f"--out {args.out} is the --data file. HINT: write the answers to another file")


def answers(model, d, tok, prompts, args, seed):
    """Decoded answers to encoded prompts; with D replicas each generates its share, then all gather."""
    lo, hi = len(prompts) * d.dp_rank // d.D, len(prompts) * (d.dp_rank + 1) // d.D
    texts = []
    if hi > lo:  # all stages of a replica agree, so none waits for a stage that skips
        ids = glm.left_pad(prompts[lo:hi], tok.pad_id).to(d.device)  # [b, T]
        g = torch.Generator(device=d.device).manual_seed(seed + lo) if args.temperature > 0 else None
        out, _ = dist.generate(model, d, ids, args.max_new_tokens, do_sample=args.temperature > 0,
                               temperature=args.temperature or 1.0, top_p=args.top_p, generator=g)
        texts = [tok.decode(row, skip_special_tokens=True) for row in out[:, ids.shape[1]:]]
    if d.D > 1:
        parts = [None] * d.D
        tdist.all_gather_object(parts, texts, group=d.dp_group)
        texts = [t for part in parts for t in part]
    return texts


def predict(args):
    d = dist.setup(args.pp, args.timeout_min)
    model_dir, adapter_dir = resolve_dirs(args.model, args.adapter)
    check_out(args)
    tok = load_tokenizer(model_dir, adapter_dir)
    examples, objs = read_inputs(args.data, args.output_key)
    gcfg = glm.GLMConfig.from_json(os.path.join(model_dir, "config.json"))
    max_prompt = args.max_prompt_len or gcfg.max_sequence_length - args.max_new_tokens
    if max_prompt < 3 or max_prompt + args.max_new_tokens > gcfg.max_sequence_length:
        raise ValueError(f"--max_prompt_len {max_prompt} + --max_new_tokens {args.max_new_tokens} must fit the "
                         f"model's {gcfg.max_sequence_length} positions (and a prompt takes at least 3). "
                         "HINT: lower --max_new_tokens")
    done, keep_bytes = (0, 0) if args.overwrite else lines_done(args.out, examples, objs, args.output_key)
    dist.barrier()  # every rank has read --out before rank 0 cuts it

    # ---- this rank's stage of the model, the adapter merged into it
    stage = plan.plan_pipeline(gcfg, d.P, args.batch_size, max_prompt + args.max_new_tokens, d.P, train="lora",
                               param_bytes=2 if d.device.type == "cuda" else 4).stages[d.pp_rank]
    qs = quant.scheme(model_dir, args.quantize, args.quant_group_size, head=args.quantize_head)
    model = with_adapter(dist.build_stage(model_dir, stage, d, quantize=qs), adapter_dir)
    if done:
        dist.print0(f"resuming: {done} of {len(objs)} lines are already in {args.out}")

    # ---- batches in input order; rank 0 appends each batch's lines and flushes them
    stats = data.TruncationStats()
    out = None
    if dist.is_main():
        out = open(args.out, "r+b" if os.path.exists(args.out) else "wb")
        out.truncate(keep_bytes)  # --overwrite: 0; else an incomplete last line goes
        out.seek(keep_bytes)
    with tqdm(total=len(objs), initial=done, unit="line", disable=not dist.is_main(), dynamic_ncols=True) as bar:
        for lo in range(done, len(objs), args.batch_size):
            batch = range(lo, min(lo + args.batch_size, len(objs)))
            prompts = [data.encode_prompt(tok, examples[i], max_prompt, stats) for i in batch]
            texts = answers(model, d, tok, prompts, args, args.seed * 1_000_003 + lo)
            if out:
                out.write(b"".join(json.dumps({**objs[i], args.output_key: t}, ensure_ascii=False).encode() + b"\n"
                                   for i, t in zip(batch, texts)))
                out.flush()  # a kill loses at most the batch in flight
            bar.update(len(batch))
    if out:
        out.close()
    if stats.truncated:
        dist.print0(f"prompts longer than --max_prompt_len {max_prompt} lost their start: {stats}")
    dist.print0(f"wrote {len(objs) - done} answers to {args.out} ({len(objs)} lines in all)")
    dist.teardown()


# -----------------------------------------------------------------------------
# serve: OpenAI-compatible chat completions; one worker thread generates the waiting requests together


class BadRequest(Exception):
    """A request the client must fix: answered with HTTP 400 and the message."""


def message_text(m, i):
    content = m.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        if all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise BadRequest(f"messages[{i}].content must be a string (or a list of text parts)")
    return content


def chat_turns(messages):
    """OpenAI messages -> (query, history) for glm.chat_prompt. The last user message is the query, earlier
    user/assistant pairs the history; system text leads the first query, on its own line (data.py's rule)."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    system, turns = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise BadRequest(f"messages[{i}] must be an object whose role is system, user or assistant")
        if m["role"] in ("system", "developer"):
            system.append(message_text(m, i))
        else:
            turns.append((m["role"], message_text(m, i)))
    for k, (role, _) in enumerate(turns):
        if role != ("user", "assistant")[k % 2]:
            raise BadRequest("user and assistant messages must alternate, starting with a user message")
    if not turns or turns[-1][0] != "user":
        raise BadRequest("the last message (besides system ones) must be the user's")
    history = [(turns[k][1], turns[k + 1][1]) for k in range(0, len(turns) - 1, 2)]
    query = turns[-1][1]
    if system:
        lead = "\n".join(system)
        if history:
            history[0] = (f"{lead}\n{history[0][0]}", history[0][1])
        else:
            query = f"{lead}\n{query}"
    return query, history


def number(req, key, default, lo, hi, kind=(int, float)):
    v = req.get(key, default)
    v = default if v is None else v
    if isinstance(v, bool) or not isinstance(v, kind) or not (lo <= v <= hi and math.isfinite(v)):
        raise BadRequest(f"'{key}' must be a number in [{lo}, {hi}], got {json.dumps(v)[:40]}")
    return v


class Job:
    """One request on its way through the worker: the prompt's ids, its settings, and what came back."""

    def __init__(self, ids, max_tokens, temperature, top_p, stop=(), stream=False, include_usage=False):
        self.ids, self.max_tokens, self.stop, self.stream = ids, max_tokens, stop, stream
        self.include_usage = include_usage  # a streamed reply ends with a usage chunk
        # only jobs that sample alike share a batch; greedy ones ignore top_p
        self.sampling = (True, float(temperature), float(top_p)) if temperature > 0 else (False, 1.0, 1.0)
        self.pieces = queue.Queue()  # streamed text, then None
        self.done, self.cancelled = threading.Event(), False
        self.text, self.finish_reason, self.completion_tokens, self.error = "", None, 0, None

    def usage(self):
        n = self.completion_tokens
        return {"prompt_tokens": len(self.ids), "completion_tokens": n, "total_tokens": len(self.ids) + n}

    def end(self, text, finish_reason, n, error=None):
        self.text, self.finish_reason, self.completion_tokens, self.error = text, finish_reason, n, error
        self.pieces.put(None)
        self.done.set()


def parse_request(req, tok, args, max_seq):
    """A chat-completions request body -> Job; whatever the client must fix raises BadRequest."""
    if not isinstance(req, dict):
        raise BadRequest("the body must be a JSON object")
    if "messages" not in req:
        raise BadRequest("'messages' is missing")
    n, stream, options = req.get("n"), req.get("stream") or False, req.get("stream_options") or {}
    if n is not None and (n != 1 or isinstance(n, bool)):
        raise BadRequest(f"'n' is {json.dumps(n)[:20]}: this server returns one choice (n = 1)")
    stop = req.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise BadRequest("'stop' must be a string or a list of strings")
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise BadRequest("'stream' must be true or false, 'stream_options' an object")
    ids = tok.encode(glm.chat_prompt(*chat_turns(req["messages"])))
    if len(ids) >= max_seq:
        raise BadRequest(f"the prompt is {len(ids)} tokens; the model takes {max_seq} in all: shorten the messages")
    newer = req.get("max_completion_tokens")  # the newer name of max_tokens
    max_tokens = number(req, "max_tokens", args.max_new_tokens if newer is None else newer, 1, 1 << 31, int)
    return Job(ids, min(max_tokens, max_seq - len(ids)), number(req, "temperature", args.temperature, 0, 2),
               number(req, "top_p", args.top_p, 1e-9, 1), stop, stream, bool(options.get("include_usage")))


class _BatchDone(Exception):
    """Raised from the streamer once every row has ended, to stop generating early."""


class Stopping(Exception):
    """Raised from the streamer when the server stops: the batch in flight ends at once."""


class Engine:
    """The one thread that owns the model: it takes the jobs waiting (up to max_batch), generates them
    as one left-padded batch, and hands each row's text to its job as the tokens arrive."""

    def __init__(self, model, tok, max_batch=16, batch_wait=0.0):
        self.model, self.tok, self.max_batch, self.batch_wait = model, tok, max_batch, batch_wait
        self.max_seq = model.config.max_sequence_length
        self.jobs, self.batch_sizes = queue.Queue(), []  # batch_sizes: one entry per generation
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.loop, name="generate", daemon=True)
        self.thread.start()

    def loop(self):
        waiting = []
        while True:
            if not waiting:
                waiting.append(self.jobs.get())
            deadline = time.monotonic() + self.batch_wait  # a window for requests that arrive together
            while len(waiting) < self.max_batch and waiting[-1] is not None:
                try:
                    waiting.append(self.jobs.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            if waiting[-1] is None:  # stop() was called
                return
            batch = self.pick(waiting)
            waiting = [j for j in waiting if j not in batch]
            self.run(batch)

    def pick(self, waiting):
        """The oldest job and the later ones that sample alike and fit the context beside it."""
        batch, T, N = [], 0, 0
        for j in waiting:
            t, n = max(T, len(j.ids)), max(N, j.max_tokens)
            if j.sampling == waiting[0].sampling and (t + n <= self.max_seq or not batch):
                batch, T, N = batch + [j], t, n
            if len(batch) == self.max_batch:
                break
        return batch

    def run(self, batch):
        self.batch_sizes.append(len(batch))
        rows = [TextStream(self.tok, j.stop) for j in batch]

        def streamer(t):  # the newest token of every row [B]: pad for rows past <eop>
            if self.stopping.is_set():
                raise Stopping("the server is stopping")
            for j, row, tid in zip(batch, rows, t.tolist()):
                if j.done.is_set():
                    continue
                piece = row.add(tid)
                if row.finish is None and (row.n >= j.max_tokens or j.cancelled):
                    row.finish, piece = "length", piece + row.rest()
                if piece and j.stream:
                    j.pieces.put(piece)
                if row.finish:
                    j.end(row.text, row.finish, row.n)
            if all(j.done.is_set() for j in batch):
                raise _BatchDone
        ids = glm.left_pad([j.ids for j in batch], self.tok.pad_id).to(next(self.model.parameters()).device)
        do_sample, temperature, top_p = batch[0].sampling
        try:
            self.model.generate(ids, max_new_tokens=max(j.max_tokens for j in batch), do_sample=do_sample,
                                temperature=temperature, top_p=top_p, streamer=streamer)
        except _BatchDone:
            pass
        except Exception as e:  # the server stays up; these requests get a 500
            for j in batch:
                if not j.done.is_set():
                    j.end("", None, 0, error=f"generation failed: {type(e).__name__}: {e}")

    def submit(self, job):
        self.jobs.put(job)

    def stop(self):
        """End the batch in flight (its requests get an error) and the thread."""
        self.stopping.set()
        self.jobs.put(None)
        self.thread.join()  # a thread still in torch at interpreter exit can abort the process


class Handler(BaseHTTPRequestHandler):
    """HTTP/1.0: one request a connection, so a streamed answer simply ends when the connection closes."""

    def log_message(self, *args):  # no line per request on stderr
        pass

    def send_json(self, code, obj):
        body = json.dumps(obj, ensure_ascii=False).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_error_json(self, code, message, kind="invalid_request_error"):
        self.send_json(code, {"error": {"message": message, "type": kind, "param": None, "code": None}})

    def do_GET(self):
        path = self.path.split("?")[0].rstrip("/")
        if path == "/health":
            self.send_json(200, {"status": "ok"})
        elif path in ("/v1/models", "/models"):
            self.send_json(200, {"object": "list", "data": [
                {"id": self.server.name, "object": "model", "created": self.server.created, "owned_by": "local"}]})
        else:
            self.send_error_json(404, f"no route GET {path}; try POST /v1/chat/completions", "not_found_error")

    def do_POST(self):
        path = self.path.split("?")[0].rstrip("/")
        if path not in ("/v1/chat/completions", "/chat/completions"):
            return self.send_error_json(404, f"no route POST {path}; try POST /v1/chat/completions", "not_found_error")
        try:
            n = int(self.headers.get("Content-Length", ""))
            raw = self.rfile.read(n) if 0 <= n <= 1 << 26 else b""
            req = json.loads(raw)
        except ValueError as e:
            return self.send_error_json(400, f"the body is not valid JSON with a Content-Length ({e})")
        engine = self.server.engine
        try:
            job = parse_request(req, engine.tok, self.server.args, engine.max_seq)
        except BadRequest as e:
            return self.send_error_json(400, str(e))
        engine.submit(job)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.server.name}
        if job.stream:
            return self.stream(job, meta)
        job.done.wait()
        if job.error:
            return self.send_error_json(500, job.error, "server_error")
        self.send_json(200, {**meta, "object": "chat.completion", "usage": job.usage(), "choices": [{
            "index": 0, "message": {"role": "assistant", "content": job.text}, "finish_reason": job.finish_reason}]})

    def stream(self, job, meta):
        """Server-sent events: a chat.completion.chunk per piece of text, the finish reason, [DONE]."""
        chunk = lambda delta, finish: {**meta, "object": "chat.completion.chunk", "choices": [  # noqa: E731
            {"index": 0, "delta": delta, "finish_reason": finish}]}
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        try:
            self.event(chunk({"role": "assistant", "content": ""}, None))
            while (piece := job.pieces.get()) is not None:
                self.event(chunk({"content": piece}, None))
            if job.error:
                self.event({"error": {"message": job.error, "type": "server_error", "param": None, "code": None}})
            else:
                self.event(chunk({}, job.finish_reason))
                if job.include_usage:
                    self.event({**meta, "object": "chat.completion.chunk", "choices": [], "usage": job.usage()})
            self.wfile.write(b"data: [DONE]\n\n")
        except OSError:  # the client left: its row stops at the next token
            job.cancelled = True

    def event(self, obj):
        self.wfile.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")
        self.wfile.flush()


def make_server(args):
    """(HTTP server, engine), listening but not yet serving: serve() or a test calls serve_forever."""
    model_dir, adapter_dir = resolve_dirs(args.model, args.adapter)
    tok = load_tokenizer(model_dir, adapter_dir)
    try:  # before the model loads: a port in use is known at once
        httpd = ThreadingHTTPServer((args.host, args.port), Handler)
    except OSError as e:
        raise OSError(f"--host {args.host} --port {args.port}: cannot listen there ({e.strerror}). HINT: choose "
                      "another --port, or stop what holds it") from None
    try:
        model = load_model(model_dir, adapter_dir, args.device,
                           (args.quantize, args.quant_group_size, args.quantize_head))
    except BaseException:
        httpd.server_close()
        raise
    httpd.engine = Engine(model, tok, args.max_batch, args.batch_wait_ms / 1000)
    httpd.args, httpd.created = args, int(time.time())
    httpd.name = args.name or os.path.basename(os.path.normpath(adapter_dir or model_dir))
    return httpd, httpd.engine


def serve(args):
    httpd, engine = make_server(args)
    host, port = httpd.server_address[:2]
    print(f"serving {httpd.name} at http://{host}:{port}/v1 (POST /v1/chat/completions); Ctrl-C stops", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        httpd.server_close()
        engine.stop()


# -----------------------------------------------------------------------------
# command line (glm.py chat / predict / serve land here)


def parse_args(argv=None, prog="infer.py"):
    p = flags.Parser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    commands = {"chat": (chat, "multi-turn chat in the terminal, streamed", 512, 0.95, 0.7),
                "predict": (predict, "answer every line of a jsonl file (resumable; --pp under torchrun)", 512, 0, 1),
                "serve": (serve, "OpenAI-compatible POST /v1/chat/completions", 512, 0.95, 0.7)}
    for name, (fn, text, n, temperature, top_p) in commands.items():
        c = sub.add_parser(name, help=text, description=text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        c.set_defaults(run=fn)
        c.add_argument("--model", help="base model folder (config.json, model*.safetensors, ice_text.model)")
        c.add_argument("--adapter", help="LoRA adapter folder to load onto the base (adapter_config.json ...)")
        c.add_argument("--quantize", type=int, default=0, help="8 / 4: the block linears in int8 / int4 (0: as stored)")
        c.add_argument("--quant_group_size", type=int, default=-1,
                       help="inputs per int scale: 0 = per row; -1 = int8 per row, int4 128")
        c.add_argument("--quantize_head", action="store_true", help="with --quantize: lm_head in int8 too")
        c.add_argument("--max_new_tokens", type=int, default=n, help="longest answer" + (
            " (a request's max_tokens overrides it)" if name == "serve" else ""))
        c.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
        c.add_argument("--top_p", type=float, default=top_p, help="nucleus sampling (1 = off)")
        if name != "predict":  # predict takes each rank's device from torchrun's LOCAL_RANK
            c.add_argument("--device", default="", help='cpu, cuda, cuda:1 ...; "" = cuda if there is one')
    c = sub.choices["predict"]
    c.add_argument("--data", required=True, help="jsonl: prompt (+ history), Alpaca instruction/input, or messages")
    c.add_argument("--out", required=True, help="jsonl to write; an existing one is continued")
    c.add_argument("--output_key", default="output", help="field that receives the answer")
    c.add_argument("--overwrite", action="store_true", help="start --out again instead of continuing it")
    c.add_argument("--batch_size", type=int, default=8, help="prompts generated together")
    c.add_argument("--max_prompt_len", type=int, default=0, help="prompt tokens kept (from the end); "
                   "0 = what max_new_tokens leaves of the context")
    c.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
    c.add_argument("--pp", type=int, default=1, help="pipeline stages (torchrun); replicas = world size / pp")
    c.add_argument("--timeout_min", type=float, default=10.0, help="a rank silent this long ends the run")
    c = sub.choices["serve"]
    c.add_argument("--host", default="127.0.0.1", help="0.0.0.0 listens on every interface")
    c.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    c.add_argument("--name", default="", help="model name in replies; \"\" = the folder's name")
    c.add_argument("--max_batch", type=int, default=16, help="requests generated together")
    c.add_argument("--batch_wait_ms", type=float, default=0.0, help="wait this long for more requests to batch")
    args = p.parse_args(argv)
    rules = {"max_new_tokens": (lambda v: v >= 1, ">= 1"), "temperature": (lambda v: v >= 0, ">= 0"),
             "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"), "batch_size": (lambda v: v >= 1, ">= 1"),
             "pp": (lambda v: v >= 1, ">= 1"), "max_prompt_len": (lambda v: v >= 0, ">= 0 (0 = automatic)"),
             "timeout_min": (lambda v: v > 0, "> 0"), "port": (lambda v: 0 <= v < 65536, "a port number"),
             "max_batch": (lambda v: v >= 1, ">= 1"), "batch_wait_ms": (lambda v: v >= 0, ">= 0")}
    for name, (ok, rule) in rules.items():  # the flags this command has
        v = getattr(args, name, None)
        if v is not None and not (math.isfinite(v) and ok(v)):
            sub.choices[args.cmd].error(f"argument --{name}: {v} must be {rule}")
    return args


def main(argv=None, prog="infer.py"):
    args = parse_args(argv, prog)
    args.run(args)


if __name__ == "__main__":
    flags.run(main)
