"""Rewards computed from the text of an answer, for train_ppo.py's --reward_fn: checks that can be
verified (the toy task's exact answer) and simple shaping terms, summed with weights.

    --reward_fn toy_exact                        # built in: 1 if the toy answer is exactly right, else 0
    --reward_fn toy_exact,brevity=0.1            # several, summed: weight 1 unless NAME=WEIGHT
    --reward_fn my_rewards:judge=0.5             # your own: MODULE:FUNCTION, found on the Python path

A reward function takes the batch's prompts and responses (two lists of str, the chat prompt as
the model saw it and the decoded answer) and returns one finite float per pair.
"""
import importlib
import math

import data


def toy_exact(prompts, responses):
    """The toy task's verifier: 1.0 for the exactly right answer to the arithmetic question, else 0.0."""
    return [float(data.toy_answer_correct(p, r)) for p, r in zip(prompts, responses)]


def brevity(prompts, responses, free=64):
    """A length example: 0 up to `free` characters, then -1 for every `free` more."""
    return [-max(0, len(r) - free) / free for r in responses]


BUILT_IN = {"toy_exact": toy_exact, "brevity": brevity}


def load(spec):
    """[(name, function, weight)] of a --reward_fn value: comma-separated NAME or NAME=WEIGHT, where a
    NAME is built in (toy_exact, brevity) or MODULE:FUNCTION."""
    fns = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, weight = part.partition("=")
        try:
            weight = float(weight) if weight else 1.0
            assert math.isfinite(weight)
        except (ValueError, AssertionError):
            raise ValueError(f"--reward_fn {part}: the weight {weight!r} is not a number. HINT: NAME=0.5") from None
        fns.append((name, find(name), weight))
    if not fns:
        raise ValueError(f"--reward_fn {spec!r} names no function. HINT: --reward_fn toy_exact, or MODULE:FUNCTION")
    return fns


def find(name):
    if name in BUILT_IN:
        return BUILT_IN[name]
    module, _, attr = name.partition(":")
    if not attr:
        raise ValueError(f"--reward_fn {name}: not a built-in reward ({', '.join(BUILT_IN)}) nor MODULE:FUNCTION")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except ImportError as e:
        raise ValueError(f"--reward_fn {name}: cannot import {module} ({e}). HINT: run from the folder that "
                         "holds it, or add that folder to PYTHONPATH") from None
    except AttributeError:
        raise ValueError(f"--reward_fn {name}: {module} has no {attr}") from None
    if not callable(fn):
        raise ValueError(f"--reward_fn {name}: {attr} is not a function")
    return fn


def score(fns, prompts, responses):
    """The weighted sum of every function's rewards, one float per (prompt, response). A function that
    fails, or returns something other than one finite number per pair, is named with a sample."""
    total = [0.0] * len(prompts)
    for name, fn, weight in fns:
        values = call(name, fn, prompts, responses)
        total = [t + weight * v for t, v in zip(total, values)]
    return total


def call(name, fn, prompts, responses):
    try:
        values = list(fn(prompts, responses))
    except Exception as e:
        raise ValueError(f"--reward_fn {name} raised {type(e).__name__}: {e}, on {culprit(fn, prompts, responses)}. "
                         "HINT: fix the function or the data") from None
    bad = next((i for i, v in enumerate(values) if not (isinstance(v, (int, float)) and math.isfinite(v))), None)
    if len(values) != len(prompts) or bad is not None:
        where = f"{values[bad]!r} for prompt {prompts[bad]!r}, response {responses[bad]!r}" if bad is not None \
            else f"{len(values)} values for {len(prompts)} pairs"
        raise ValueError(f"--reward_fn {name} returned {where}. HINT: return one finite float per pair")
    return [float(v) for v in values]


def culprit(fn, prompts, responses):
    """The first (prompt, response) on which fn fails alone, as text (the whole batch if none does)."""
    for p, r in zip(prompts, responses):
        try:
            fn([p], [r])
        except Exception:
            return f"prompt {p!r}, response {r!r}"
    return f"the batch of {len(prompts)} pairs"
