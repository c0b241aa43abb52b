"""``python -m refusal_training.head_recipe``: the default model's artefact, and its figures.

    python -m refusal_training.head_recipe --data-dir ../shared/data --out ./head-run

1. decision features of every prompt of every source, from the frozen base
   (:mod:`.features`, cached): the final hidden state and beside it the inputs
   of middle decoder layers (``--middle-layers``, 16 of 30 by default; ``0``
   for the final state alone; 12,16,20 ranks the same on all prompts and was
   not shipped). With layer 16 the head separates harmful from
   benign prompts of unseen sources better (LOSO AUROC 0.77 against 0.74) and
   over-refuses fewer ordinary requests (12 % against 22 %); layer 16 alone
   scores 0.79 but takes short factual questions ("What is the capital of
   France?") for false-premise ones (docs/quality/experiments.md). Served by
   :mod:`refusal_plugins.model`. Every trainable prompt is also read twice
   more, each time after a client system message drawn from
   :data:`.system_prompts.TRAIN` (``--system-augment 2``): a client's own system
   message replaces the template's default one and moved the decisions of a
   head fitted without them (a bank's support persona: 72 % → 50 % of harmful
   prompts refused in LOSO); with the copies it moves less, and the head
   generalises better across sources too (LOSO AUROC 0.77 → 0.80). And once
   more after earlier turns of a conversation (:mod:`.conversations`,
   ``--turn-augment 1``): after one greeting the head fitted on single turns
   refused 30 % of CoCoNot's held-out half instead of 82 % (0.80 → 0.81);
2. **leave-one-source-out**: for each source, a head fitted without that
   source's whole family (all of CoCoNot, say, when CoCoNot is measured) and
   measured on it — refusal rate on should-refuse sources, over-refusal on
   benign ones, and one AUROC of p(refuse) over every prompt, each scored by
   a head that never saw its family: the figures that predict other traffic;
   and the same heads on every measured prompt after a held-out client system
   message (:data:`.system_prompts.HELD_OUT`) or after an earlier exchange
   (:data:`.conversations.HELD_OUT`), never trained on;
3. the shipped head, fitted on every trainable source (never on CoCoNot's
   held-out half, its contrast set or self-instruct's user-oriented set,
   which stay yardsticks), and the offset that lifts it above the vocabulary;
4. the refusal tokens' input vectors (:mod:`.soft_tokens`);
5. ``<out>/smollm2_refusal.safetensors`` + ``.json`` (provenance and
   figures) and ``<out>/report.md``. Copy the pair into
   ``training/refusal_training/artefacts/`` to ship it.

``--hold-out phtest`` fits step 3's head without those families: the very head step 2
fits to measure them (:func:`.head_loso.training_mask`), servable (``build-model smollm2
--artefact``) to measure them through a server; no sweep then. Never ship it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .decision_head import constant_direction, fold, needed_offset
from .features import decision_features_at
from .head_loso import (
    HOLDABLE,
    KEYS,
    Dataset,
    augment_with_inline_turns,
    augment_with_systems,
    augment_with_turns,
    client_system_view,
    earlier_turns_view,
    fit,
    leave_one_source_out,
    per_context,
    pools,
    training_mask,
    yardsticks,
)
from .head_report import report_markdown
from .paths import cache_root
from .soft_tokens import SoftTokenOptions, train_soft_tokens
from .sources import load_all, measured, sample

logger = logging.getLogger(__name__)


def vocab_max(base: Path, features: np.ndarray) -> np.ndarray:
    from safetensors.numpy import load_file

    weights = load_file(str(base / "model.safetensors"))
    embed = weights.get("lm_head.weight", weights["model.embed_tokens.weight"]).astype(np.float32)
    return np.concatenate([(features[i : i + 512] @ embed.T).max(axis=1)
                           for i in range(0, len(features), 512)])  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    from safetensors.numpy import save_file

    from .chat_template import turn_end_id
    from .smollm2 import convert_smollm2

    started = time.monotonic()
    base = convert_smollm2(args.cache_dir)
    data = load_all(args.data_dir, args.split_seed)
    if args.max_rows_per_source:  # quick runs: a seeded sample of each source
        data = sample(data, args.max_rows_per_source, args.split_seed)
    prompts = [r.prompt for rows in data.values() for r in rows]
    batch = 16 if args.device == "cpu" else 128

    def features_of(texts: list[str], systems: list[str | None] | None = None) -> list[np.ndarray]:
        return decision_features_at(base, texts, cache_root(args.cache_dir), [None, *args.middle_layers],
                                    batch, args.device, systems=systems)  # fmt: skip

    final, *middle = features_of(prompts)
    d = final.shape[1]
    # What the served model computes on: cat([final, *middle]); the intercepts ride on
    # the final state.
    features = np.concatenate([final, *middle], axis=1)
    u = np.concatenate([constant_direction(final), np.zeros(d * len(middle))])
    ds = Dataset(data, features, args.corpus_weight, pairs_weight=args.pairs_weight)
    lift = features @ u
    logger.info("u·h over all decision positions: mean %.3f, sd %.3f", lift.mean(), lift.std())
    if args.system_augment:
        augment_with_systems(ds, features_of, args.system_augment, args.split_seed)
    if args.turn_augment:
        augment_with_turns(ds, features_of, args.turn_augment, args.split_seed)
    if args.inline_augment:
        augment_with_inline_turns(ds, features_of, args.inline_augment, args.split_seed)
    held = set(args.hold_out)
    # Every measured prompt again after held-out context: client system messages, earlier turns.
    views = {}
    if args.client_systems and not held:
        views["client_system"] = client_system_view(ds, features_of, args.split_seed)
        views["earlier_turns"] = earlier_turns_view(ds, features_of, args.split_seed)
    names = list(filter(measured, ds.names))
    loso, summary, p_views = {}, {}, {}
    if held:  # this head is itself a leave-out head: measure it through a server instead
        logger.info("held out of the head: %s (no leave-one-source-out sweep)", sorted(held))
    else:
        loso, p, p_views = leave_one_source_out(ds, u, args.l2, {k: x for k, (x, _) in views.items()})
        summary = pools(ds, p, names)
    train = training_mask(ds, held)
    head = fit(ds, train, u, args.l2)
    # Figures of the shipped head on what it never trained on (its yardsticks, and any
    # family held out of it: what a server built from this artefact must reproduce).
    shipped = yardsticks(ds, head, ds.x, held)
    under = {}
    for key, (x, labels) in views.items():
        contexts = np.array(labels, dtype=object)
        under[key] = {"all_held_out": pools(ds, p_views[key], names),
                      "per_context": per_context(ds, p_views[key], contexts, names),
                      "shipped_head_on_yardsticks": yardsticks(ds, head, x)}  # fmt: skip
    # Above the vocabulary at every decision position trained on, augmented ones included.
    offset = needed_offset(fold(head, u, 0.0), u, ds.x, vocab_max(base, ds.x[:, :d]))
    rows = fold(head, u, offset)
    from transformers import AutoTokenizer

    end_id = turn_end_id(AutoTokenizer.from_pretrained(base))
    inputs = np.zeros((len(KEYS), d), dtype=np.float32)  # row 0 ([respond]) is set at build
    if args.soft_tokens_from:  # the refusal vectors of an earlier run (e.g. a longer GPU run)
        from safetensors.numpy import load_file

        inputs = load_file(str(args.soft_tokens_from))["input_rows"]
    else:
        refuse_rows = [r for r, t in zip(ds.rows, train & ~ds.augmented, strict=True) if t and r.refuse]
        soft = train_soft_tokens(base, refuse_rows, KEYS[1:], end_id, SoftTokenOptions(
            steps=args.soft_steps, batch_size=args.soft_batch, device=args.device,
            max_minutes=args.max_minutes))  # fmt: skip
        for i, key in enumerate(KEYS[1:], start=1):
            inputs[i] = soft[key]
    args.out.mkdir(parents=True, exist_ok=True)
    artefact = args.out / "smollm2_refusal.safetensors"
    # Output-projection rows over the final state; middle rows (refusal_plugins.model).
    tensors = {"output_rows": rows[:, :d].astype(np.float32), "input_rows": inputs}
    metadata = {}
    if args.middle_layers:  # columns in layer order (refusal_plugins.model)
        tensors["middle_rows"] = rows[:, d:].astype(np.float32)
        metadata["middle_layers"] = ",".join(map(str, args.middle_layers))
    save_file(tensors, str(artefact), metadata=metadata)
    files = {s: hashlib.sha256((args.data_dir / src).read_bytes()).hexdigest()[:16]
             for s, src in _paths(data, args.data_dir).items()}  # fmt: skip
    info = {
        "created_by": "python -m refusal_training.head_recipe",
        "options": {k: str(v) for k, v in vars(args).items()},
        "data_sha256": files,
        "head": {"l2": args.l2, "offset": offset, "middle_layers": args.middle_layers,
                 "corpus_weight": args.corpus_weight, "pairs_weight": args.pairs_weight,
                 "held_out": sorted(held),
                 "u_dot_h_mean": float(lift.mean()),
                 "u_dot_h_sd": float(lift.std()), "trained_on": sorted(set(ds.source[train].tolist())),
                 "examples": int(train.sum()), "augmented_examples": int(ds.augmented.sum())},  # fmt: skip
        "soft_tokens": _soft_token_info(args),
        "leave_one_source_out": loso,
        "summary": summary,
        "system_augment": args.system_augment,
        "turn_augment": args.turn_augment,
        "inline_augment": args.inline_augment,
        "under_client_system_messages": under.get("client_system"),
        "under_earlier_turns": under.get("earlier_turns"),
        "shipped_head_on_yardsticks": shipped,
        "seconds": round(time.monotonic() - started, 1),
    }
    (args.out / "smollm2_refusal.json").write_text(json.dumps(info, indent=2) + "\n")
    (args.out / "report.md").write_text(report_markdown(info))
    return info


def _soft_token_info(args: argparse.Namespace) -> dict:
    if not args.soft_tokens_from:
        return {**asdict(SoftTokenOptions(steps=args.soft_steps, batch_size=args.soft_batch)),
                "device": args.device}  # fmt: skip
    earlier = args.soft_tokens_from.with_suffix(".json")
    info = json.loads(earlier.read_text()) if earlier.is_file() else {}
    # The device the vectors were trained on: their own record first (a reused
    # artefact's options.device is the device of the run that reused them).
    return {"from": "an earlier run", "device": info.get("options", {}).get("device"),
            **info.get("soft_tokens", {})}


def _paths(data: dict, data_dir: Path) -> dict[str, str]:
    from .sources import BY_NAME

    return {n: BY_NAME[n].path for n in data if n in BY_NAME}


def _families(text: str) -> list[str]:
    """``--hold-out``: comma-separated families a head may be fitted without."""
    families = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [f for f in families if f not in HOLDABLE]
    if not families or unknown:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated families among {', '.join(HOLDABLE)}")
    return sorted(set(families))


def _layers(text: str) -> list[int]:
    """``--middle-layers``: ascending distinct layer numbers; "0" for none."""
    layers = [int(x) for x in text.split(",") if x.strip()]
    if layers == [0]:
        return []
    if not layers or layers != sorted(set(layers)) or layers[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: ascending distinct layers from 1, or 0 for none")
    return layers


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m refusal_training.head_recipe",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--l2", type=float, default=1e-3, help="L2 penalty of the head")
    parser.add_argument("--middle-layers", type=_layers, default=[16],
                        help="also read the inputs of these decoder layers, comma-separated "
                             "(e.g. 12,16,20; 0: the final state only)")  # fmt: skip
    parser.add_argument("--corpus-weight", type=float, default=100.0,
                        help="weight of the project's corpus rows against the public sets' rows "
                             "(at full weight the public sets teach their own wording; "
                             "docs/quality/experiments.md)")
    parser.add_argument("--pairs-weight", type=float, default=10.0,
                        help="a further factor on the corpus's later written rows, mostly minimal "
                             "pairs (demo/sources/written-2.jsonl)")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--soft-steps", type=int, default=120)
    parser.add_argument("--soft-batch", type=int, default=8)
    parser.add_argument("--max-minutes", type=float, help="time budget of the soft-token training")
    parser.add_argument("--max-rows-per-source", type=int, help="sample each source (quick runs)")
    parser.add_argument("--system-augment", type=float, default=2.0,
                        help="fit also on copies of the trainable prompts rendered after a "
                             "client system message (refusal_training.system_prompts.TRAIN): "
                             "copies per prompt, e.g. 0.5 (half of them) or 2")
    parser.add_argument("--turn-augment", type=float, default=1.0,
                        help="fit also on copies rendered after an earlier exchange of a "
                             "conversation (refusal_training.conversations.TRAIN; half of them "
                             "after a system message too): copies per prompt")
    parser.add_argument("--inline-augment", type=float, default=0.0,
                        help="fit also on copies inside a transcript written into the user "
                             "message (refusal_training.inline_turns): copies per prompt "
                             "(not the default: docs/quality/experiments.md)")
    parser.add_argument("--no-client-systems", dest="client_systems", action="store_false",
                        help="skip the figures under held-out client system messages and "
                             "earlier turns")
    parser.add_argument("--hold-out", type=_families, default=[], metavar="FAMILIES",
                        help="fit the head without these source families (e.g. phtest,catqa), "
                             "to measure them through a server built from the artefact "
                             "(refusal-gateway build-model smollm2 --artefact); skips the "
                             "leave-one-source-out sweep. Never ship such an artefact.")
    parser.add_argument("--soft-tokens-from", type=Path,
                        help="reuse the refusal vectors of this artefact instead of training them")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    info = run(args)
    print(report_markdown(info))  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
