"""Optional inductive-bias layers around the Llama backbone (no Ray, plain torch).

`CausalFreqMix` is a causal form of BSARec's "beyond self-attention" mix (Shin et al., AAAI
2024): self-attention behaves as a low-pass filter over the sequence, so each layer also gets a
signal-processing branch that keeps the low frequencies and re-weights the high ones,

    out_t = (1 - a) attn(h)_t + a (low_t + beta^2 * (h_t - low_t))

BSARec's low-pass is an FFT over the whole sequence, which at position t reads later events:
fine for its last-position-only training, a leak for ours (a target at every position). Here
the low-pass is causal: `low_t` is the mean of h over the last `window` real events up to t.
beta (D,) is learned per channel (beta = 1 at start: the branch passes h through unchanged).

The branch is attached as a forward hook on each decoder layer's `self_attn`, so the backbone's
own parameter names (and its transformers export) stay those of a plain Llama.
"""

from __future__ import annotations

import torch
from torch import nn


class CausalFreqMix(nn.Module):
    """Low-pass (causal window mean) + beta^2 x high-pass of h, mixed into attention's output."""

    def __init__(self, d: int, alpha: float, window: int) -> None:
        super().__init__()
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"model.freq_mix must be in (0, 1], got {alpha!r}")
        if window < 1:
            raise ValueError(f"model.freq_window must be >= 1, got {window!r}")
        self.alpha, self.window = alpha, window
        self.sqrt_beta = nn.Parameter(torch.ones(d))  # (D,) high-pass gain is its square

    def forward(self, h: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """h: (B, T, D) left-padded states; position_ids: (B, T) 0-based index of each real event
        (padding: 0) -> (B, T, D). Only real events at positions <= t enter row t."""
        w = self.window
        k = (position_ids + 1).clamp(max=w)  # (B, T) real events in the window (padding: 1)
        padded = nn.functional.pad(h, (0, 0, w - 1, 0))  # (B, T + w - 1, D)
        win = padded.unfold(1, w, 1)  # (B, T, D, w); slot j holds position t - (w - 1 - j)
        slots = torch.arange(w, device=h.device)  # (w,)
        keep = slots >= (w - k).unsqueeze(-1)  # (B, T, w): the last k slots
        # where, not a product: padding rows may hold anything (even NaN), never let it through.
        low = torch.where(keep.unsqueeze(2), win, 0.0).sum(-1) / k.unsqueeze(-1)  # (B, T, D)
        return low + self.sqrt_beta**2 * (h - low)  # (B, T, D)

    def hook(self, module: nn.Module, args: tuple, kwargs: dict, output: tuple) -> tuple:
        """`register_forward_hook(..., with_kwargs=True)` on a LlamaAttention: mix its output."""
        h, positions = kwargs["hidden_states"], kwargs["position_ids"]
        attn, weights = output[0], output[1]
        mixed = (1.0 - self.alpha) * attn + self.alpha * self(h, positions.expand(h.shape[:2]))
        return (mixed, weights)


def attach_freq_mix(layers: nn.ModuleList, d: int, alpha: float, window: int) -> nn.ModuleList:
    """One `CausalFreqMix` per decoder layer, hooked on its self_attn; returns them (register
    them on the model so their parameters train and save)."""
    mixes = nn.ModuleList(CausalFreqMix(d, alpha, window) for _ in layers)
    for layer, mix in zip(layers, mixes, strict=True):
        layer.self_attn.register_forward_hook(mix.hook, with_kwargs=True)
    return mixes


class ResidualDropout(nn.Module):
    """Dropout on a sub-layer's output before it joins the residual stream (GPT-2's
    resid_pdrop, SASRec's dropout after attention and the FFN). Llama has none: its
    `attention_dropout` only drops attention probabilities, so with small data the MLP and the
    attention projections fit the training sequences freely."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 < p < 1.0:
            raise ValueError(f"model.residual_dropout must be in (0, 1), got {p!r}")
        self.p = p

    def hook(self, module: nn.Module, args: tuple, output):
        """A forward hook on a LlamaAttention (output: (attn, weights)) or a LlamaMLP (tensor)."""
        drop = nn.functional.dropout
        if isinstance(output, tuple):
            return (drop(output[0], self.p, self.training), *output[1:])
        return drop(output, self.p, self.training)


def attach_residual_dropout(layers: nn.ModuleList, p: float) -> ResidualDropout:
    """Hook one `ResidualDropout` on every decoder layer's self_attn and mlp (after any freq
    mix: hooks run in registration order); register it on the model so train()/eval() reach
    it. It has no parameters: the backbone still saves and exports as a plain Llama."""
    dropout = ResidualDropout(p)
    for layer in layers:
        layer.self_attn.register_forward_hook(dropout.hook)
        layer.mlp.register_forward_hook(dropout.hook)
    return dropout
