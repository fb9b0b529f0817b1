"""xecomla: upcycle pre-trained Llama attention into Multi-head Latent Attention (X-EcoMLA)."""

__version__ = '0.1.0'
