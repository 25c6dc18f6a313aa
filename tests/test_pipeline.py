"""Pipeline stages x data-parallel replicas (gloo, CPU) against one process: the same losses, the same
gradients, the same generations, checkpoints that read back under another number of stages; and a
bf16 stage's fp32 gradient accumulators and masters.

The multi-process tests are named test_gloo_* (select them with `pytest -k gloo`). Their jobs run
in one launch: 4 ranks forked from this process (conftest.fork_ranks) run the job list of
tests/pipeline_worker.py in one process group, as P = 4 or as P = 2 x D = 2, and the tests here
check the results against references computed in this process without dist.py and optim.py.
"""
import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import dist
import glm
import lora
import optim
import pipeline_worker as pw
import quant
import train_dpo
import train_sft
from conftest import (dpo_argv, fork_ranks, head_lines, losses, make_base, newest_checkpoint, sft_argv,
                      write_jsonl)

pytestmark = pytest.mark.usefixtures("one_thread")


def launch(nproc, jobs, out):
    """Run the jobs in nproc forked ranks; returns .results (each rank's {job name: "ok" or the
    error}) and .log (the ranks' output if one failed). A failed job ends the launch: the jobs after
    it are missing from the results, and their tests say so."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "jobs.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(jobs, f)
    log = ""
    try:
        fork_ranks(lambda rank: pw.main(path), os.path.join(out, "ranks"), nproc)
    except pytest.fail.Exception as e:  # reported by the tests of the jobs that did not finish
        log = str(e)
    return SimpleNamespace(out=out, results=[read_results(os.path.join(out, f"results-rank{r}.json"))
                                             for r in range(nproc)], log=log)


def read_results(path):
    """A rank's {job name: "ok" or the error}; {} if it finished no job."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def saved(out, name, nproc):
    """Every rank's saved result of one job."""
    return [torch.load(os.path.join(out, f"{name}-rank{r}.pt"), weights_only=True) for r in range(nproc)]


# -----------------------------------------------------------------------------
# the single-process references, written without dist.py and optim.py


def step_loss(logits, labels, n):
    """Next-token cross-entropy of logits [B, T, V] against labels [B, T], summed and divided by n."""
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1),
                           ignore_index=data.IGNORE, reduction="sum") / n


def label_count(mbs):
    return sum(int((mb["labels"][:, 1:] != data.IGNORE).sum()) for mb in mbs)


def reference_grads(base, mode, micro_batches=pw.MICRO_BATCHES, quantize=(0, 0)):
    """(loss, label count, {name: grad}): the whole model, a plain loop of full forwards and summed
    cross-entropy over every micro-batch divided by the global label count, then backward.
    quantize (bits, group size): the whole model's block linears quantized in place, in one piece."""
    model = quant.quantize_model(glm.ChatGLM.from_pretrained(base), *quantize)
    if mode == "lora":
        lora.inject_lora(model, targets=pw.TRAINS["lora_targets"], r=pw.TRAINS["lora_rank"],
                         alpha=pw.TRAINS["lora_alpha"])
        pw.set_lora_values(model)
    else:
        first_trained = pw.LAYERS - pw.TRAINS["train_layers"] if mode == "last_n" else 0
        for name, p in model.named_parameters():
            m = glm.LAYER_KEY.fullmatch(name)
            p.requires_grad_(mode == "full" or (m is not None and int(m.group(1)) >= first_trained))
    mbs = pw.global_microbatches(micro_batches)
    n, total = label_count(mbs), 0.0
    for mb in mbs:
        loss = step_loss(model(mb["input_ids"]), mb["labels"], n)
        loss.backward()
        total += loss.item()
    return total, n, {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def reference_adamw(base):
    """The whole model after HOSTED_STEPS steps of torch's own AdamW (decay on matrices only) on
    the plain loop's gradients, clipped by torch's clip_grad_norm_: {name: weight}, {name: state}."""
    model = glm.ChatGLM.from_pretrained(base)
    mbs = pw.global_microbatches()
    n = label_count(mbs)
    named = dict(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for p in named.values() if p.dim() >= 2], "weight_decay": pw.HOSTED_WD},
                             {"params": [p for p in named.values() if p.dim() < 2], "weight_decay": 0.0}],
                            lr=pw.HOSTED_LR, betas=(0.9, 0.95))
    for _ in range(pw.HOSTED_STEPS):
        opt.zero_grad()
        for mb in mbs:
            step_loss(model(mb["input_ids"]), mb["labels"], n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), pw.HOSTED_CLIP)
        opt.step()
    return ({k: p.detach() for k, p in named.items()}, {k: opt.state[p] for k, p in named.items()})


def reference_generation(model_dir, replica, replicas, dtype):
    """(ids, log-probabilities, texts) of the whole model's own KV-cached greedy generation over one
    replica's share of the prompts."""
    model = glm.ChatGLM.from_pretrained(model_dir, dtype=dtype).eval()
    tok = glm.Tokenizer(pw.TOK_PATH)
    ids = glm.left_pad(pw.prompts(replica, replicas), tok.pad_id)
    out, logprobs = model.generate(ids, max_new_tokens=pw.NEW_TOKENS, return_logprobs=True)
    return out, logprobs, [tok.decode(row, skip_special_tokens=True) for row in out[:, ids.shape[1]:]]


# -----------------------------------------------------------------------------
# checks of a launch's results against the references


def ok(launched, name):
    for rank, results in enumerate(launched.results):
        assert name in results, f"job {name} did not run on rank {rank}: the launch stopped before it. {launched.log}"
        assert results[name] == "ok", f"job {name} failed on rank {rank}:\n{results[name]}"


def check_hosted(out, name, nproc, base, hosts):
    """Every rank's weights and each replica's optimiser states equal torch's AdamW on one process;
    every hosted state sits on its host and nowhere else."""
    ranks = saved(out, name, nproc)
    want_w, want_state = reference_adamw(base)
    for replica in {r["dp_rank"] for r in ranks}:
        mine = [r for r in ranks if r["dp_rank"] == replica]
        got_w, got_state = {}, {}
        for r in mine:
            got_w.update(r["weights"])
            assert not got_state.keys() & r["state"].keys(), "one state kept on two stages"
            got_state.update(r["state"])
            for n in r["state"]:
                assert hosts.get(optim.unit_of(n), r["pp_rank"]) == r["pp_rank"] or n in r["guests"]
            for n in r["guests"]:
                assert hosts[optim.unit_of(n)] == r["pp_rank"] and n in r["state"]
        assert sorted(n for r in mine for n in r["guests"]) == sorted(n for r in mine for n in r["away"])
        assert {optim.unit_of(n) for r in mine for n in r["guests"]} == set(hosts)
        assert got_w.keys() == want_w.keys() == got_state.keys()
        for k in want_w:
            torch.testing.assert_close(got_w[k], want_w[k], atol=2e-6, rtol=1e-5, msg=k)
            for m in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(got_state[k][m], want_state[k][m], atol=1e-7, rtol=1e-4, msg=f"{k} {m}")


def merged_grads(out, name, nproc):
    """Every rank's saved step, and {param name: grad} over the pipeline (replica 0's stages)."""
    ranks = saved(out, name, nproc)
    grads = {}
    for r in ranks:
        if r["dp_rank"] == 0:
            assert not grads.keys() & r["grads"].keys(), "two stages hold the same parameter"
            grads.update(r["grads"])
    return ranks, grads


def check_against_reference(base, out, name, nproc, mode="full", micro_batches=pw.MICRO_BATCHES, quantize=(0, 0)):
    loss, n, want = reference_grads(base, mode, micro_batches, quantize)
    ranks, got = merged_grads(out, name, nproc)
    assert got.keys() == want.keys()  # every trainable tensor got a gradient, nothing frozen did
    for r in ranks:
        assert r["n_tokens"] == n  # the global label count, summed over replicas
        assert abs(r["loss"] - loss) < 1e-5, (r["rank"], r["loss"], loss)  # every stage and replica knows the loss
        assert all(k in r["trainable"] for k in r["grads"])
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-5, msg=key)
    for r in ranks:  # after sync_grads every replica holds the same summed gradients
        for key, g in r["grads"].items():
            torch.testing.assert_close(g, got[key], atol=1e-7, rtol=1e-6, msg=f"rank {r['rank']}: {key}")
    return ranks


def check_generation(model_dir, out, name, nproc, replicas, dtype=torch.float32, atol=1e-4):
    """Every stage of every replica returns what the whole model generates in one process for that
    replica's prompts: the same tokens and texts, log-probabilities to atol."""
    ranks = saved(out, name, nproc)
    assert sorted(r["dp_rank"] for r in ranks) == sorted(list(range(replicas)) * (nproc // replicas))
    for replica in range(replicas):
        ids, logprobs, texts = reference_generation(model_dir, replica, replicas, dtype)
        assert ids.shape[1] > len(max(pw.prompts(replica, replicas), key=len))  # something was generated
        for r in (r for r in ranks if r["dp_rank"] == replica):
            assert torch.equal(r["ids"], ids), (replica, r["ids"], ids)
            torch.testing.assert_close(r["logprobs"], logprobs, atol=atol, rtol=0)
            assert r["texts"] == texts
            group_ids, group_logprobs = r["group"]  # greedy: each of a prompt's 3 completions is its answer
            assert torch.equal(group_ids, ids.repeat_interleave(3, 0)), (replica, group_ids, ids)
            torch.testing.assert_close(group_logprobs, logprobs.repeat_interleave(3, 0), atol=atol, rtol=0)


# -----------------------------------------------------------------------------
# the launch and the single-process runs (module fixtures: each runs once, the tests read its results)


# optimiser states kept away from their stage: P = 4 holds one block a stage, P = 2 two
HOSTS_P4 = {"embedding": 3, "head": 0, "layer 1/attention": 2, "layer 1/mlp": 3, "layer 2/mlp": 0}
HOSTS_P2 = {"embedding": 1, "layer 3/mlp": 0, "head": 0}


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    base = make_base(root / "base", pw.LAYERS, std=0.1)
    # generation's model: at std 0.1 every prompt gets nearly the same continuation, which would
    # hide rows mixed up between micro-batches
    gen = make_base(root / "gen", pw.LAYERS, std=0.3, seed=3)
    train = write_jsonl(root / "train12.jsonl", head_lines(pw.TOY_TRAIN, 12))  # 3 steps an epoch
    return SimpleNamespace(root=root, base=base, gen=gen, train=train)


@pytest.fixture(scope="module")
def launched(setup_dir):
    """The one launch, 4 processes as P = 4 or P = 2 x D = 2: one step's gradients, optimiser states
    kept on other stages, generation (fp32 and bf16 stages), train_sft.py runs, a --pp 4 checkpoint
    resumed under --pp 2 x 2 replicas, and --pp 3."""
    s, out = setup_dir, str(setup_dir.root / "launch")
    g = dict(kind="grads", model=s.base)

    def sft(name, *extra, **flags):  # a train_sft.py run writing to root/name
        return dict(kind="train", name=name, argv=sft_argv(s.base, s.train, s.root / name, *extra, **flags))

    jobs = [
        dict(g, name="p4", pp=4, mode="full"),
        dict(g, name="p4_m1", pp=4, mode="full", micro_batches=1),  # fewer micro-batches than stages
        dict(g, name="p4_last2", pp=4, mode="last_n"),
        dict(g, name="p4_lora", pp=4, mode="lora"),
        dict(g, name="p2d2_lora_int4", pp=2, mode="lora", quantize=[4, 16]),  # each stage quantizes its blocks
        dict(g, name="p2d2", pp=2, mode="full"),
        dict(g, name="p2d2_uneven", pp=2, mode="full", counts=[1, 3], checkpoint=True),  # and recomputed
        dict(kind="hosted", name="hosted_p4", pp=4, model=s.base, hosts=HOSTS_P4),
        dict(kind="hosted", name="hosted_p2d2", pp=2, model=s.base, hosts=HOSTS_P2),
        # 5 prompts in 5 micro-batches of one: more micro-batches than stages circulate
        dict(kind="generate", name="gen_p4", model=s.gen, pp=4, micro_batches=5),
        dict(kind="generate", name="gen_p2d2", model=s.gen, pp=2, micro_batches=2),
        # bf16 stages pass bf16 hidden states around the ring
        dict(kind="generate", name="gen_p2d2_bf16", model=s.gen, pp=2, micro_batches=2, dtype="bfloat16"),
        # warmup 4 > 3 steps: the first three learning rates do not depend on max_steps, so this run
        # is the first half of a 6-step run and may be resumed as one
        sft("sft_p4", "--pp", "4", max_steps=3),
        dict(kind="copy", name="copy_p4", src=str(s.root / "sft_p4"), dst=str(s.root / "sft_p4_to_p2d2")),
        # 2 replicas of 2 micro-batches: the global batch of one process with grad_accum 4
        sft("sft_p2d2", "--pp", "2", max_steps=4),
        sft("sft_p2d2_lora", "--pp", "2", "--lora_rank", "4", max_steps=4),
        sft("sft_p2d2_last2", "--pp", "2", "--train_layers", "2", max_steps=4),  # stage 0 only runs forward
        sft("sft_p2d2_pack", "--pp", "2", "--pack", max_steps=2),  # packed rows carry their own positions and mask
        # 2 replicas of 1 micro-batch: the 4 examples a step of the --pp 4 run
        sft("sft_p4_to_p2d2", "--pp", "2", "--grad_accum", "1", "--resume"),
        # train_dpo.py: 2 replicas of 1 micro-batch of 2 prompts, the 4 prompts a step of one process
        dict(kind="train", script="dpo", name="dpo_p2d2", argv=dpo_argv(s.base, ranked8(s), s.root / "dpo_p2d2", "--pp",
                                                                      "2", "--grad_accum", "1", max_steps=2,
                                                                      eval_every=2)),
        dict(sft("pp3", "--pp", "3"), fails=True),
    ]
    return launch(4, jobs, out)


@pytest.fixture(scope="module")
def single(setup_dir):
    """The same training runs in this process (P = D = 1)."""
    s, runs = setup_dir, {}
    for name, extra, steps in (("sft_p1", [], 6), ("sft_p1_3", [], 3),
                               ("sft_p1_ga4", ["--grad_accum", "4"], 4),
                               ("sft_p1_ga4_lora", ["--grad_accum", "4", "--lora_rank", "4"], 4),
                               ("sft_p1_ga4_last2", ["--grad_accum", "4", "--train_layers", "2"], 4),
                               ("sft_p1_ga4_pack", ["--grad_accum", "4", "--pack"], 2)):
        train_sft.main(sft_argv(s.base, s.train, s.root / name, *extra, max_steps=steps))
        runs[name] = s.root / name
    runs["dpo_p1"] = s.root / "dpo_p1"
    train_dpo.main(dpo_argv(s.base, ranked8(s), runs["dpo_p1"], max_steps=2, eval_every=2))
    return runs


def ranked8(s):
    """The first 8 toy rankings (3 answers each), for train_dpo.py's runs."""
    return write_jsonl(s.root / "rank8.jsonl", head_lines(data.toy_file("rm_train"), 8))


def assert_same_curve(got, want, steps, atol=1e-5):
    assert sorted(got) == list(steps), sorted(got)
    for step in steps:
        assert abs(got[step] - want[step]) <= atol * max(1.0, abs(want[step])), (step, got[step], want[step])


# -----------------------------------------------------------------------------
# gradients of one step


def test_train_step_in_one_process_matches_the_plain_loop(setup_dir):
    d = dist.setup(1)
    model = glm.ChatGLM.from_pretrained(setup_dir.base)
    params = optim.select_trainable(model, "full")
    mbs = pw.global_microbatches()
    n_tok = train_sft.count_label_tokens(mbs)
    loss = dist.train_step(model, d, mbs, train_sft.sft_loss(n_tok))
    want_loss, n, want = reference_grads(setup_dir.base, "full")
    assert int(n_tok) == n and abs(loss.item() - want_loss) < 1e-5
    got = {name: p.grad for name, p in model.named_parameters()}
    assert len(params) == len(got) == len(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-5, msg=key)


def test_gloo_p4_optimizer_states_kept_on_other_stages_match_torch_adamw(setup_dir, launched):
    ok(launched, "hosted_p4")
    check_hosted(launched.out, "hosted_p4", 4, setup_dir.base, HOSTS_P4)


def test_gloo_p2_d2_optimizer_states_kept_on_other_stages_match_torch_adamw(setup_dir, launched):
    ok(launched, "hosted_p2d2")
    check_hosted(launched.out, "hosted_p2d2", 4, setup_dir.base, HOSTS_P2)


def test_gloo_p4_gradients_match_one_process(setup_dir, launched):
    ok(launched, "p4")
    check_against_reference(setup_dir.base, launched.out, "p4", 4)


def test_gloo_p4_with_one_micro_batch_matches_one_process(setup_dir, launched):
    ok(launched, "p4_m1")
    check_against_reference(setup_dir.base, launched.out, "p4_m1", 4, micro_batches=1)


def test_gloo_p2_d2_gradients_match_one_process(setup_dir, launched):
    ok(launched, "p2d2")
    ranks = check_against_reference(setup_dir.base, launched.out, "p2d2", 4)
    assert sorted((r["pp_rank"], r["dp_rank"]) for r in ranks) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_gloo_p2_d2_uneven_recomputed_stages_match_one_process(setup_dir, launched):
    ok(launched, "p2d2_uneven")
    ranks = check_against_reference(setup_dir.base, launched.out, "p2d2_uneven", 4)
    for r in ranks:  # counts [1, 3], every block recomputed in backward
        assert r["recomputed"] == ([0] if r["pp_rank"] == 0 else [1, 2, 3])
        if r["pp_rank"] == 0:
            assert sorted(k.split(".")[2] for k in r["grads"] if ".layers." in k) == ["0"] * 12


def test_gloo_p4_last2_frozen_stages_get_no_gradients(setup_dir, launched):
    ok(launched, "p4_last2")
    ranks = check_against_reference(setup_dir.base, launched.out, "p4_last2", 4, mode="last_n")
    for r in ranks:  # blocks 0 and 1 (stages 0 and 1) are frozen: they only run forward
        assert r["first_trainable"] == 2
        assert bool(r["grads"]) == (r["pp_rank"] >= 2)


def test_gloo_p4_lora_gradients_match_one_process(setup_dir, launched):
    ok(launched, "p4_lora")
    ranks = check_against_reference(setup_dir.base, launched.out, "p4_lora", 4, mode="lora")
    assert all(".lora_" in k for r in ranks for k in r["grads"])


def test_gloo_p2_d2_lora_on_an_int4_base_matches_one_process(setup_dir, launched):
    ok(launched, "p2d2_lora_int4")
    check_against_reference(setup_dir.base, launched.out, "p2d2_lora_int4", 4, mode="lora", quantize=(4, 16))


# -----------------------------------------------------------------------------
# pipelined generation


def test_gloo_p4_generation_with_more_micro_batches_than_stages_equals_one_process(setup_dir, launched):
    ok(launched, "gen_p4")
    check_generation(setup_dir.gen, launched.out, "gen_p4", 4, replicas=1)


def test_gloo_p2_d2_generation_equals_one_process_per_replica(setup_dir, launched):
    ok(launched, "gen_p2d2")
    check_generation(setup_dir.gen, launched.out, "gen_p2d2", 4, replicas=2)


def test_gloo_p2_d2_bf16_generation_equals_one_bf16_process(setup_dir, launched):
    ok(launched, "gen_p2d2_bf16")
    check_generation(setup_dir.gen, launched.out, "gen_p2d2_bf16", 4, replicas=2, dtype=torch.bfloat16, atol=2e-2)


# -----------------------------------------------------------------------------
# train_sft.py (and train_dpo.py) in several processes


def test_gloo_dpo_p2_d2_gives_the_single_process_losses_and_held_out_scores(setup_dir, launched, single):
    """Each replica computes its share of the reference cache: the cache, the losses and the held-out
    metrics are those of one process."""
    ok(launched, "dpo_p2d2")
    got, want = setup_dir.root / "dpo_p2d2", single["dpo_p1"]
    assert_same_curve(losses(got), losses(want), [1, 2])
    for key in ("eval_loss", "eval_pair_acc", "eval_margin", "eval_chosen_drift", "eval_kl"):
        assert_same_curve(losses(got, key), losses(want, key), [2])
    a, b = (torch.load(r / train_dpo.REF_FILE, weights_only=True) for r in (got, want))
    for split in ("train", "eval", "kl"):  # kl: the reference's samples for the KL, drawn through the pipeline
        torch.testing.assert_close(a[split], b[split], atol=1e-5, rtol=1e-5)
    assert a["kl_groups"] == b["kl_groups"]


def test_gloo_sft_p2_d2_gives_the_single_process_losses(setup_dir, launched, single):
    ok(launched, "sft_p2d2")
    assert_same_curve(losses(setup_dir.root / "sft_p2d2"), losses(single["sft_p1_ga4"]), range(1, 5))


def test_gloo_sft_p2_d2_eval_loss_is_the_single_process_one(setup_dir, launched, single):
    ok(launched, "sft_p2d2")
    assert_same_curve(losses(setup_dir.root / "sft_p2d2", "eval_loss"), losses(single["sft_p1_ga4"], "eval_loss"), [4])


def test_gloo_sft_p2_d2_lora_gives_the_single_process_losses(setup_dir, launched, single):
    ok(launched, "sft_p2d2_lora")
    assert_same_curve(losses(setup_dir.root / "sft_p2d2_lora"), losses(single["sft_p1_ga4_lora"]), range(1, 5))


def test_gloo_sft_p2_d2_adapter_records_every_stage_s_base_fingerprint(setup_dir, launched):
    """Stage 0 holds the embedding, stage 1 the lm_head: the adapter written from both stages
    fingerprints both, as one process's does, so a wrong base is caught on any stage."""
    from safetensors import safe_open
    ok(launched, "sft_p2d2_lora")
    with safe_open(str(setup_dir.root / "sft_p2d2_lora" / "final" / lora.ADAPTER_FILE), "pt") as f:
        recorded = json.loads(f.metadata()["base_model_fingerprint"])
    assert recorded == lora.base_fingerprint(glm.ChatGLM.from_pretrained(setup_dir.base))
    assert sorted(recorded) == sorted(lora.FINGERPRINTED)


def test_gloo_sft_p2_d2_last2_gives_the_single_process_losses(setup_dir, launched, single):
    ok(launched, "sft_p2d2_last2")
    assert_same_curve(losses(setup_dir.root / "sft_p2d2_last2"), losses(single["sft_p1_ga4_last2"]), range(1, 5))


def test_gloo_sft_p2_d2_packed_gives_the_single_process_losses(setup_dir, launched, single):
    ok(launched, "sft_p2d2_pack")
    assert_same_curve(losses(setup_dir.root / "sft_p2d2_pack"), losses(single["sft_p1_ga4_pack"]), range(1, 3))


def stage_logits(model_dir, counts, ids):
    """Logits of a model read stage by stage (each stage reads only its own tensors), chained by hand."""
    h, start = ids, 0
    for s, n in enumerate(counts):
        stage = glm.ChatGLM.from_pretrained(model_dir, layer_ids=range(start, start + n), first=s == 0,
                                            last=s == len(counts) - 1).eval()
        rope, attend = stage.inputs(ids)
        with torch.no_grad():
            h = stage.transformer(h, rope, attend)
        start += n
    with torch.no_grad():
        return stage.lm_head(h)


def test_gloo_p4_checkpoint_reads_back_with_p2_and_p1(setup_dir, launched, single):
    ok(launched, "sft_p4")
    root = setup_dir.root
    assert_same_curve(losses(root / "sft_p4"), losses(single["sft_p1"]), range(1, 4))
    final, ckpt = root / "sft_p4" / "final", newest_checkpoint(root / "sft_p4")
    assert len([f for f in os.listdir(final) if f.endswith(".safetensors")]) == 4  # one file per stage
    ids = pw.global_microbatches()[2]["input_ids"]
    with torch.no_grad():
        whole = glm.ChatGLM.from_pretrained(final).eval()(ids)
        ref = glm.ChatGLM.from_pretrained(single["sft_p1_3"] / "final").eval()(ids)
    for counts in ([2, 2], [1, 3], [1, 1, 1, 1]):
        torch.testing.assert_close(stage_logits(final, counts, ids), whole, atol=0, rtol=0)
    torch.testing.assert_close(stage_logits(ckpt, [2, 2], ids), whole, atol=0, rtol=0)  # the training checkpoint
    # and the weights are what one process trains in the same three steps
    torch.testing.assert_close(whole, ref, atol=1e-5, rtol=1e-5)


def test_gloo_p4_checkpoint_resumes_with_p2_d2_and_p1(setup_dir, launched, single):
    """The 3-step --pp 4 run continued to 6 steps under --pp 2 x 2 replicas and in one process: the
    resumed steps follow the uninterrupted single-process run."""
    ok(launched, "copy_p4")
    ok(launched, "sft_p4_to_p2d2")
    root = setup_dir.root
    shutil.copytree(root / "sft_p4", root / "sft_p4_to_p1")
    train_sft.main(sft_argv(setup_dir.base, setup_dir.train, root / "sft_p4_to_p1", "--resume"))
    want = losses(single["sft_p1"])
    for name in ("sft_p4_to_p2d2", "sft_p4_to_p1"):
        assert_same_curve(losses(root / name), want, range(1, 7))


def test_gloo_pp_that_does_not_divide_the_world_is_a_clear_error(setup_dir, launched):
    for rank, results in enumerate(launched.results):
        msg = results["pp3"]
        assert msg.startswith("ValueError: --pp 3 does not divide the world size 4"), msg
        assert "--pp 4" in msg.splitlines()[0]  # it says what to pass instead
    assert not os.path.exists(setup_dir.root / "pp3" / "metrics.jsonl")


# -----------------------------------------------------------------------------
# a bf16 stage: fp32 gradient accumulators and masters


def bf16_reference_grads(base, mbs, n):
    """({name: float64 gradient}, {name: float64 sum of |micro-batch gradient|}, loss): every
    micro-batch through the whole bf16 model by plain autograd (plain nn.Linear, so bf16 weight
    gradients), scaled by 1/n, one backward each, summed in float64."""
    model = glm.ChatGLM.from_pretrained(base, dtype=torch.bfloat16)
    want, size, loss = {}, {}, 0.0
    for mb in mbs:
        model.zero_grad()
        mb_loss = step_loss(model(mb["input_ids"]), mb["labels"], n)
        mb_loss.backward()
        loss += mb_loss.item()
        for k, p in model.named_parameters():
            want[k] = want.get(k, 0) + p.grad.double()
            size[k] = size.get(k, 0) + p.grad.double().abs()
    return want, size, loss


def bf16_stage(base):
    model = glm.ChatGLM.from_pretrained(base, dtype=torch.bfloat16)
    optim.select_trainable(model, "full")
    return model


def test_bf16_weights_train_through_fp32_masters(setup_dir, tmp_path):
    """A bf16 stage: micro-batch gradients sum in fp32 (main_grad), AdamW updates fp32 masters and
    the bf16 weights are their rounding; saved state carries the master, so a resume is exact."""
    d = dist.setup(1)
    mbs = pw.global_microbatches()
    n_tok = train_sft.count_label_tokens(mbs)
    lr, wd = 1e-3, 0.1
    want, size, want_loss = bf16_reference_grads(setup_dir.base, mbs, label_count(mbs))
    model = bf16_stage(setup_dir.base)
    opt = optim.AdamW(optim.named_trainables(model), lr, wd, d)
    loss = dist.train_step(model, d, mbs, train_sft.sft_loss(n_tok))
    assert abs(loss.item() - want_loss) < 1e-4 * want_loss
    assert {type(m) for m in model.modules() if isinstance(m, nn.Linear)} == {optim.MainGradLinear}
    named = dict(model.named_parameters())
    for k, p in named.items():
        assert p.grad is None and p.main_grad.dtype == torch.float32
        # the linears' weights (2-D, but the embedding) sum fp32 products, where autograd rounds each
        # micro-batch's gradient to bf16; the other tensors sum the same bf16 gradients in fp32
        fused = p.dim() == 2 and k != "transformer.word_embeddings.weight"
        tol = (2 ** -8 if fused else 1e-6) * size[k] + 1e-7
        assert ((p.main_grad.double() - want[k]).abs() <= tol).all(), k
    # reference update: torch's AdamW on float32 copies of the starting weights with those gradients
    start = {k: p.detach().float().clone().requires_grad_() for k, p in named.items()}
    ref_opt = torch.optim.AdamW([{"params": [t for t in start.values() if t.dim() >= 2], "weight_decay": wd},
                                 {"params": [t for t in start.values() if t.dim() < 2], "weight_decay": 0.0}],
                                lr=lr, betas=(0.9, 0.95))
    for k, t in start.items():
        t.grad = named[k].main_grad.clone()
    ref_opt.step()
    optim.optimizer_step(opt, loss, lr, 0.0, d, 0, 0)
    for k, p in named.items():
        torch.testing.assert_close(opt.masters[k], start[k].detach(), atol=1e-7, rtol=1e-6, msg=k)
        assert torch.equal(p.detach(), opt.masters[k].to(torch.bfloat16)), k
    assert (opt.masters["lm_head.weight"] != named["lm_head.weight"].float()).any()  # the master has more bits
    # the saved state brings the fp32 master back into a model built from the bf16 weights
    torch.save(opt.state_by_name(), tmp_path / "optim-stage000.pt")
    again = bf16_stage(setup_dir.base)
    with torch.no_grad():
        for k, p in again.named_parameters():
            p.copy_(named[k])
    opt2 = optim.AdamW(optim.named_trainables(again), lr, wd, d)
    opt2.load(str(tmp_path))
    for k in named:
        assert torch.equal(opt2.masters[k], opt.masters[k]), k
        moments = opt2.state[opt2.masters[k]]["exp_avg_sq"], opt.state[opt.masters[k]]["exp_avg_sq"]
        assert torch.equal(*moments), k


def test_linear_adds_its_weight_gradient_into_main_grad():
    """optim.MainGradLinear: same output and input/bias gradients as F.linear, and main_grad grows
    by exactly g^T x (checked in float64) on every backward."""
    torch.manual_seed(0)
    lin = optim.MainGradLinear(24, 40).bfloat16()
    start = None
    for _ in range(2):
        x = torch.randn(3, 5, 24, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(3, 5, 40, dtype=torch.bfloat16)
        y = lin(x)
        torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias), atol=0, rtol=0)
        y.backward(g)
        want = g.reshape(-1, 40).double().t() @ x.detach().reshape(-1, 24).double()
        if start is not None:
            want += start
        torch.testing.assert_close(lin.weight.main_grad.double(), want, atol=1e-5, rtol=1e-5)
        start = lin.weight.main_grad.double().clone()
        assert lin.weight.grad is None
        torch.testing.assert_close(x.grad, (g @ lin.weight.detach()), atol=0, rtol=0)
        torch.testing.assert_close(lin.bias.grad, g.reshape(-1, 40).sum(0), atol=1e-2, rtol=1e-2)
        lin.bias.grad = None


def test_fuse_weight_grads_converts_only_trained_low_precision_linears():
    """fuse_weight_grads swaps the class of trained bf16 nn.Linears (their tensors kept); frozen or
    fp32 ones stay plain."""
    model = nn.Sequential(nn.Linear(4, 4).bfloat16(), nn.Linear(4, 4).bfloat16(), nn.Linear(4, 4))
    model[1].weight.requires_grad_(False)
    weight = model[0].weight
    optim.fuse_weight_grads(model)
    assert [type(m) for m in model] == [optim.MainGradLinear, nn.Linear, nn.Linear]
    assert model[0].weight is weight
