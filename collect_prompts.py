"""Grow a few hundred seed prompts into a pool of ~50K clean prompts for PPO (self-instruct style).

Each request shows the generator k prompts (seeds, plus a few generated ones once there are
some) and asks for new ones in their style; every candidate in the reply is filtered (length,
keyword blacklist, charset, exact and near duplicates by ROUGE-L) and the survivors are
appended to the output as PPO prompt lines: {"prompt", "history": [], "source", "seed_ids",
"request"}.

    # any OpenAI-compatible chat-completions endpoint, key read from an environment variable
    export OPENAI_API_KEY=...
    python collect_prompts.py --seeds data/seed_prompts.jsonl --out prompts.jsonl --target 50000 \\
        --api_base https://api.openai.com/v1 --api_model gpt-4o-mini --api_key_env OPENAI_API_KEY

    # a checkpoint this project can load, sampled in batches (GPU if there is one)
    python collect_prompts.py --seeds data/seed_prompts.jsonl --out prompts.jsonl --target 50000 \\
        --model checkpoints/sft --batch_size 16

    # time the filters and the near-duplicate check on 50K synthetic prompts (~16 s on 2 CPU cores)
    python collect_prompts.py --bench_filter 50000

Interrupt it at any time: every accepted prompt is already on disk, and rerunning the same
command resumes. Requests take their randomness from (--seed, request index) and replies are
processed in request order, so a resumed run ends with the same pool as an uninterrupted one
(given a generator that answers the same request the same way). The progress bar shows the
accept rate and why candidates were rejected; after --max_stall requests in a row with nothing
accepted the run stops (exit 2), names the reasons and the flags to change, and keeps the pool.
"""
import argparse
import bisect
import contextlib
import hashlib
import http.client
import json
import os
import random
import re
import sys
import threading
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from tqdm import tqdm

# Request i may show generated prompts only from requests before i - LAG. Requests in flight
# never exceed LAG, so every request sees a pool that is already final, whatever the timing.
LAG = 64


class CollectError(Exception):
    """A problem the user can fix; main() prints it without a traceback."""


# -----------------------------------------------------------------------------
# ROUGE-L on text units: one unit per Chinese (CJK) character, one per word elsewhere

CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
UNIT_RE = re.compile(f"[{CJK}]|[^\\W_{CJK}]+")


def text_units(text):
    """ROUGE-L units of `text`: CJK characters one by one, other words whole; case and punctuation ignored."""
    return UNIT_RE.findall(unicodedata.normalize("NFKC", text).casefold())


def match_masks(a):
    """For each item of a, the bit mask of the positions where it occurs (input to lcs_length)."""
    masks = {}
    for i, x in enumerate(a):
        masks[x] = masks.get(x, 0) | (1 << i)
    return masks


def lcs_length(a, b, masks=None):
    """Longest common subsequence of two sequences, bit-parallel (Allison-Dix, Hyyro 2004).

    Bit i of v is 0 where row b[:j] of the LCS table steps up at column i, so LCS = zeros of v.
    One big-int update per item of b replaces a row of the O(len(a) * len(b)) table."""
    masks = match_masks(a) if masks is None else masks
    v = full = (1 << len(a)) - 1
    for y in b:
        u = v & masks.get(y, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l(a, b):
    """ROUGE-L F1 of two texts: 2 * LCS / (len(a) + len(b)) over their units."""
    ua, ub = text_units(a), text_units(b)
    return 2 * lcs_length(ua, ub) / (len(ua) + len(ub)) if ua or ub else 1.0


class RougeIndex:
    """Answers exactly "does a kept prompt have ROUGE-L >= threshold with this one?" without an
    LCS against every kept prompt.

    ROUGE-L = 2 LCS / (m + n) and LCS <= overlap (the multiset intersection of the units), so a
    kept prompt of n units can only match if overlap >= need(m, n) = ceil(t (m + n) / 2): the
    screen never drops a true match, and every yes comes from an exact LCS. An inverted index from
    unit copies (x, c), "holds more than c copies of unit x", to kept prompts gives the overlap
    with all of them in one numpy bincount. The most common copies (long postings, e.g. 的 or
    "the") are left out; each adds at most 1, so counted + skipped still bounds the overlap."""

    def __init__(self, threshold):
        if not 0 < threshold <= 1:
            raise CollectError(f"--rouge {threshold}: the near-duplicate threshold must be in (0, 1]")
        frac = Fraction(threshold).limit_denominator(10_000)  # 0.7 -> 7/10: compare in integers
        self.num, self.den = frac.numerator, frac.denominator
        self.vocab = {}     # unit -> int id
        self.docs = []      # kept prompts as tuples of unit ids
        self.bags = []      # their unit counts {id: count}
        self.lens = Growing(np.int64)  # int64: need() multiplies lengths by the threshold's numerator
        self.postings = {}  # (unit id, c) -> Growing array of kept prompts with > c copies of the unit

    def need(self, m, n):  # least overlap (so least LCS) with 2 LCS / (m + n) >= num / den
        return (self.num * (m + n) + 2 * self.den - 1) // (2 * self.den)

    def add(self, units):
        ids = tuple(self.vocab.setdefault(u, len(self.vocab)) for u in units)
        bag = Counter(ids)
        d = len(self.docs)
        self.docs.append(ids)
        self.bags.append(bag)
        self.lens.append(len(ids))
        for x, c in bag.items():
            for k in range(c):
                self.postings.setdefault((x, k), Growing()).append(d)

    def find(self, units):
        """Index of a kept prompt with ROUGE-L >= threshold against `units`, or None."""
        ids = [self.vocab.get(u, -1) for u in units]  # unseen units (-1) match nothing kept
        m, N = len(ids), len(self.docs)
        if m == 0 or N == 0:
            return None
        bag = Counter(ids)
        lists = sorted((self.postings[(x, k)].view() for x, c in bag.items() for k in range(c)
                        if (x, k) in self.postings), key=len)
        # LCS <= min(m, n), so ROUGE-L <= 2 min(m, n) / (m + n): only n in [lo, hi] can match
        lo = -(-self.num * m // (2 * self.den - self.num))  # threshold <= 1, so 2 den > num
        hi = m * (2 * self.den - self.num) // self.num
        # skip the longest postings while a match still needs at least one counted hit
        skip = 0
        while lists and len(lists[-1]) > N // 8 and skip + 1 < self.need(m, lo):
            lists.pop()
            skip += 1
        if not lists:
            return None
        counted = np.bincount(np.concatenate(lists), minlength=N)  # [N] overlap over counted copies
        hit = np.flatnonzero(counted)  # a match needs a counted copy, so only these can match
        shared, n = counted[hit], self.lens.view()[hit]
        # overlap <= shared + skip must reach need(m, n), and n must lie in the window
        maybe = hit[(shared + skip >= self.need(m, n)) & (n >= lo) & (n <= hi)]
        masks = None
        for d in maybe.tolist():  # in pool order, so the same kept prompt is named every time
            doc = self.docs[d]
            # the exact overlap (Counter & takes the smaller count of each unit), before paying for an LCS
            if skip and sum((bag & self.bags[d]).values()) < self.need(m, len(doc)):
                continue
            masks = masks or match_masks(ids)
            if lcs_length(ids, doc, masks) >= self.need(m, len(doc)):
                return d
        return None


class Growing:
    """A numpy array that grows by doubling: append in O(1), view without copying."""

    def __init__(self, dtype=np.int32):
        self.buf, self.size = np.empty(4, dtype=dtype), 0

    def append(self, v):
        if self.size == len(self.buf):
            self.buf = np.concatenate([self.buf, np.empty_like(self.buf)])
        self.buf[self.size] = v
        self.size += 1

    def view(self):
        return self.buf[:self.size]


# -----------------------------------------------------------------------------
# the filter

# Tasks a text-only model cannot do. ASCII words match whole words, others as substrings.
BLACKLIST = (
    "image", "images", "picture", "pictures", "photo", "photos", "photograph", "screenshot",
    "video", "videos", "audio", "recording", "file", "files", "attachment", "attached", "pdf",
    "link", "links", "url", "hyperlink", "http://", "https://", "www.", "draw", "drawing",
    "sketch", "diagram", "flowchart", "upload", "download",
    "图片", "图像", "照片", "截图", "视频", "音频", "录音", "文件", "附件", "链接", "网址",
    "画一", "画出", "绘制", "草图", "示意图", "流程图", "上传", "下载",
)
LATIN_OR_HAN = re.compile(r"[a-z\u00c0-\u024f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
LETTER = re.compile(r"[^\W\d_]")
ALNUM = re.compile(r"[^\W_]")
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ufffd]")  # control characters, decoding debris


def blacklist_regex(words):
    parts = []
    for w in map(str.casefold, words):
        whole_word = re.fullmatch(r"[a-z0-9][a-z0-9 '-]*[a-z0-9]|[a-z0-9]", w)  # "file" but not "profile"
        parts.append(rf"(?<![a-z0-9]){re.escape(w)}(?![a-z0-9])" if whole_word else re.escape(w))
    return re.compile("|".join(parts)) if parts else None


def charset_ok(text):
    """Chinese or Latin-script text made mostly of letters and digits, without control characters."""
    if CONTROL.search(text):
        return False
    chars = len(text) - sum(c.isspace() for c in text)
    letters = len(LETTER.findall(text))
    if letters == 0 or len(ALNUM.findall(text)) < 0.5 * chars:
        return False  # mostly symbols: a formula, a code fragment, ASCII art
    return len(LATIN_OR_HAN.findall(text)) >= 0.9 * letters  # not Cyrillic, Arabic, kana ...


class PromptFilter:
    """Accepts or rejects candidate prompts one at a time; accepted ones join the pool it checks against."""

    REASONS = ("length", "charset", "blacklist", "duplicate", "near_duplicate")

    def __init__(self, rouge=0.7, min_units=3, max_units=150, blacklist=BLACKLIST):
        self.min_units, self.max_units = min_units, max_units
        self.blacklist = blacklist_regex(blacklist)
        self.exact = set()
        self.index = RougeIndex(rouge)

    @staticmethod
    def key(text):  # exact duplicates: equal up to case, NFKC width forms and whitespace
        return " ".join(unicodedata.normalize("NFKC", text).casefold().split())

    def offer(self, text):
        """None if `text` is accepted (and added), else the name of the first filter that rejected it."""
        units = text_units(text)
        folded = unicodedata.normalize("NFKC", text).casefold()
        if not self.min_units <= len(units) <= self.max_units:
            return "length"
        if not charset_ok(folded):
            return "charset"
        if self.blacklist is not None and self.blacklist.search(folded):
            return "blacklist"
        key = self.key(text)
        if key in self.exact:
            return "duplicate"
        if self.index.find(units) is not None:
            return "near_duplicate"
        self.exact.add(key)
        self.index.add(units)
        return None

    def add(self, text):
        """Put an already accepted prompt (read back on resume) into the pool unchecked."""
        self.exact.add(self.key(text))
        self.index.add(text_units(text))


# -----------------------------------------------------------------------------
# requests and replies

INSTRUCTION = """You are helping to collect requests that people send to an AI assistant. \
Here are {k} examples:

{examples}

Write {n} new requests in the same spirit. Vary the topic, length and kind (questions, \
instructions, creative writing, coding, advice, maths, role play), and write about half in \
Chinese and half in English, as the examples are. Each must be answerable with text alone: \
no images, audio, files or web links. Do not repeat or lightly reword the examples. Reply \
with a numbered list from {first} to {last}, one request per item, and nothing else."""


@dataclass
class Request:
    index: int
    text: str
    seed_ids: list
    sample_seed: int  # passed to the generator, so a resumed run can get the same reply


def make_request(index, seed, seeds, generated, k, k_generated, per_request):
    """Request `index`: k examples (up to k_generated of them generated), all drawn with an RNG
    that depends only on (seed, index)."""
    rng = random.Random(f"{seed}/{index}")
    n_gen = min(k_generated, len(generated))
    shown = rng.sample(seeds, min(k - n_gen, len(seeds))) + rng.sample(generated, n_gen)
    rng.shuffle(shown)
    examples = "\n".join(f"{i + 1}. {r['prompt']}" for i, r in enumerate(shown))
    text = INSTRUCTION.format(k=len(shown), examples=examples, n=per_request,
                              first=len(shown) + 1, last=len(shown) + per_request)
    seed_ids = sorted(r["seed_ids"][0] for r in shown if r["source"] == "seed")
    return Request(index, text, seed_ids, rng.randrange(2**31))


NUMBERED = re.compile(r"(?:\*\*)?(?:(?:prompt|request|task|instruction|question|问题|请求|任务|指令)\s*)?"
                      r"[#(（]?\d{1,3}\s*[.)）、:：](?!\d)\s*(?:\*\*)?\s*", re.IGNORECASE)
BULLET = re.compile(r"[-*•·]\s+")
QUOTES = "\"'“”‘’「」『』*` "


def parse_reply(text):
    """Candidate prompts in a reply: a numbered list (items may run over several lines; chatter
    before the first item or after a blank line is dropped) or else one per line."""
    lines = [line.strip() for line in text.splitlines()]
    numbered = any(NUMBERED.match(line) for line in lines)
    items, current = [], None
    for line in lines:
        if not line or line.startswith("```"):
            current = None  # a blank line ends an item
            continue
        m = (NUMBERED if numbered else BULLET).match(line)
        if numbered:
            if m:
                current = [line[m.end():]]
                items.append(current)
            elif current is not None:
                current.append(line)
        elif m or items or not line.endswith((":", "：")):  # not a leading "Here are some new prompts:"
            items.append([line[m.end():] if m else line])
    return [p for p in ("\n".join(item).strip(QUOTES) for item in items) if p]


# -----------------------------------------------------------------------------
# generators: an OpenAI-compatible endpoint, or a local checkpoint

SECRET = re.compile(r"(?i)\b(bearer\s+)[\w.~+/=-]+|\bsk-[\w-]+")  # a bearer token (RFC 6750), an sk-... key


def mask_secrets(text, key=""):
    """`text` with the API key, bearer tokens and sk-... keys replaced by ***: servers echo headers in errors."""
    text = text.replace(key, "***") if len(key) >= 4 else text  # shorter: a placeholder, not a secret
    return SECRET.sub(lambda m: (m[1] or "") + "***", text)


class ApiBackend:
    """Chat completions over HTTP from a bounded thread pool, with timeouts and retries."""

    def __init__(self, args):
        key = os.environ.get(args.api_key_env, "")
        if not key:
            raise CollectError(f"the API key is missing: environment variable {args.api_key_env} is not "
                               f"set. HINT: export {args.api_key_env}=... or point --api_key_env at the "
                               "variable that holds it (a server that needs no key accepts any value)")
        if not args.api_model:
            raise CollectError("--api_base needs --api_model, the model name the endpoint serves")
        self.url = args.api_base.rstrip("/") + "/chat/completions"
        self.key, self.args = key, args
        self.source = f"api:{args.api_model}"
        self.stopping = threading.Event()  # set when the run ends: retrying threads give up

    def complete(self, req):
        a = self.args
        body = json.dumps({"model": a.api_model, "messages": [{"role": "user", "content": req.text}],
                           "temperature": a.temperature, "top_p": a.top_p,
                           "max_tokens": a.max_new_tokens, "seed": req.sample_seed}).encode()
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.key}"}
        for attempt in range(a.retries + 1):
            retry_after = 0
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=a.timeout) as r:
                    raw = r.read()
                try:
                    text = json.loads(raw)["choices"][0]["message"]["content"]
                    if isinstance(text, str):
                        return text
                    problem = "the reply's content is not a string"
                except (ValueError, LookupError, TypeError):
                    problem = f"malformed reply: {mask_secrets(raw.decode('utf-8', 'replace'), self.key)[:120]!r}"
            except urllib.error.HTTPError as e:
                if e.code != 429 and e.code < 500:  # our request is wrong: retrying will not help
                    detail = mask_secrets(e.read().decode("utf-8", "replace"), self.key)[:300]
                    hint = {401: f"the key in {a.api_key_env} was refused",
                            403: f"the key in {a.api_key_env} may not use this model",
                            404: "check --api_base (it ends before /chat/completions, e.g. .../v1) "
                                 "and --api_model"}.get(e.code, "check --api_model and the sampling flags")
                    raise CollectError(f"{self.url} answered HTTP {e.code}: {detail}\nHINT: {hint}") from None
                problem = f"HTTP {e.code}"
                retry_after = retry_after_seconds(e.headers) if e.code == 429 else 0
            except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut short
                problem = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            # exponential backoff with jitter, so the retries of many threads do not arrive together
            delay = max(retry_after, a.backoff * 2**attempt * random.uniform(0.5, 1.0))
            if attempt < a.retries and self.stopping.wait(delay):
                raise CollectError("cancelled: the run is ending")
        raise CollectError(f"request {req.index} to {self.url} failed {a.retries + 1} times, last with "
                           f"{problem}.\nHINT: check that the endpoint is up and reachable (--api_base), "
                           "or raise --retries / --timeout; rerun the same command to resume.")

    def replies(self, build, start, stop):
        """(request, reply) for requests start.. in order, with up to --workers in flight."""
        pool = ThreadPoolExecutor(self.args.workers)
        pending, nxt = {}, start
        self.stopping.clear()
        try:
            for i in range(start, stop):
                while nxt < stop and nxt - i < self.args.workers:
                    req = build(nxt)
                    pending[nxt] = (req, pool.submit(self.complete, req))
                    nxt += 1
                req, fut = pending.pop(i)
                yield req, fut.result()
        finally:
            self.stopping.set()
            pool.shutdown(wait=False, cancel_futures=True)


def retry_after_seconds(headers):
    """A 429's Retry-After in seconds (at most a minute); 0 if absent or given as a date."""
    try:
        return min(float(headers.get("Retry-After") or 0), 60.0)
    except ValueError:
        return 0.0


class LocalBackend:
    """A checkpoint this project can load, sampled through glm.py in fixed batches of requests."""

    def __init__(self, args):
        import torch
        import glm
        self.torch, self.glm, self.args = torch, glm, args
        self.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        try:
            self.tok = glm.Tokenizer.from_dir(args.model)
            self.model = glm.ChatGLM.from_pretrained(args.model, dtype=dtype, device=self.device).eval()
        except (OSError, ValueError, KeyError) as e:
            raise CollectError(f"--model {args.model}: {e}") from None
        self.source = f"local:{os.path.basename(os.path.normpath(args.model))}"

    def complete_batch(self, reqs, seed):
        torch, a = self.torch, self.args
        ids = [self.tok.encode(self.glm.chat_prompt(r.text)) for r in reqs]
        x = self.glm.left_pad(ids, self.tok.pad_id).to(self.device)  # [B, T]
        new = min(a.max_new_tokens, self.model.config.max_sequence_length - x.shape[1])
        if new < 1:
            raise CollectError(f"a request of {x.shape[1]} tokens fills the model's context; lower --k")
        g = torch.Generator(device=self.device).manual_seed(seed)
        out = self.model.generate(x, max_new_tokens=new, do_sample=True, temperature=a.temperature,
                                  top_p=a.top_p, generator=g)
        eop = self.tok.eop_id
        rows = [row + [eop] for row in out[:, x.shape[1]:].tolist()]  # new tokens; a sentinel <eop> to cut at
        return [self.tok.decode(row[:row.index(eop)], skip_special_tokens=True) for row in rows]

    def replies(self, build, start, stop):
        # batches always cover [b*B, (b+1)*B) and are seeded by their first index, so a resumed
        # run regenerates exactly the batch it stopped in
        B = self.args.batch_size
        for lo in range(start - start % B, stop, B):
            reqs = [build(i) for i in range(lo, lo + B)]
            seed = int(hashlib.sha256(f"{self.args.seed}/{lo}".encode()).hexdigest()[:15], 16)
            for req, text in zip(reqs, self.complete_batch(reqs, seed)):
                if start <= req.index < stop:
                    yield req, text


# -----------------------------------------------------------------------------
# files


def read_seeds(path):
    if not os.path.isfile(path):
        raise CollectError(f"--seeds {path}: no such file")
    seeds = []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                raise CollectError(f"{path}:{n}: not UTF-8 text. HINT: save the file as UTF-8") from None
            except json.JSONDecodeError as e:
                raise CollectError(f"{path}:{n}: not valid JSON ({e.msg}). HINT: one object a line, "
                                   'like {"prompt": "..."}') from None
            prompt = obj.get("prompt") if isinstance(obj, dict) else None
            if not isinstance(prompt, str) or not prompt.strip():
                raise CollectError(f'{path}:{n}: needs a non-empty "prompt" string, like {{"prompt": "..."}}')
            seeds.append(prompt.strip())
    if not seeds:
        raise CollectError(f"{path}: no seed prompts. HINT: write a few hundred, one "
                           '{"prompt": "..."} object a line')
    return seeds


def read_pool(path):
    """Records already in the output file (a resumed run); a torn last line is cut off."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):  # killed mid-write: that prompt was never complete
        cut = data.rfind(b"\n") + 1
        print(f"{path}: dropping an unfinished last line ({len(data) - cut} bytes)", file=sys.stderr)
        with open(path, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    pool = []
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        try:
            rec = json.loads(line)
            assert isinstance(rec["prompt"], str) and isinstance(rec["request"], int)
        except (ValueError, KeyError, TypeError, AssertionError):
            raise CollectError(f"{path}:{n}: not a line this script wrote, so it cannot resume from it. "
                               "HINT: choose another --out, or delete the file to start over") from None
        pool.append(rec)
    return pool


# -----------------------------------------------------------------------------
# the benchmark


def synthetic_prompts(n, seed=0):
    """n prompt-like strings, half English half Chinese, Zipf-distributed words and characters
    after common openers, with some exact and near duplicates and some for each other filter."""
    rng = random.Random(seed)
    syll = ["ba", "ko", "ri", "tu", "me", "sa", "lin", "dor", "pe", "qui", "ven", "ha", "ne", "zo"]
    words = sorted({"".join(rng.choices(syll, k=rng.randint(1, 4))) for _ in range(6000)})
    rng.shuffle(words)
    chars = [chr(0x4E00 + i) for i in rng.sample(range(20000), 3000)]
    zipf = lambda size: [1 / (r + 1) for r in range(size)]  # noqa: E731
    w_words, w_chars = zipf(len(words)), zipf(len(chars))
    en_open = ["Write a", "Explain why", "How do I", "Give me", "What is the", "Summarize the",
               "List three", "Can you help me", "Describe how", "Compare the"]
    zh_open = ["请写一篇", "解释一下", "如何", "给我", "什么是", "总结一下", "列出三个", "帮我", "描述", "比较"]
    out = []
    for _ in range(n):
        r = rng.random()
        if out and r < 0.03:
            out.append(rng.choice(out))  # exact duplicate
        elif out and r < 0.10:  # near duplicate: insert one or two characters
            p = list(rng.choice(out))
            for _ in range(rng.randint(1, 2)):
                p.insert(rng.randrange(len(p) + 1), rng.choice(chars))
            out.append("".join(p))
        elif r < 0.12:
            out.append(rng.choice(["Describe this image", "把这个视频总结一下"]) + " " + rng.choice(words))
        elif r < 0.14:
            out.append(rng.choice(words))  # too short
        elif r < 0.15:
            out.append("Пожалуйста напишите короткое стихотворение о весне")
        elif rng.random() < 0.5:
            body = rng.choices(words, w_words, k=rng.randint(5, 30))
            out.append(rng.choice(en_open) + " " + " ".join(body) + "?")
        else:
            body = rng.choices(chars, w_chars, k=rng.randint(8, 50))
            out.append(rng.choice(zh_open) + "".join(body) + "。")
    return out


def bench_filter(n, seed=0, rouge=0.7):
    """Time PromptFilter over n synthetic prompts: returns seconds, kept and rejected counts."""
    prompts = synthetic_prompts(n, seed)
    flt, stats = PromptFilter(rouge=rouge), Counter()
    t0 = time.perf_counter()
    for p in prompts:
        stats[flt.offer(p) or "kept"] += 1
    return {"prompts": n, "seconds": time.perf_counter() - t0, **stats}


# -----------------------------------------------------------------------------
# main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", help="jsonl of seed prompts, one {\"prompt\": ...} a line")
    p.add_argument("--out", help="output jsonl (PPO prompt format); an existing one is resumed")
    p.add_argument("--target", type=int, default=50_000, help="pool size to reach, seeds included")
    p.add_argument("--seed", type=int, default=0, help="makes the requests (and a resumed run) reproducible")
    p.add_argument("--max_requests", type=int, default=None, help="stop before request N")
    p.add_argument("--max_stall", type=int, default=2000,
                   help="give up (exit 2, the pool kept) after N requests in a row with nothing accepted")
    g = p.add_argument_group("requests")
    g.add_argument("--k", type=int, default=8, help="example prompts shown per request")
    g.add_argument("--k_generated", type=int, default=2, help="how many of them come from the generated pool")
    g.add_argument("--per_request", type=int, default=10, help="new prompts asked for per request")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top_p", type=float, default=1.0)
    g.add_argument("--max_new_tokens", type=int, default=1024)
    g = p.add_argument_group("HTTP generator (an OpenAI-compatible chat-completions endpoint)")
    g.add_argument("--api_base", help="e.g. https://api.openai.com/v1")
    g.add_argument("--api_model", help="model name to request")
    g.add_argument("--api_key_env", default="OPENAI_API_KEY", help="environment variable holding the key")
    g.add_argument("--allow_http", action="store_true", help="send the key unencrypted to a non-loopback host")
    g.add_argument("--workers", type=int, default=8, help=f"requests in flight (at most {LAG})")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds before a request is retried")
    g.add_argument("--retries", type=int, default=6, help="retries on 429, 5xx, timeouts, malformed replies")
    g.add_argument("--backoff", type=float, default=1.0, help="first retry delay (s); doubles each time")
    g = p.add_argument_group("local generator (a checkpoint folder glm.py loads)")
    g.add_argument("--model", help="model folder: config.json, model*.safetensors, ice_text.model")
    g.add_argument("--batch_size", type=int, default=8, help=f"requests sampled together (at most {LAG})")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g = p.add_argument_group("filters")
    g.add_argument("--rouge", type=float, default=0.7, help="reject ROUGE-L >= this to a kept prompt")
    g.add_argument("--min_units", type=int, default=3, help="shortest prompt (CJK characters + words)")
    g.add_argument("--max_units", type=int, default=150, help="longest prompt, in the same units")
    g.add_argument("--blacklist_file", help="keywords to reject, one a line (replaces the built-in list)")
    p.add_argument("--bench_filter", type=int, metavar="N", help="time the filters on N synthetic prompts")
    p.print_usage = lambda file=None: None  # a bad flag gets argparse's one-line error, not the whole usage
    return p.parse_args(argv)


def check_args(a):
    if not a.seeds or not a.out:
        raise CollectError("--seeds and --out are required (or run --bench_filter N)")
    if (a.model is None) == (a.api_base is None):
        raise CollectError("choose one generator: --api_base URL (with --api_model) or --model DIR")
    if not 1 <= a.workers <= LAG or not 1 <= a.batch_size <= LAG:
        raise CollectError(f"--workers and --batch_size must be between 1 and {LAG}")
    if a.k < 1 or not 0 <= a.k_generated <= a.k or a.per_request < 1 or a.target < 1:
        raise CollectError("need --k >= 1, 0 <= --k_generated <= --k, --per_request >= 1, --target >= 1")
    if a.max_stall < 1:
        raise CollectError(f"--max_stall {a.max_stall}: must be >= 1 (requests in a row with nothing accepted "
                           "before giving up). HINT: a large value, e.g. --max_stall 100000, waits longer")
    if not 1 <= a.min_units <= a.max_units:
        raise CollectError("need 1 <= --min_units <= --max_units")
    if a.retries < 0 or not a.timeout > 0 or not a.backoff >= 0 or a.max_new_tokens < 1:
        raise CollectError("need --retries >= 0, --timeout > 0, --backoff >= 0, --max_new_tokens >= 1")
    try:
        url = urllib.parse.urlsplit(a.api_base or "")  # the key travels in a header: only https hides it
        loopback = url.hostname in ("127.0.0.1", "::1", "localhost")
    except ValueError as e:
        raise CollectError(f"--api_base {a.api_base}: not a URL ({e}). HINT: e.g. https://api.openai.com/v1") from None
    if a.api_base and url.scheme != "https" and not loopback and not a.allow_http:
        raise CollectError(f"--api_base {a.api_base}: the key would travel unencrypted. HINT: use https://, "
                           "or --allow_http on a network you trust (http to 127.0.0.1, ::1, localhost is fine)")
    try:  # fail now, not after loading a model: a folder, a path under a file, no permission
        new = not os.path.exists(a.out)
        open(a.out, "ab").close()  # appends nothing; a file made just for the check is removed
        if new:
            os.remove(a.out)
    except OSError as e:
        raise CollectError(f"--out {a.out}: cannot write a file there ({e.strerror}). HINT: name a .jsonl "
                           "file in a folder that exists and that you can write to") from None


def read_blacklist(path):
    """The keyword blacklist: the built-in one, or one word or phrase a line from --blacklist_file."""
    if not path:
        return BLACKLIST
    if not os.path.isfile(path):
        raise CollectError(f"--blacklist_file {path}: no such file")
    with open(path, encoding="utf-8") as f:
        return [w.strip() for w in f if w.strip()]


# Why a request's output was rejected: a candidate failed a filter, or a reply held no candidate at all
# (empty, or only chatter; counted per reply, not per candidate).
REJECTIONS = PromptFilter.REASONS + ("empty_reply",)


def breakdown(counts):
    """'near_duplicate 3,010, length 900, ...': the rejection counts, largest first, zeros left out."""
    parts = sorted(((counts[r], r) for r in REJECTIONS if counts[r]), key=lambda x: -x[0])
    return ", ".join(f"{r} {n:,}" for n, r in parts) or "none"


def summary(stats):
    """This run in one line: the accept rate over candidates and the rejections by reason."""
    n = stats["candidates"]
    rate = f" ({100 * stats['accepted'] / n:.1f}%)" if n else ""
    return (f"accepted {stats['accepted']:,} of {n:,} candidates{rate} from {stats['requests']:,} requests"
            f" | rejected: {breakdown(stats)}")


def stall_message(a, recent, pool):
    """Why the last --max_stall requests gave nothing, and what to change (two lines)."""
    n_gen = sum(r["request"] >= 0 for r in pool)
    repeats = (f"a higher --temperature (now {a.temperature}), a looser --rouge (now {a.rouge}; "
               f"e.g. {min(1.0, round(a.rouge + 0.1, 2))}), a larger --k_generated or a stronger model")
    hints = {"duplicate": repeats, "near_duplicate": repeats,
             "length": f"a stronger model, or wider --min_units/--max_units (now {a.min_units}..{a.max_units})",
             "charset": f"a stronger model, or a lower --temperature (now {a.temperature})",
             "blacklist": "a stronger model, or a shorter list in --blacklist_file",
             "empty_reply": f"a stronger model, or a larger --max_new_tokens (now {a.max_new_tokens})"}
    top = max(REJECTIONS, key=lambda r: recent[r]) if recent else None
    return (f"no prompt accepted in the last {a.max_stall:,} requests (--max_stall); rejected there: "
            f"{breakdown(recent)}. The pool so far ({len(pool):,} prompts, {n_gen:,} generated) is complete in "
            f"{a.out}\nHINT: try {hints.get(top, 'a stronger model')}, then rerun: it continues from that pool")


def report(a, pool, stats, seconds, stalled=False):
    """What the pool holds and what this run did."""
    n_seed = sum(r["request"] < 0 for r in pool)
    print(f"pool: {len(pool)} prompts ({n_seed} seeds, {len(pool) - n_seed} generated) in {a.out}; target {a.target}")
    print(f"this run: {seconds:.1f} s ({stats['filter_seconds']:.1f} s filtering), {summary(stats)}")
    if len(pool) < a.target and not stalled:
        print(f"stopped at --max_requests {a.max_requests} short of the target. HINT: raise "
              "--max_requests and rerun the same command to continue", file=sys.stderr)


def grow(a, backend, flt, pool, seed_recs, generated, keep, stats):
    """Request new prompts, in request order, until the pool reaches --target (or --max_requests);
    every candidate passes the filter before keep(record) writes it. After --max_stall requests in a
    row with nothing accepted, returns the rejection counts of those requests (else None)."""
    start = generated[-1]["request"] if generated else 0  # redo the last request: it may be half written
    redo = {r["prompt"] for r in generated if r["request"] == start}

    def build(i):  # only requests before i - LAG are visible, so timing never changes a request
        visible = generated[:bisect.bisect_left(generated, i - LAG, key=lambda r: r["request"])]
        return make_request(i, a.seed, seed_recs, visible, a.k, a.k_generated, a.per_request)

    stop = a.max_requests if a.max_requests is not None else 1 << 62
    bar = tqdm(total=a.target, initial=min(len(pool), a.target), desc="prompts", unit="", dynamic_ncols=True)
    stall, recent, shown = 0, Counter(), time.monotonic()  # requests in a row with nothing accepted; why
    replies = backend.replies(build, start, stop)
    with bar, contextlib.closing(replies):  # closing the replies cancels requests still queued
        for req, reply in (replies if len(pool) < a.target else ()):
            stats["requests"] += 1
            before = stats["accepted"]
            texts = parse_reply(reply)
            if not texts:  # nothing to filter: the whole reply is rejected
                stats["empty_reply"] += 1
                recent["empty_reply"] += 1
            for text in texts:
                if req.index == start and text in redo:
                    continue  # written before the interruption
                stats["candidates"] += 1
                t = time.perf_counter()
                reason = flt.offer(text)
                stats["filter_seconds"] += time.perf_counter() - t
                if reason:
                    stats[reason] += 1
                    recent[reason] += 1
                    continue
                rec = {"prompt": text, "history": [], "source": backend.source,
                       "seed_ids": req.seed_ids, "request": req.index}
                generated.append(keep(rec))
                stats["accepted"] += 1
                bar.update()
                if len(pool) >= a.target:
                    break
            bar.set_postfix_str(summary(stats), refresh=False)
            if len(pool) >= a.target:
                break
            if time.monotonic() - shown > 0.5:  # update() redraws only on an accept: show a stall too
                bar.refresh()
                shown = time.monotonic()
            stall, recent = (stall + 1, recent) if stats["accepted"] == before else (0, Counter())
            if stall >= a.max_stall:
                return recent  # every accepted prompt is already on disk
    return None


def collect(a):
    """Run the collection described by the parsed flags `a`; returns the counters it reports."""
    check_args(a)
    seeds = read_seeds(a.seeds)
    flt = PromptFilter(a.rouge, a.min_units, a.max_units, read_blacklist(a.blacklist_file))
    backend = ApiBackend(a) if a.api_base else LocalBackend(a)

    # ---- resume: what is on disk is in the pool, unchecked
    pool = read_pool(a.out)
    for rec in pool:
        flt.add(rec["prompt"])
    seed_recs = [r for r in pool if r["request"] < 0]
    generated = [r for r in pool if r["request"] >= 0]
    stats, t0 = Counter(), time.time()
    with open(a.out, "a", encoding="utf-8") as out:
        def keep(rec):
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            out.flush()  # a killed run keeps every prompt it reported
            pool.append(rec)
            return rec

        # ---- seeds, filtered like everything else (a prompt written twice by people counts once)
        first = len(seeds) if generated else max((r["seed_ids"][0] + 1 for r in seed_recs), default=0)
        for i, text in enumerate(seeds[first:], first):
            reason = flt.offer(text)
            if reason:
                stats[f"seed {reason}"] += 1
            else:
                rec = {"prompt": text, "history": [], "source": "seed", "seed_ids": [i], "request": -1}
                seed_recs.append(keep(rec))
        if stats:
            print(f"seeds: {sum(stats.values())} rejected ({dict(stats)})", file=sys.stderr)

        # ---- generation, replies in request order
        stalled = grow(a, backend, flt, pool, seed_recs, generated, keep, stats)
    report(a, pool, stats, time.time() - t0, stalled is not None)
    if stalled is not None:  # the output is closed, every line whole: a rerun resumes from it
        raise CollectError(stall_message(a, stalled, pool))
    return stats


def main(argv=None):
    a = parse_args(argv)
    try:
        if a.bench_filter:
            r = bench_filter(a.bench_filter, a.seed, a.rouge)
            print(f"filtered {r['prompts']} synthetic prompts in {r['seconds']:.1f} s: " +
                  ", ".join(f"{k} {r.get(k, 0)}" for k in ("kept",) + PromptFilter.REASONS))
            return
        collect(a)
    except CollectError as e:
        print(f"error: {mask_secrets(str(e), os.environ.get(a.api_key_env, ''))}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: every accepted prompt is in {a.out}; rerun the same command to continue",
              file=sys.stderr)
        code = 130
    else:
        return
    # the output is closed by now; exit without joining HTTP threads that may wait out --timeout
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
