"""Quantized ResnetBlock and AttnBlock (Q-Diffusion ``QuantResnetBlock``/``QuantAttnBlock``, QB:286-386).

Same forward and call signature as the FP blocks; activations are quantized where the reference quantizes them: the
input of every conv/linear (so SiLU(GN(x)), SiLU(temb), the dropout output and the shortcut input), plus attention
q, k, v and the softmax probabilities.
"""
from __future__ import annotations

import torch
from torch import nn

from ..diffusion.unet import AttnBlock, ResnetBlock
from .modules import QuantConfig, Quantized, QuantLayer, act_quantizer


class QuantResnetBlock(nn.Module):
    """``block(x, temb)``. ``split`` reaches only the 1x1 ``nin_shortcut`` (decoder blocks on ``cat(h, skip)``);
    ``conv1`` sees GN+SiLU of the whole concat unsplit, as in the reference."""

    def __init__(self, block: ResnetBlock, cfg: QuantConfig, split: int = 0):
        super().__init__()
        self.in_channels, self.out_channels = block.in_channels, block.out_channels
        self.use_conv_shortcut = block.use_conv_shortcut
        self.norm1 = block.norm1
        self.conv1 = QuantLayer(block.conv1, cfg)
        self.temb_proj = QuantLayer(block.temb_proj, cfg)
        self.norm2 = block.norm2
        self.dropout = block.dropout
        self.conv2 = QuantLayer(block.conv2, cfg)
        if self.in_channels != self.out_channels:
            if self.use_conv_shortcut:
                self.conv_shortcut = QuantLayer(block.conv_shortcut, cfg)
            else:
                self.nin_shortcut = QuantLayer(block.nin_shortcut, cfg, split)

    # the FP forward itself: every quantization point is the input of a QuantLayer
    forward = ResnetBlock.forward


class QuantAttnBlock(Quantized):
    """``block(x)``. Besides the q/k/v/proj_out input quantizers, quantizes q, k, v (``act_bits``) and the softmax
    output (``sm_abit``) per tensor. The softmax quantizer keeps ``act_symmetric`` as the reference does, so with the
    README's ``--a_sym`` the probabilities use codes 0..127 only (effectively 7-bit)."""

    def __init__(self, block: AttnBlock, cfg: QuantConfig):
        super().__init__(cfg.quant_act)
        self.norm = block.norm
        self.q, self.k, self.v = (QuantLayer(m, cfg) for m in (block.q, block.k, block.v))
        self.proj_out = QuantLayer(block.proj_out, cfg)
        self.act_quantizer_q = act_quantizer(cfg.act_bits, cfg)
        self.act_quantizer_k = act_quantizer(cfg.act_bits, cfg)
        self.act_quantizer_v = act_quantizer(cfg.act_bits, cfg)
        self.act_quantizer_w = act_quantizer(cfg.sm_abit, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, hh, ww = q.shape
        q = q.reshape(b, c, hh * ww).permute(0, 2, 1)  # b, hw, c
        k, v = k.reshape(b, c, hh * ww), v.reshape(b, c, hh * ww)
        if self.use_act_quant:
            q, k = self.act_quantizer_q(q), self.act_quantizer_k(k)
        w = torch.softmax(torch.bmm(q, k) * (int(c) ** -0.5), dim=2)
        if self.use_act_quant:
            v, w = self.act_quantizer_v(v), self.act_quantizer_w(w)
        h = torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(h)
