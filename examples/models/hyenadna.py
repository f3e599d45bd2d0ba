"""HyenaDNA-style character-level DNA LM (Nguyen et al. 2023), after HazyResearch/hyena-dna.

Spellings exercised: the FFT convolution with the default irfft norm and no 1/n on the filter
spectrum, with fft_size = L + Lk (the filter length) as in safari's H3 code; a 12-token character
vocabulary; several Hyena blocks; LM head weight tied to the embedding.
"""

import torch

from examples.models.common import Block, LM, MAX_LEN, fft_dtype, seeded, token_inputs
from examples.models.hyena import HyenaFilter, HyenaOperator

# [CLS] [SEP] [BOS] [MASK] [PAD] [RESERVED] [UNK] A C G T N
VOCAB = 12


def fftconv_lk(u, k, D):
    """FFT convolution sized L + Lk, default norm, no 1/n."""
    seqlen = u.shape[-1]
    fft_size = seqlen + k.shape[-1]
    dtype = fft_dtype(u.dtype)
    k_f = torch.fft.rfft(k.to(dtype), n=fft_size)
    u_f = torch.fft.rfft(u.to(dtype), n=fft_size)
    y = torch.fft.irfft(u_f * k_f, n=fft_size)[..., :seqlen]
    return (y + u * D.unsqueeze(-1)).to(dtype=u.dtype)


class DNAHyenaFilter(HyenaFilter):
    def forward(self, x, L, k, bias):
        return fftconv_lk(x, k, bias)


def build():
    d_model, max_len, n_layer = 32, MAX_LEN, 3
    with seeded(0):
        blocks = [
            Block(d_model, HyenaOperator(d_model, max_len, order=2, filter_cls=DNAHyenaFilter, emb_dim=5, w=10))
            for _ in range(n_layer)
        ]
        model = LM(VOCAB, d_model, blocks, max_len)
        model.lm_head.weight = model.embedding.weight  # tie_weights()
    return model.eval(), token_inputs(VOCAB, 64)
