"""Long convolution written with F.conv1d (StripedHyena's long_fir_threshold path; explicit long
filters as in safari's long_conv / "long convs" baselines).

Spellings exercised: a depthwise nn.Conv1d short filter (k=4, padding=3)[..., :L], and a long
explicit filter of full length K = max_len applied by F.conv1d(x, w, padding=K-1, groups=C)[..., :L]
(a cross-correlation: the causal filter is w flipped). The weight never depends on L, so the
output is causal and prefix-stable at every L <= max_len.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from examples.models.common import Block, LM, MAX_LEN, seeded, token_inputs


class LongConv1dMixer(nn.Module):
    def __init__(self, d_model, l_max, short_kernel=4):
        super().__init__()
        self.d_model = d_model
        self.in_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        total_width = 3 * d_model
        self.short_filter = nn.Conv1d(total_width, total_width, kernel_size=short_kernel,
                                      groups=total_width, padding=short_kernel - 1)
        # Causal filter h[s] = randn * exp(-s / tau); stored as w = h flipped for cross-correlation.
        lags = torch.arange(l_max).float()
        decay = torch.exp(-lags / (l_max / 8))
        h = torch.randn(d_model, 1, l_max) * decay / decay.sum().sqrt()
        self.weight = nn.Parameter(h.flip(-1))

    def forward(self, u):
        L = u.shape[1]
        z = self.in_proj(u).permute(0, 2, 1)
        z = self.short_filter(z)[..., :L]
        x1, x2, v = z.split(self.d_model, dim=1)
        y = F.conv1d(x1 * v, self.weight, stride=1, groups=self.d_model,
                     padding=self.weight.shape[-1] - 1)[..., :L]
        return self.out_proj((y * x2).permute(0, 2, 1))


def build():
    d_model, max_len, vocab = 32, MAX_LEN, 64
    with seeded(0):
        model = LM(vocab, d_model, [Block(d_model, LongConv1dMixer(d_model, max_len))], max_len)
    return model.eval(), token_inputs(vocab, 64)
