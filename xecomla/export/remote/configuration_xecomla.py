"""Configuration of an xecomla MLA student exported to Hugging Face format (remote code).

The full architecture is the `xecomla` dict (xecomla's MLAConfig.to_dict()): per-layer ranks
(`r_kv`, `r_q`), RoPE dimensions (`d_r`, `d_qk`, `d_v`, `rope_pairs`), `latent_norm` and the
teacher Llama it came from (`llama`). The top-level fields are what transformers itself reads.
"""

from transformers import PretrainedConfig


class XEcoMLAConfig(PretrainedConfig):
  model_type = 'xecomla'

  def __init__(self, xecomla=None, vocab_size=32000, hidden_size=4096, num_hidden_layers=32,
               num_attention_heads=32, max_position_embeddings=2048, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, **kwargs):
    self.xecomla = xecomla
    self.vocab_size = vocab_size
    self.hidden_size = hidden_size
    self.num_hidden_layers = num_hidden_layers
    self.num_attention_heads = num_attention_heads
    self.max_position_embeddings = max_position_embeddings
    super().__init__(tie_word_embeddings=tie_word_embeddings, bos_token_id=bos_token_id,
                     eos_token_id=eos_token_id, **kwargs)
