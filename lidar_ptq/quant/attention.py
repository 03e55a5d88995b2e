"""Fake-quant twin of ``nn.MultiheadAttention`` (the attention of torchvision's ViT and of most
hand-written ViTs built on torch): both attention matmuls get quantized operands.

Quantizers: ``input_quantizer`` (tokens), ``weight_quantizer`` (fused q/k/v projection, per
output channel), ``q_quantizer``/``k_quantizer`` (Q.K^T operands), ``softmax_quantizer``
(attention probabilities; unsigned, optionally ``scheme="log2"`` for their long tail) and
``v_quantizer`` (attn.V operand); ``out_proj`` becomes a ``QuantLinear``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .modules import QuantLinear, QuantModuleMixin, register_quant_module
from .quantizer import FakeQuantizer
from .spec import QuantSpec


@register_quant_module(nn.MultiheadAttention)
class QuantMultiheadAttention(QuantModuleMixin, nn.MultiheadAttention):
    weight_name = "in_proj_weight"
    feature_axis = -1
    weight_in_axis = None  # its forward does not apply prescale_input: not equalizable

    def _init_extra_quantizers(self, roles: dict[str, QuantSpec], input_spec: QuantSpec) -> None:
        if not self._qkv_same_embed_dim or self.bias_k is not None or self.add_zero_attn:
            raise NotImplementedError("QuantMultiheadAttention supports equal q/k/v dims without "
                                      "add_bias_kv/add_zero_attn; keep this module in float via an override")
        attention = roles.get("attention", input_spec)
        self.q_quantizer = FakeQuantizer(attention, feature_axis=-1)
        self.k_quantizer = FakeQuantizer(attention, feature_axis=-1)
        self.v_quantizer = FakeQuantizer(attention, feature_axis=-1)
        self.softmax_quantizer = FakeQuantizer(roles.get("softmax", input_spec.updated({"signed": False})),
                                               feature_axis=-1)
        self.out_proj = QuantLinear.from_float(self.out_proj, self.weight_quantizer.spec, input_spec)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q_in = self.input_quantizer(query)
        k_in = q_in if key is query else self.input_quantizer(key)
        v_in = k_in if value is key else self.input_quantizer(value)
        w_q, w_k, w_v = self.quantized_weight().chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        batch, length, _ = q_in.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

        q = heads(F.linear(q_in, w_q, b_q)) * self.head_dim ** -0.5
        k = heads(F.linear(k_in, w_k, b_k))
        v = heads(F.linear(v_in, w_v, b_v))
        scores = self.q_quantizer(q) @ self.k_quantizer(k).transpose(-2, -1)
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(length, k.shape[2], dtype=torch.bool, device=q.device).triu(1)
        if attn_mask is not None:
            mask = attn_mask.reshape(-1, self.num_heads, *attn_mask.shape[-2:]) if attn_mask.dim() == 3 else attn_mask
            scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :].to(torch.bool), float("-inf"))
        attn = torch.softmax(scores, dim=-1)
        if self.training and self.dropout > 0:
            attn = F.dropout(attn, self.dropout)
        out = self.softmax_quantizer(attn) @ self.v_quantizer(v)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, self.embed_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        weights = (attn.mean(1) if average_attn_weights else attn) if need_weights else None
        return out, weights
