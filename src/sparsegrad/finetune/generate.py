"""The ``generate`` command: greedy answers of a causal LM (the base, or base + a finetune adapter)."""

from __future__ import annotations

from typing import Any, Callable

from .errors import UsageError
from .distributed import DistContext
from .lm import (
    LM_TASKS,
    MODEL_KIND,
    _ids,
    chat_prompt,
    evaluate_loss,
    generate_answers,
    load_lm_data,
    load_lm_model,
    pad_token_id,
    score_generation,
)
from .outputs import load_finetuned
from .precision import pick_device


def run_generate(*, model: str | None = None, adapter: str | None = None, prompt: str | None = None,
                 task: str | None = None, num_examples: int = 2, max_new_tokens: int | None = None,
                 max_length: int | None = None, seed: int = 0, dtype: str | None = None,
                 write: Callable[[str], Any] = print, device: str = "auto") -> dict[str, Any]:
    """Greedy answers of a causal LM (the base, or base + a finetune adapter): to ``prompt`` in the chat template,
    or to ``num_examples`` held-out examples of ``task`` (with the reference, exact match and held-out loss on
    them), on ``device`` (auto: the GPU when there is one). Returns what it printed as a dict."""
    info: dict[str, Any] = {}
    if adapter is not None:
        net, tokenizer, info = load_finetuned(adapter, model, merge=True)
        if info.get("model_kind") != MODEL_KIND:
            raise UsageError(f"{adapter} is a classifier adapter; generate needs a causal-LM adapter")
        label = f"{info['model']} + {info['method']} adapter {adapter}"
    else:
        net, tokenizer = load_lm_model(model, dtype or "float32")
        label = f"{model or 'smollm2'} (no adapter)"
    on = pick_device(device, DistContext())
    if on.type != "cpu":
        net.to(on)
    net.eval()
    net.config.use_cache = True
    result: dict[str, Any] = {"model": label, "outputs": []}
    if prompt is not None:
        ids = _ids(tokenizer, chat_prompt(tokenizer, prompt))
        text = generate_answers(net, tokenizer, [ids], max_new_tokens=max_new_tokens or 32)[0]
        write(f"[{label}]\nprompt: {prompt}\nanswer: {text}")
        result["outputs"].append({"prompt": prompt, "generated": text})
        return result
    task = task or info.get("task")
    if task not in LM_TASKS:
        raise UsageError(f"give --prompt or --task ({', '.join(LM_TASKS)})")
    length = max_length or info.get("max_length") or 256
    try:
        data = load_lm_data(tokenizer, task=task, max_length=length, seed=seed, max_train=1, max_eval=num_examples)
    except (ValueError, OSError, ModuleNotFoundError) as exc:
        raise UsageError(str(exc)) from None
    pad = pad_token_id(tokenizer)
    loss = evaluate_loss(net, data.eval, pad)
    write(f"[{label}] {task}: {len(data.eval)} held-out examples (split seed {seed}, max length {length})")
    if data.kind == "chat":
        rate, records = score_generation(net, tokenizer, data.eval, max_new_tokens=max_new_tokens)
        for i, r in enumerate(records, 1):
            body = r["prompt_start"].replace("\n", " ")
            write(f"--- {i}. article: {body[:120]}...\n    reference: {r['reference']}\n"
                  f"    generated: {r['generated']!r} ({'match' if r['match'] else 'no match'})")
        write(f"exact match {sum(r['match'] for r in records)}/{len(records)} = {rate:.3f}; held-out loss on the "
              f"answer tokens {loss['eval_loss']:.4f}")
        result.update(exact_match=rate, outputs=records)
    else:
        n_new = max_new_tokens or 32
        conts = generate_answers(net, tokenizer, [e.prompt_ids for e in data.eval], max_new_tokens=n_new)
        for i, (e, c) in enumerate(zip(data.eval, conts), 1):
            head = tokenizer.decode(e.prompt_ids)
            ref = tokenizer.decode(e.input_ids[len(e.prompt_ids):])
            write(f"--- {i}. passage ends: ...{head[-160:]!r}\n    reference continues: {ref[:160]!r}\n"
                  f"    generated: {c[:200]!r}")
            result["outputs"].append({"passage_end": head[-160:], "reference": ref[:160], "generated": c})
        write(f"held-out perplexity on these {len(data.eval)} chunks: {loss['eval_perplexity']:.3f} "
              f"(loss {loss['eval_loss']:.4f})")
    result.update(eval_loss=loss["eval_loss"], eval_perplexity=loss["eval_perplexity"])
    return result

