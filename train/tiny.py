"""Tiny models made here, not downloaded: a BPE tokenizer trained on a corpus and a small Llama.

Tests and the demo save them with `save_pretrained` and load them back through the same
`AutoTokenizer` / `AutoModelForCausalLM` paths a user's model takes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ChatLayout:
    """A model family's chat layout as a tokenizer ships it: template, BOS/EOS and the special
    tokens its turns are marked with."""

    template: str
    bos: str | None  # None: the family has no BOS token (Qwen)
    eos: str
    specials: tuple[str, ...]  # turn markers etc., special tokens beside BOS/EOS/pad/unk
    added: tuple[str, ...] = ()  # added tokens that are not special (Qwen's <think>)


# ChatML: the template many open chat models ship; `<|im_end|>` closes every turn and is the EOS,
# so a completion ends with the end-of-turn token exactly once.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML = ChatLayout(CHATML_TEMPLATE, "<s>", "<|im_end|>", ("<|im_start|>", "<|im_end|>"))


def build_tokenizer(
    corpus: Iterable[str],
    out_dir: str | Path,
    *,
    vocab_size: int = 512,
    layout: ChatLayout | None = CHATML,
    add_bos: bool = True,
) -> Path:
    """Train a byte-level BPE tokenizer on `corpus` and save it as a `PreTrainedTokenizerFast`.

    With a chat `layout` (ChatML by default), its template, BOS, EOS and special tokens; with
    None, a base model whose EOS is `</s>`. `add_bos` makes the tokenizer prepend BOS like Llama's
    does, which is what tests for "no doubled BOS" need.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bos, eos = (layout.bos, layout.eos) if layout else ("<s>", "</s>")
    specials = [t for t in dict.fromkeys(["<pad>", bos, eos, "<unk>", *(layout.specials if layout else ())]) if t]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    if add_bos and bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=[t for t in specials if t not in ("<pad>", bos, eos, "<unk>")],
    )
    if layout:
        fast.add_tokens(list(layout.added))
        fast.chat_template = layout.template
    out_dir = Path(out_dir)
    fast.save_pretrained(out_dir)
    return out_dir


def build_model(
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_positions: int = 1024,
    seed: int = 0,
    reward_head: bool = False,
) -> Path:
    """A randomly initialised Llama sized for the tokenizer in `tokenizer_dir`, saved with it: a
    causal LM, or with `reward_head` a one-output sequence classifier (a reward model)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=not reward_head,
        **({"num_labels": 1} if reward_head else {}),
    )
    torch.manual_seed(seed)
    model = (LlamaForSequenceClassification if reward_head else LlamaForCausalLM)(config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
