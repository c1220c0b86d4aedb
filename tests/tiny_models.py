"""Tiny real-format models for CLI tests: a word-level PTB tokenizer and a 2-layer Llama config.

One copy for the test files that write a tiny checkpoint folder (compress, quantize, distributed):
tokenising all of PTB with SmolLM2's tokenizer is slow, a 256-word vocabulary is enough.
"""

from __future__ import annotations


def ptb_word_tokenizer(vocab_size: int = 256):
    """A word-level tokenizer over the first distinct words of PTB train (<unk> = 0, <s> = 1 = BOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from rankwise.io.texts import load_text

    vocab = {"<unk>": 0, "<s>": 1}
    for w in load_text("ptb", "train")[:100_000].split():
        if w not in vocab and len(vocab) < vocab_size:
            vocab[w] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>")


def tiny_llama_config(vocab_size: int = 256):
    """2 layers, hidden 64, GQA 4/2 heads, tied embeddings, BOS = EOS = 1."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                       num_hidden_layers=2, vocab_size=vocab_size, max_position_embeddings=128, bos_token_id=1,
                       eos_token_id=1, tie_word_embeddings=True)


def write_tiny_llama(folder, seed: int = 0):
    """Save a seeded tiny Llama and its word-level tokenizer as a plain HF folder; returns the folder."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(str(folder))
    ptb_word_tokenizer().save_pretrained(str(folder))
    return folder


def planted_tiny_llama():
    """A 3-layer GQA Llama whose targeted matrices are planted rank-6 + noise (a spectrum with a real shape)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rankwise.surgery import find_targets

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=3, vocab_size=128, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    for t in find_targets(model):
        m, n = t.shape
        W = torch.randn(m, 6, generator=g) @ torch.randn(6, n, generator=g) / 6**0.5
        t.set_weight(0.3 * W + 0.05 * torch.randn(m, n, generator=g))
    return model


def assert_factors_equal_in_memory(folder, out, config, calib) -> None:
    """The factors a streamed compress wrote to ``out`` equal ``rankwise.compress`` of the model in ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM

    from rankwise.compression.api import compress
    from rankwise.io.shards import CheckpointReader

    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    compress(model, config, calib=calib)
    reader = CheckpointReader(out)
    state = model.state_dict()
    keys = [k for k in reader.keys() if k.endswith((".A.weight", ".B.weight"))]
    assert keys
    for k in keys:
        torch.testing.assert_close(reader.get(k), state[k], rtol=1e-4, atol=1e-5)
    reader.close()
