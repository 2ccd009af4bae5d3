"""The models of the text tasks: MiniGPT (wikitext2), a Transformer encoder-decoder (multi30k)
and a bidirectional LSTM classifier (imdb).

Every model is twice differentiable in training mode, as ``meta_gradient="exact"`` needs:
attention comes from ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer``
(``batch_first=True``; encoders with ``enable_nested_tensor=False``), and the one pass that is
differentiated twice runs inside :func:`metaadamw.meta.twice_differentiable_kernels` (math
attention, no cuDNN on CUDA). Every other forward pass - training, evaluation and the default
finite-difference meta-update - runs on the fast kernels (flash attention, cuDNN LSTMs).
"""

from __future__ import annotations

import torch
from torch import nn


def causal_mask(length: int, device: torch.device) -> torch.Tensor:
    """Boolean ``(length, length)`` attention mask, True above the diagonal (future positions)."""
    return torch.ones(length, length, dtype=torch.bool, device=device).triu(1)


def _init_weights(module: nn.Module) -> None:
    """GPT-style initialisation: N(0, 0.02) for linear and embedding weights, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


class MiniGPT(nn.Module):
    """A small GPT: token + learned position embeddings, a causal pre-LayerNorm Transformer
    (``nn.TransformerEncoderLayer`` with a causal mask, GELU, feed-forward width 4 * d_model),
    a final LayerNorm and a linear head to the vocabulary (tied to the token embedding).

    ``forward(idx)`` maps token ids ``(B, T)`` with ``T <= block_size`` to logits ``(B, T, V)``.
    """

    def __init__(self, vocab_size: int, block_size: int, d_model: int, n_layers: int, n_heads: int, dropout: float):
        super().__init__()
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(block_size, d_model)
        self.drop = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, 4 * d_model, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        _init_weights(self)
        self.head.weight = self.tok_emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        length = idx.shape[1]
        if length > self.block_size:
            raise ValueError(f"MiniGPT: sequence length {length} exceeds block_size {self.block_size}")
        pos = torch.arange(length, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        x = self.blocks(x, mask=causal_mask(length, idx.device), is_causal=True)
        return self.head(self.ln_f(x))


class Seq2SeqTransformer(nn.Module):
    """A Transformer encoder-decoder translator over one shared vocabulary.

    Source and target share one token embedding (scaled by sqrt(d_model)), which is also the
    output projection; positions are learned embeddings (up to ``max_len``). Encoder and decoder
    are pre-LayerNorm ``nn.TransformerEncoder`` / ``nn.TransformerDecoder`` stacks with a final
    LayerNorm each. Padding (``pad_id``) is masked in self- and cross-attention.

    ``forward(src, tgt_in)`` maps ``(B, S)`` source ids and ``(B, T)`` target-input ids (BOS
    first, teacher forcing) to logits ``(B, T, V)``.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_heads: int,
        n_encoder_layers: int,
        n_decoder_layers: int,
        dim_feedforward: int,
        dropout: float,
        max_len: int,
        pad_id: int,
    ):
        super().__init__()
        self.pad_id = pad_id
        self.max_len = max_len
        self.scale = d_model**0.5
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_len, d_model)
        self.drop = nn.Dropout(dropout)
        layer_args = dict(dim_feedforward=dim_feedforward, dropout=dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d_model, n_heads, **layer_args),
            n_encoder_layers,
            norm=nn.LayerNorm(d_model),
            enable_nested_tensor=False,
        )
        self.decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(d_model, n_heads, **layer_args), n_decoder_layers, norm=nn.LayerNorm(d_model)
        )
        self.out = nn.Linear(d_model, vocab_size, bias=False)
        _init_weights(self)
        self.out.weight = self.embed.weight

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > self.max_len:
            raise ValueError(f"Seq2SeqTransformer: sequence length {ids.shape[1]} exceeds max_len {self.max_len}")
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.drop(self.embed(ids) * self.scale + self.pos_emb(pos))

    def encode(self, src: torch.Tensor) -> torch.Tensor:
        """Encoder states ``(B, S, d_model)`` of the source ids."""
        return self.encoder(self._embed(src), src_key_padding_mask=src == self.pad_id)

    def decode(self, memory: torch.Tensor, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``(B, T, V)`` for every prefix of ``tgt_in`` given the encoded ``src``."""
        length = tgt_in.shape[1]
        x = self.decoder(
            self._embed(tgt_in),
            memory,
            tgt_mask=causal_mask(length, tgt_in.device),
            tgt_is_causal=True,
            tgt_key_padding_mask=tgt_in == self.pad_id,
            memory_key_padding_mask=src == self.pad_id,
        )
        return self.out(x)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(src), src, tgt_in)

    @torch.no_grad()
    def greedy_decode(self, src: torch.Tensor, bos_id: int, eos_id: int, max_len: int | None = None) -> torch.Tensor:
        """Greedy translations ``(B, L)`` of ``src``: BOS first, then the most likely token until
        EOS (included) or ``max_len`` tokens; finished rows are padded with ``pad_id``."""
        max_len = min(max_len or self.max_len, self.max_len)
        memory = self.encode(src)
        out = torch.full((src.shape[0], 1), bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
        while out.shape[1] < max_len and not done.all():
            nxt = self.decode(memory, src, out)[:, -1].argmax(-1)
            nxt = nxt.masked_fill(done, self.pad_id)
            out = torch.cat([out, nxt[:, None]], dim=1)
            done |= nxt == eos_id
        return out


def reverse_padded(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse the first ``lengths[b]`` steps of each row ``b`` of ``x`` ``(B, L, ...)``, leaving
    the right padding in place. The operation is its own inverse."""
    steps = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
    index = lengths[:, None] - 1 - steps
    index = torch.where(index >= 0, index, steps)
    return x.gather(1, index.view(*index.shape, *(1,) * (x.dim() - 2)).expand_as(x))


class BiLSTMClassifier(nn.Module):
    """Embedding -> bidirectional multi-layer LSTM -> dropout -> linear classifier on the
    concatenated final forward and backward states of the last layer.

    ``forward(ids)`` maps ``(B, L)`` token ids, right-padded with ``pad_id``, to class logits
    ``(B, num_classes)``; a row of padding only is read as one padding token.

    Each layer runs a forward and a backward ``nn.LSTM`` over the padded batch; the backward one
    reads every sequence reversed within its own length (:func:`reverse_padded`), so padding never
    reaches a real position in either direction. This gives the same function as a packed
    bidirectional LSTM, whose backward pass is much slower on the CPU.
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int,
        hidden_size: int,
        num_layers: int,
        dropout: float,
        pad_id: int,
        num_classes: int = 2,
    ):
        super().__init__()
        self.pad_id = pad_id
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        sizes = [embed_dim] + [2 * hidden_size] * (num_layers - 1)
        self.forward_lstms = nn.ModuleList(nn.LSTM(n, hidden_size, batch_first=True) for n in sizes)
        self.backward_lstms = nn.ModuleList(nn.LSTM(n, hidden_size, batch_first=True) for n in sizes)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * hidden_size, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        lengths = (ids != self.pad_id).sum(1).clamp(min=1)
        x = self.drop(self.embed(ids[:, : int(lengths.max())]))
        for layer, (fwd_lstm, bwd_lstm) in enumerate(zip(self.forward_lstms, self.backward_lstms)):
            if layer:
                x = self.drop(x)
            fwd = fwd_lstm(x)[0]
            bwd = reverse_padded(bwd_lstm(reverse_padded(x, lengths))[0], lengths)
            x = torch.cat([fwd, bwd], dim=2)
        last = (lengths - 1).view(-1, 1, 1).expand(-1, 1, fwd.shape[2])
        final = torch.cat([fwd.gather(1, last)[:, 0], bwd[:, 0]], dim=1)  # forward at the end, backward at the start
        return self.fc(self.drop(final))
