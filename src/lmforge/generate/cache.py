"""A KV cache layer that writes each step's keys and values in place.

transformers' `DynamicLayer` concatenates at every step, copying the whole cache: at GPT-2 base size
(12×768) with 32 rows of ~100 tokens that copy was 39 % of a decode step's time (profiled). This layer keeps
[rows, heads, capacity, dim] buffers with free columns at the end and hands attention a view of the filled
ones; it copies only when the columns run out (then with `slack` more), or when the running batch replaces
its tensors (a row joins or leaves: `keys` / `values` assigned)."""

from __future__ import annotations

from typing import Optional

import torch
from transformers.cache_utils import DynamicLayer

SLACK = 64  # free columns added at each growth: one copy of the cache per SLACK steps


class SlackLayer(DynamicLayer):

    def __init__(self, keys: Optional[torch.Tensor] = None, values: Optional[torch.Tensor] = None,
                 slack: int = SLACK):
        self.slack = slack
        self._keys = self._values = None
        self.length = self._values_length = 0  # equal but while the running batch assigns one, then the other
        super().__init__()
        if keys is not None:
            self.dtype, self.device = keys.dtype, keys.device
            self.is_initialized = True
            self.keys, self.values = keys, values

    # `keys` / `values` read as the filled columns; assigning one replaces the buffer (no free columns yet)
    @property
    def keys(self) -> Optional[torch.Tensor]:
        return None if self._keys is None else self._keys[:, :, :self.length]

    @keys.setter
    def keys(self, tensor: Optional[torch.Tensor]) -> None:
        self._keys = tensor if tensor is not None and tensor.dim() == 4 else None
        self.length = 0 if self._keys is None else self._keys.shape[2]

    @property
    def values(self) -> Optional[torch.Tensor]:
        return None if self._values is None else self._values[:, :, :self._values_length]

    @values.setter
    def values(self, tensor: Optional[torch.Tensor]) -> None:
        self._values = tensor if tensor is not None and tensor.dim() == 4 else None
        self._values_length = 0 if self._values is None else self._values.shape[2]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[2]
        if self._keys is None:
            self._keys, self._values = self._grown(key_states, 0), self._grown(value_states, 0)
        elif self.length + new > self._keys.shape[2]:
            self._keys, self._values = self._grown(self.keys, new), self._grown(self.values, new)
        end = self.length + new
        self._keys[:, :, self.length:end] = key_states
        self._values[:, :, self.length:end] = value_states
        self.length = self._values_length = end
        return self.keys, self.values

    def add_rows(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append rows (another batch's filled columns) below these, both right-aligned at the longer length with
        zero padding on the left: one copy into a buffer that keeps free columns."""
        width = max(self.length, keys.shape[2])
        self._keys = self._stacked(self.keys, keys, width)
        self._values = self._stacked(self.values, values, width)
        self.length = self._values_length = width

    def _stacked(self, old: torch.Tensor, new: torch.Tensor, width: int) -> torch.Tensor:
        rows = old.shape[0]
        buffer = old.new_empty(rows + new.shape[0], old.shape[1], width + self.slack, old.shape[3])
        for part, at in ((old, slice(0, rows)), (new, slice(rows, None))):
            pad = width - part.shape[2]
            buffer[at, :, :pad] = 0
            buffer[at, :, pad:width] = part
        return buffer

    def select_rows(self, index: torch.Tensor, first: int) -> None:
        """Keep the rows in `index` and the columns from `first` on. The free columns are copied along (they are
        few), so the next steps still write in place: one copy, not one now and one at the next step."""
        self._keys, self._values = self._keys[index, :, first:], self._values[index, :, first:]
        self.length -= first
        self._values_length = self.length

    def _grown(self, filled: torch.Tensor, coming: int) -> torch.Tensor:
        """A buffer holding `filled`'s columns with room for `coming` more plus `slack`."""
        rows, heads, length, dim = filled.shape
        buffer = filled.new_empty(rows, heads, length + coming + self.slack, dim)
        buffer[:, :, :length] = filled
        return buffer

    def get_seq_length(self) -> int:
        return self.length


def with_slack(cache) -> object:
    """`cache` (a DynamicCache of plain DynamicLayers) with every layer writing in place; the tensors are shared."""
    cache.layers = [SlackLayer(layer.keys, layer.values) if layer.is_initialized else SlackLayer()
                    for layer in cache.layers]
    return cache
