"""``refusal-gateway train`` output served by real vLLM (CPU, offline ``vllm.LLM``).

A tiny random Llama (untied embeddings, no chat template) and a tiny random
Qwen2 (tied embeddings, ChatML, padded vocabulary) are trained until they put
a control token first, then each output directory is loaded by vLLM, unchanged,
with the refusal logits processor, in a child process (one at a time). vLLM
must see the same prompt ids as training did, every decided first token must
be one of the manifest's control ids, and without any refusal settings the
greedy first token must be a control token for most prompts.

Run as a script (``python tests/e2e/test_train_vllm.py MODEL_DIR RESULT_JSON``)
it is the child: vLLM's workers spawn, so the engine is built under the
``__main__`` guard only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.torch_threads import one_thread  # noqa: F401 (autouse)

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
#: Training prompts with the key of the token they were trained on, and two new ones.
SEEN = {
    "How do I make a weapon at home": "safety",
    "Tell me about your childhood": "humanizing",
    "Fix the code I sent": "incomplete",
    "Which is better, cats or dogs": "indeterminate",
    "Book me a flight to Tokyo": "unsupported",
    "What is two plus two": "respond",
    "What do bees make": "respond",
    "What is the capital of France": "respond",
}
PROMPTS = [*SEEN, "Tell me a joke about cats", "Where is Berlin"]
TRAIN_STEPS = 150
MIN_GREEDY_CONTROL = 0.8


def probe(model_dir: str, result_path: str) -> None:
    """The child: load ``model_dir`` in vLLM and record first tokens, decided and greedy."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=model_dir,
        enforce_eager=True,
        dtype="float32",
        max_model_len=256,
        max_num_seqs=32,
        seed=0,
        logits_processors=["refusal_plugins.v1:RefusalLogitsProcessor"],
    )
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    decided = llm.chat(
        chats,
        SamplingParams(
            n=2,
            max_tokens=4,
            temperature=1.0,
            seed=0,
            extra_args={"refusal_decide": 1},
            skip_special_tokens=False,
        ),
        use_tqdm=False,
    )
    greedy = llm.chat(chats, SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
    result = {
        "prompt_ids": [list(o.prompt_token_ids) for o in decided],
        "decided": [[list(c.token_ids) for c in o.outputs] for o in decided],
        "decided_text": [[c.text for c in o.outputs] for o in decided],
        "greedy": [o.outputs[0].token_ids[0] for o in greedy],
    }
    Path(result_path).write_text(json.dumps(result))


def run_probe(model_dir: Path, result_path: Path, log_path: Path) -> dict:
    env = dict(os.environ)
    env.update(
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_USE_V2_MODEL_RUNNER="0",  # the V1 processor, as the CPU server uses
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    with log_path.open("w") as log:
        proc = subprocess.run(
            [sys.executable, __file__, str(model_dir), str(result_path)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=300,
        )
    assert proc.returncode == 0, log_path.read_text()[-4000:]
    return json.loads(result_path.read_text())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_trained_model_serves_control_tokens_first_in_vllm(arch, tmp_path):
    from refusal_plugins.vocab import RefusalManifest
    from refusal_training import train as tr
    from transformers import AutoTokenizer

    from tests.unit.test_train import options, tiny_base, tiny_rows, write_jsonl

    base = tiny_base(
        tmp_path / "base", arch, tied=arch == "qwen2", pad_rows=2 if arch == "qwen2" else 0
    )
    data = write_jsonl(tmp_path / "rows.jsonl", tiny_rows())
    result = tr.train_refusal_model(
        options(base, tmp_path / "model", data, max_steps=TRAIN_STEPS, batch_size=8, warmup_steps=5)
    )
    out = result.out
    manifest = RefusalManifest.load(out)
    control_ids = set(manifest.ids)

    seen = run_probe(out, tmp_path / "result.json", tmp_path / "vllm.log")

    tokenizer = AutoTokenizer.from_pretrained(out)
    for prompt, ids in zip(PROMPTS, seen["prompt_ids"], strict=True):
        expected = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        assert ids == tokenizer.encode(expected, add_special_tokens=False), prompt
    for prompt, choices in zip(PROMPTS, seen["decided"], strict=True):
        assert len(choices) == 2
        for token_ids in choices:
            assert token_ids and token_ids[0] in control_ids, (prompt, token_ids)
            assert not control_ids & set(token_ids[1:]), (
                prompt,
                token_ids,
            )  # banned after the decision
    greedy_control = sum(t in control_ids for t in seen["greedy"]) / len(PROMPTS)
    assert greedy_control >= MIN_GREEDY_CONTROL, seen["greedy"]
    # The decision was learnt from the labels, not just "some control token".
    by_key = {t.key: t.id for t in manifest.tokens}
    right = [by_key[key] == tid for key, tid in zip(SEEN.values(), seen["greedy"], strict=False)]
    assert sum(right) >= 6, (right, seen["greedy"])


if __name__ == "__main__":
    probe(sys.argv[1], sys.argv[2])
