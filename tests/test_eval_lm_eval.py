"""lm-evaluation-harness, offline, on local JSONL tasks (multiple choice, rolling
log-likelihood, generation) through `megapeer eval`, in one process and on two
data-parallel ranks; each score equals a direct computation with the model's forward
(no adapter code involved)."""
import json
import math
import textwrap

import pytest
import torch
from conftest import torchrun
from workers.hf_fixtures import export_tiny
from workers.hf_fixtures import one_thread  # noqa: F401 (autouse fixture)

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'megapeer[eval]', "
                                      "lm-eval==0.4.13)")

MAX_LEN = 16
CHOICE = [("def forward(self, x):", ["return x", "import os", "the fox"]),
          ("The quick brown", ["fox", "dog", "self"]),
          ("import", [" os", " sys", "ant"]),
          ("x = 1 +", ["1", "2", " y"])]
ROLLING = ["The quick brown fox jumps over the lazy dog. The quick brown fox jumps again.",
           "import os\nimport sys\nprint(os.getcwd())", "short"]
# the third prompt is longer than MAX_LEN - GEN_TOKS tokens: lm-eval cuts it on the left
PROMPTS = ["def f(x):", "import", "The quick brown fox jumps", "class A"]
GEN_TOKS = 8        # max_gen_toks of mp_gen


@torch.no_grad()
def logprob(model, context, continuation):
    """Sum log p(continuation | context) from one forward over the concatenation."""
    ids = torch.tensor([context + continuation])
    logp = torch.log_softmax(model(ids[:, :-1]).logits[0].double(), -1)
    n = len(continuation)
    return float(logp[-n:].gather(1, torch.tensor(continuation)[:, None]).sum())


@torch.no_grad()
def rolling_logprob(model, tokens, prefix):
    """Chunks of MAX_LEN targets, each read with a full window of MAX_LEN inputs."""
    seq, total = [prefix] + tokens, 0.0
    for c in range(0, len(tokens), MAX_LEN):
        e = min(c + MAX_LEN, len(tokens))
        inp = torch.tensor([seq[max(0, e - MAX_LEN):e]])
        logp = torch.log_softmax(model(inp).logits[0].double(), -1)[-(e - c):]
        total += float(logp.gather(1, torch.tensor(tokens[c:e])[:, None]).sum())
    return total


@torch.no_grad()
def greedy(model, tok, prompt, max_new=GEN_TOKS):
    """generate_until under --max-length MAX_LEN, computed directly (full recompute, no
    cache): as lm-eval's HFLM does, the prompt keeps its last MAX_LEN - max_new tokens so
    that prompt and continuation fit the window; argmax until end-of-document or a newline."""
    ids, new = tok.encode(prompt)[-(MAX_LEN - max_new):], []
    for _ in range(max_new):
        nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
        if nxt == tok.eod:
            break
        new.append(nxt)
        if "\n" in tok.decode(new):
            break
    return tok.decode(new).split("\n")[0]


def _task(d, name, rows, body):
    data = d / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / f"{name}.yaml").write_text(textwrap.dedent(f"""\
        task: {name}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        """) + textwrap.dedent(body))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, world1):
    """An exported tiny model, three local tasks and their directly computed scores."""
    from megapeer.convert import load_model
    d = tmp_path_factory.mktemp("lm_eval")
    export_tiny(d, seed=5)
    model, tok = load_model(str(d / "hf"))

    # multiple choice: answers alternate between the model's best and worst choice
    rows, correct = [], 0
    for i, (q, choices) in enumerate(CHOICE):
        ctx = tok.encode(q)
        scores = [logprob(model, ctx, tok.encode(q + " " + c)[len(ctx):]) for c in choices]
        best = max(range(3), key=scores.__getitem__)
        answer = best if i % 2 == 0 else min(range(3), key=scores.__getitem__)
        correct += answer == best
        rows.append({"question": q, "choices": choices, "answer": answer})
    tasks = d / "tasks"
    tasks.mkdir()
    _task(tasks, "mp_choice", rows, """\
        output_type: multiple_choice
        doc_to_text: "{{question}}"
        doc_to_choice: "{{choices}}"
        doc_to_target: "{{answer}}"
        metric_list:
          - metric: acc
        """)
    nll = -sum(rolling_logprob(model, tok.encode(t), tok.eod) for t in ROLLING)
    _task(tasks, "mp_rolling", [{"text": t} for t in ROLLING], """\
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{text}}"
        metric_list:
          - metric: bits_per_byte
        """)
    outs = [greedy(model, tok, p) for p in PROMPTS]
    targets = [o if i % 2 == 0 else o + "#" for i, o in enumerate(outs)]
    _task(tasks, "mp_gen", [{"prompt": p, "target": t} for p, t in zip(PROMPTS, targets)], """\
        output_type: generate_until
        doc_to_text: "{{prompt}}"
        doc_to_target: "{{target}}"
        generation_kwargs:
          until: ["\\n"]
          max_gen_toks: %d
        metric_list:
          - metric: exact_match
        """ % GEN_TOKS)
    assert 0 < correct < len(CHOICE)
    assert max(len(tok.encode(p)) for p in PROMPTS) > MAX_LEN - GEN_TOKS   # cut exercised
    nbytes = sum(len(t.encode("utf-8")) for t in ROLLING)
    return {"dir": d, "args": ["--model", str(d / "hf"), "--tasks", "mp_choice,mp_rolling,mp_gen",
                               "--include-path", str(tasks), "--no-default-tasks",
                               "--max-length", str(MAX_LEN), "--bootstrap-iters", "0"],
            "acc": correct / len(CHOICE), "bpb": nll / nbytes / math.log(2), "em": 0.5}


def _check(setup, out):
    res = json.loads(out.read_text())["lm_eval"]["results"]
    assert res["mp_choice"]["acc,none"] == pytest.approx(setup["acc"])
    assert res["mp_rolling"]["bits_per_byte,none"] == pytest.approx(setup["bpb"], rel=1e-6)
    assert res["mp_gen"]["exact_match,none"] == pytest.approx(setup["em"])


def test_lm_eval_scores_match_direct_computation(setup, monkeypatch):
    from megapeer.eval.cli import main
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = setup["dir"] / "res.json"
    main(setup["args"] + ["--output", str(out)])
    _check(setup, out)


@pytest.mark.timeout(300)
def test_data_parallel_ranks_give_the_same_scores(setup):
    """Two ranks (torchrun, gloo) split the documents and lm-eval gathers the results;
    the model is read from the megapeer checkpoint this time."""
    out = setup["dir"] / "res_dp.json"
    args = ["--model", str(setup["dir"] / "ckpt")] + setup["args"][2:]
    torchrun("hf_eval_cli.py", args + ["--output", str(out)], 2,
             env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    _check(setup, out)
