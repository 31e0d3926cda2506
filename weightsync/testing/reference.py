"""HF transformers references: what a model with given weights should generate."""

from __future__ import annotations

from pathlib import Path

import torch


def load_trainer_model(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """The 'trainer' policy: the HF model from ``model_dir`` (random tiny weights)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


def perturb_(model: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    """Stand-in for an optimizer step: add seeded noise to every weight, in place."""
    gens: dict[torch.device, torch.Generator] = {}  # one per device: noise made where p lives
    with torch.no_grad():
        for p in model.parameters():
            g = gens.get(p.device)
            if g is None:
                g = gens[p.device] = torch.Generator(device=p.device).manual_seed(seed)
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32,
                               device=p.device).to(p.dtype) * scale)


@torch.no_grad()
def greedy(model, tokenizer, prompts: list[str], max_tokens: int) -> list[tuple[list[int], list[float]]]:
    """Greedy continuation token ids and their logprobs, one prompt at a time (no padding)."""
    out = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt).input_ids], device=model.device)
        gen = model.generate(ids, max_new_tokens=max_tokens, do_sample=False,
                             output_scores=True, return_dict_in_generate=True,
                             eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
        toks = gen.sequences[0, ids.shape[1]:].tolist()
        lps = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(gen.scores, toks)]
        out.append((toks, lps))
    return out


def scored(model, tokenizer, prompt: str, tokens: list[int]) -> list[float]:
    """The logprob ``model`` gives each of ``tokens`` after ``prompt`` (teacher forcing): an
    engine's own continuation scored by HF, so near-tied argmaxes cannot fail a comparison."""
    ids = tokenizer(prompt).input_ids
    seq = torch.tensor([ids + list(tokens)], device=model.device)
    with torch.no_grad():
        logits = model(seq).logits[0, len(ids) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(1, seq[0, len(ids):, None])[:, 0].tolist()
