"""Tiny random-weight models built locally — no model hub — for tests, demos and benchmarks.

``build_text_model`` makes a Qwen2-style causal LM (head_dim 64, the minimum vLLM's CPU
attention handles well) with a BPE tokenizer trained here with ``tokenizers``.
``build_vl_model`` makes a tiny Qwen2-VL for encoder / multimodal-cache tests, and
``build_moe_model`` a tiny Qwen3-MoE (fused experts in memory, per-expert on disk).
All are cached by directory: a second call with the same arguments returns at once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "weights move from the trainer to the engine and the engine serves them",
    "reward rises when the policy learns to say yes",
    "one two three four five six seven eight nine ten",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) [ ] { } < > . , ; : ! ? ' \"",
    "hello world, this is a tiny model for testing weight synchronisation",
    "yes no maybe true false up down left right",
]

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|image_pad|>", "<|video_pad|>"]


def _train_tokenizer(out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", bos_token=None)
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}"
        "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fast.save_pretrained(out)


def _done(out: Path, key: dict) -> bool:
    marker = out / ".weightsync-tiny.json"
    return marker.exists() and json.loads(marker.read_text()) == key


def _mark(out: Path, key: dict) -> None:
    (out / ".weightsync-tiny.json").write_text(json.dumps(key))


def build_text_model(out: str | os.PathLike, *, hidden: int = 128, layers: int = 2,
                     heads: int = 2, kv_heads: int = 1, vocab_size: int = 512,
                     intermediate: int = 256, tie_word_embeddings: bool = False,
                     dtype: str = "float32", seed: int = 0, device: str = "cpu") -> Path:
    """A Qwen2-style causal LM with random weights, saved as safetensors + tokenizer.

    The model is built directly in ``dtype`` on ``device`` (``"cuda"`` builds 7B-sized
    models in seconds instead of minutes); the weights do not depend on the device's RNG
    being the CPU's, only on ``seed``.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(out)
    key = dict(kind="qwen2", hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
               vocab=vocab_size, inter=intermediate, tie=tie_word_embeddings, dtype=dtype, seed=seed)
    if _done(out, key):
        return out
    out.mkdir(parents=True, exist_ok=True)
    _train_tokenizer(out, vocab_size)
    from transformers import AutoTokenizer

    n_vocab = len(AutoTokenizer.from_pretrained(out))
    cfg = Qwen2Config(
        vocab_size=max(vocab_size, n_vocab), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
        intermediate_size=intermediate, max_position_embeddings=2048,
        tie_word_embeddings=tie_word_embeddings, torch_dtype=dtype,
        eos_token_id=0, pad_token_id=0, bos_token_id=None,
    )
    torch.manual_seed(seed)
    return _init_and_save(_build_on(Qwen2ForCausalLM, cfg, dtype, device), out, key, seed, device)


def build_vl_model(out: str | os.PathLike, *, hidden: int = 128, layers: int = 2,
                   vocab_size: int = 512, dtype: str = "float32", seed: int = 0) -> Path:
    """A tiny Qwen2-VL (vision tower + text model) with random weights and a processor."""
    import torch
    from transformers import (
        AutoTokenizer,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
    )

    out = Path(out)
    key = dict(kind="qwen2vl", hidden=hidden, layers=layers, vocab=vocab_size, dtype=dtype, seed=seed)
    if _done(out, key):
        return out
    out.mkdir(parents=True, exist_ok=True)
    _train_tokenizer(out, vocab_size)
    tok = AutoTokenizer.from_pretrained(out)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    text = dict(vocab_size=max(vocab_size, len(tok)), hidden_size=hidden,
                num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=2 * hidden, max_position_embeddings=4096,
                rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]},
                tie_word_embeddings=False, torch_dtype=dtype)
    vision = dict(depth=1, embed_dim=64, hidden_size=hidden, num_heads=1, mlp_ratio=2,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_chans=3)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, **text,
                        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                        vision_start_token_id=ids["<|vision_start|>"],
                        vision_end_token_id=ids["<|vision_end|>"], eos_token_id=0, pad_token_id=0)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg).to(getattr(torch, dtype))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(out, safe_serialization=True)
    # transformers 5 requires every sub-processor (None is rejected); vLLM loads them all.
    from transformers import Qwen2VLVideoProcessor

    pixels = dict(min_pixels=56 * 56, max_pixels=112 * 112)
    proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tok,
                            video_processor=Qwen2VLVideoProcessor(**pixels),
                            chat_template=tok.chat_template)
    proc.save_pretrained(out)
    _mark(out, key)
    return out


def build_moe_model(out: str | os.PathLike, *, hidden: int = 128, layers: int = 2,
                    experts: int = 8, top_k: int = 2, moe_intermediate: int = 64,
                    heads: int = 2, kv_heads: int = 1, head_dim: int | None = None,
                    vocab_size: int = 512, dtype: str = "float32", seed: int = 0,
                    device: str = "cpu") -> Path:
    """A Qwen3-MoE with random weights (tiny by default). transformers 5 holds its experts
    fused in memory (``mlp.experts.gate_up_proj``, 3-D) and saves them per expert
    (``mlp.experts.0.gate_proj.weight``): the checkpoint has the per-expert names vLLM loads.

    ``head_dim`` defaults to ``hidden // heads``. ``device="cuda"`` builds directly there in
    ``dtype`` (a 5 GB Qwen3-30B-A3B-shaped slice in seconds); its weights come from the CUDA
    generator, so they differ from a CPU build with the same seed.
    """
    import torch
    from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

    out = Path(out)
    head_dim = head_dim or hidden // heads
    key = dict(kind="qwen3moe", hidden=hidden, layers=layers, experts=experts, top_k=top_k,
               inter=moe_intermediate, vocab=vocab_size, dtype=dtype, seed=seed)
    # only what differs from the tiny defaults joins the key: models built before stay cached
    extra = dict(heads=heads, kv_heads=kv_heads, head_dim=head_dim, device=device)
    tiny = dict(heads=2, kv_heads=1, head_dim=hidden // 2, device="cpu")
    key.update({k: v for k, v in extra.items() if v != tiny[k]})
    if _done(out, key):
        return out
    out.mkdir(parents=True, exist_ok=True)
    _train_tokenizer(out, vocab_size)
    cfg = Qwen3MoeConfig(
        vocab_size=max(vocab_size, len(AutoTokenizer.from_pretrained(out))), hidden_size=hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, intermediate_size=2 * hidden, moe_intermediate_size=moe_intermediate,
        num_experts=experts, num_experts_per_tok=top_k, decoder_sparse_step=1,
        norm_topk_prob=True, max_position_embeddings=2048, tie_word_embeddings=False,
        torch_dtype=dtype, eos_token_id=0, pad_token_id=0, bos_token_id=None)
    torch.manual_seed(seed)
    if device == "cpu":  # as the tiny models were always built: their weights stay the same
        model = Qwen3MoeForCausalLM(cfg).to(getattr(torch, dtype))
    else:
        model = _build_on(Qwen3MoeForCausalLM, cfg, dtype, device)
    return _init_and_save(model, out, key, seed, device)


def build_mla_model(out: str | os.PathLike, *, hidden: int = 256, layers: int = 2,
                    heads: int = 4, experts: int = 8, top_k: int = 2, moe_intermediate: int = 128,
                    kv_lora_rank: int = 512, vocab_size: int = 512, dtype: str = "bfloat16",
                    seed: int = 0, device: str = "cpu") -> Path:
    """A DeepSeek-V2-Lite-shaped model with random weights: multi-head latent attention (no
    q LoRA, ``kv_lora_rank`` latent, 128 + 64 query/key head dims, 128 value dims, the dims
    vLLM's MLA kernels take), its first layer dense, the others one shared expert plus
    ``experts`` routed ones. vLLM absorbs the attention's ``kv_b_proj`` into derived weights
    after loading (``process_weights_after_loading``): the state a reload must rebuild."""
    import torch
    from transformers import AutoTokenizer, DeepseekV2Config, DeepseekV2ForCausalLM

    out = Path(out)
    key = dict(kind="deepseek_v2", hidden=hidden, layers=layers, heads=heads, experts=experts,
               top_k=top_k, inter=moe_intermediate, kv_lora=kv_lora_rank, vocab=vocab_size,
               dtype=dtype, seed=seed, device=device, groups=1)
    if _done(out, key):
        return out
    out.mkdir(parents=True, exist_ok=True)
    _train_tokenizer(out, vocab_size)
    cfg = DeepseekV2Config(
        vocab_size=max(vocab_size, len(AutoTokenizer.from_pretrained(out))), hidden_size=hidden,
        intermediate_size=4 * hidden, moe_intermediate_size=moe_intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        q_lora_rank=None, kv_lora_rank=kv_lora_rank, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, head_dim=64, n_shared_experts=1, n_routed_experts=experts,
        num_experts_per_tok=top_k, first_k_dense_replace=1, topk_method="greedy",
        n_group=1, topk_group=1,  # vLLM's DeepSeek-V2 routes by groups: one group of all
        norm_topk_prob=False, routed_scaling_factor=1.0, max_position_embeddings=2048,
        tie_word_embeddings=False, torch_dtype=dtype, eos_token_id=0, pad_token_id=0,
        bos_token_id=None)
    torch.manual_seed(seed)
    return _init_and_save(_build_on(DeepseekV2ForCausalLM, cfg, dtype, device), out, key, seed,
                          device)


def _build_on(cls, cfg, dtype: str, device: str):
    """``cls(cfg)`` made directly on ``device`` in ``dtype`` (no fp32 copy on the CPU first)."""
    import torch

    prev = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            return cls(cfg)
    finally:
        torch.set_default_dtype(prev)


def _init_and_save(model, out, key: str, seed: int, device: str):
    """Seeded weights larger than the default init (so greedy output depends on them), saved as
    safetensors and marked as built from ``key``."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08, generator=g)
    model.save_pretrained(out, safe_serialization=True)
    _mark(out, key)
    return out


def peft_lora(model_dir: str | os.PathLike, seed: int, r: int = 8) -> Any:
    """A peft LoRA (rank ``r``, alpha 16) on every linear layer of the model in ``model_dir``,
    B drawn from ``seed`` (peft starts it at 0, which would change nothing)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=16, target_modules="all-linear",
                                            lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model
