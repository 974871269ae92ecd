"""Tiny real models for tests: a random-init Llama with a small byte-level BPE tokenizer.

Built in seconds from nothing on disk (no hub): the tokenizer is trained with the
``tokenizers`` library on a few sentences of the demo domain, the model is a 2-layer
Llama with hidden size 64 and tied embeddings (like SmolLM2).
"""

from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CORPUS = [
    "Pump P-101 discharge pressure low alarm, motor current normal.",
    "Category: mechanical\nAction: Inspect the pump bearings and coupling for wear.",
    "Category: electrical\nAction: Check the motor starter contacts and supply voltage.",
    "Hydraulic unit HPU-3 oil temperature high, 78 degrees C, cooler fan running.",
    "PLC rack 2 lost Profinet communication with remote I/O station 7 at 14:32.",
    "Flow transmitter FT-204 reading drifts by 3.5% against the reference meter.",
    "Compressor C-12 tripped on high vibration, 11.2 mm/s on the drive-end bearing.",
    "Thermal: heat exchanger E-5 outlet 95°C, expected 80°C; fouling suspected.",
    "Über-Temperatur am Schaltschrank 3 — Lüfter prüfen! 1234567890 x² ñ 日本語",
    "instrumentation network thermal hydraulic_pneumatic mechanical electrical",
]


def build_tokenizer(out_dir: Path, vocab_size: int = 400) -> None:
    """Train and save a byte-level BPE tokenizer with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>", pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out_dir)


def build_tiny_llama(out_dir: Path, *, layers: int = 2, hidden: int = 64, seed: int = 0,
                     tie: bool = True) -> Path:
    """Save a random-init LlamaForCausalLM + tokenizer (safetensors) into ``out_dir``."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out_dir)
    tok = AutoTokenizer.from_pretrained(out_dir)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=tie, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Random init at std 0.02 gives near-uniform logits; widen them so greedy
    # decoding and top-1 comparisons are meaningful.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
    model.save_pretrained(out_dir, safe_serialization=True)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id).save_pretrained(out_dir)
    return out_dir


def teach_tiny(model_dir: Path, pairs: list[tuple[str, str]], *, steps: int = 150, lr: float = 3e-3,
               seed: int = 0, system: str | None = None) -> Path:
    """Supervised-fine-tune a tiny model in place until it answers ``pairs`` (user → answer; after
    ``system`` as the system turn when given).

    A random-init teacher answers nothing in the task format, so every teacher answer would
    be filtered out; a few seconds of SFT make it a competent (memorising) tiny teacher.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    batch_ids, batch_labels = [], []
    for user, answer in pairs:
        turns = [{"role": "system", "content": system}] if system is not None else []
        prompt = tok.apply_chat_template([*turns, {"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        batch_ids.append(p_ids + a_ids)
        batch_labels.append([-100] * len(p_ids) + a_ids)
    width = max(len(x) for x in batch_ids)
    ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in batch_ids])
    labels = torch.tensor([y + [-100] * (width - len(y)) for y in batch_labels])
    mask = (torch.arange(width)[None, :] < torch.tensor([len(x) for x in batch_ids])[:, None]).long()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(model_dir, safe_serialization=True)
    return model_dir
